"""jobs/k8s/rayjob.yaml against KubeRay's own RayJob CRD, with unknown fields refused.

`kubectl apply --validate=strict` (server-side field validation) refuses a field that the CRD's
structural schema does not declare, unless the schema says `x-kubernetes-preserve-unknown-fields`.
The CRD (tests/k8s/ray.io_rayjobs.v1.yaml, KubeRay v1.7.0, see tests/k8s/README.md) is turned into
a JSON Schema that does the same: `additionalProperties: false` on every object schema with
`properties`, int-or-string as integer or string, `nullable`, int32/int64 ranges, and the list-map /
set uniqueness of `x-kubernetes-list-type` (two env entries of one name are refused by the API
server too). The root `metadata` is `type: object` in a CRD (the API server checks it as
ObjectMeta), so apiVersion, kind and metadata.name are checked here by KubeRay's own rules.
The CRD's few CEL rules (`x-kubernetes-validations`, on fields this manifest does not use) are not
evaluated.
"""
import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "jobs" / "k8s" / "rayjob.yaml"
CRD = REPO / "tests" / "k8s" / "ray.io_rayjobs.v1.yaml"

SECRET_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def strict(schema: dict) -> dict:
    """A structural CRD schema as a JSON Schema that refuses what the API server would prune."""
    schema = dict(schema)
    if schema.get("x-kubernetes-int-or-string"):
        schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for key {dict(zip(keys, key))} in a list of type map")
            seen.add(key)


_format_checker = jsonschema.FormatChecker()


@_format_checker.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_format_checker.checks("int64")
def _int64(value):
    return not isinstance(value, int) or -(2**63) <= value < 2**63


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)


@pytest.fixture(scope="module")
def crd():
    return yaml.safe_load(CRD.read_text())


@pytest.fixture(scope="module")
def validator(crd):
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1["served"] and v1["storage"]
    return StrictValidator(strict(v1["schema"]["openAPIV3Schema"]), format_checker=_format_checker)


@pytest.fixture()
def manifest():
    return yaml.safe_load(MANIFEST.read_text())


def errors(validator, document):
    return sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))


def where(error):
    return ".".join(str(p) for p in error.absolute_path)


def containers(manifest):
    """(where, container) for the head, every worker group and the submitter."""
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    found = [("head", c) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        found += [(f"worker group {group['groupName']}", c) for c in group["template"]["spec"]["containers"]]
    found += [("submitter", c) for c in spec["submitterPodTemplate"]["spec"]["containers"]]
    return found


# --- the CRD: the copy we hold is KubeRay's, and it describes the pod spec in full ---

def test_the_crd_is_kuberays_rayjob_v1(crd):
    assert crd["kind"] == "CustomResourceDefinition" and crd["metadata"]["name"] == "rayjobs.ray.io"
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == ("ray.io", "RayJob")
    assert "KubeRay" in CRD.read_text()[:200] and "v1.7.0" in CRD.read_text()[:1000]


def test_the_crd_describes_containers_and_preserves_no_unknown_fields(crd):
    text = CRD.read_text()
    assert "x-kubernetes-preserve-unknown-fields" not in text  # nothing is left open, anywhere
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    pod = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"][
        "properties"]["template"]["properties"]["spec"]
    container = pod["properties"]["containers"]["items"]["properties"]
    assert {"image", "env", "resources", "name"} <= container.keys()
    assert {"valueFrom"} <= container["env"]["items"]["properties"].keys()


# --- the manifest is valid, strictly ---

def test_the_manifest_validates_strictly_against_the_crd(validator, manifest):
    assert [f"{where(e)}: {e.message}" for e in errors(validator, manifest)] == []


def test_apiversion_kind_and_name_as_the_api_server_and_kuberay_check_them(crd, manifest):
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    assert set(manifest["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    name = manifest["metadata"]["name"]
    # KubeRay's ValidateRayJobMetadata: a DNS-1035 label of at most 47 characters.
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47


def test_what_kuberay_and_the_job_api_check_beyond_the_schema(manifest):
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    # authOptions.mode token needs rayVersion >= 2.52.0 (KubeRay's validation).
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")) >= (2, 52, 0)
    # The submitter runs as a Kubernetes Job, whose pods may not restart Always.
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# --- the validator is strict: these are refused ---

def test_the_crd_as_it_stands_would_let_a_typo_through(crd, manifest):
    # Why strict() exists: JSON Schema allows unknown properties unless told otherwise.
    bad = copy.deepcopy(manifest)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    loose = jsonschema.Draft7Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert list(loose.iter_errors(bad)) == []


@pytest.mark.parametrize(
    "path, key",
    [
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0), "imagee"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "env", 1), "valueform"),
        (("spec",), "shutdownAfterJobFinish"),
        (("spec", "rayClusterSpec", "authOptions"), "secret"),
        (("spec", "submitterPodTemplate", "spec"), "restartpolicy"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "metadata"), "label"),
    ],
)
def test_an_unknown_field_is_refused(validator, manifest, path, key):
    bad = copy.deepcopy(manifest)
    node = bad
    for p in path:
        node = node.setdefault(p, {}) if isinstance(node, dict) else node[p]
    node[key] = "x"
    found = errors(validator, bad)
    assert len(found) == 1, [f"{where(e)}: {e.message}" for e in found]
    assert found[0].validator == "additionalProperties" and repr(key) in found[0].message
    assert tuple(found[0].absolute_path) == path


@pytest.mark.parametrize(
    "path, value, validator_name",
    [
        (("spec", "backoffLimit"), "2", "type"),
        (("spec", "shutdownAfterJobFinishes"), "true", "type"),
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), 2**31, "format"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "limits", "cpu"),
         "four", "pattern"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "limits", "cpu"),
         4.5, "anyOf"),
        (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens", "enum"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "env"),
         {"name": "RAY_AUTH_MODE"}, "type"),
    ],
)
def test_a_wrong_value_is_refused(validator, manifest, path, value, validator_name):
    bad = copy.deepcopy(manifest)
    node = bad
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    found = errors(validator, bad)
    assert [(tuple(e.absolute_path), e.validator) for e in found] == [(path, validator_name)]


def test_a_missing_required_field_and_a_repeated_env_name_are_refused(validator, manifest):
    bad = copy.deepcopy(manifest)
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert [e.validator for e in errors(validator, bad)] == []  # image is optional in a container ...
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    found = errors(validator, bad)  # ... a worker group's name is not
    assert [(where(e), e.validator) for e in found] == [("spec.rayClusterSpec.workerGroupSpecs.0", "required")]

    bad = copy.deepcopy(manifest)
    env = bad["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
    env.append(copy.deepcopy(env[0]))
    found = errors(validator, bad)
    assert [(where(e), e.validator) for e in found] == [
        ("spec.submitterPodTemplate.spec.containers.0.env", "x-kubernetes-list-type")
    ]


# --- token auth: every container gets both variables from the same Secret ---

def test_every_container_gets_the_auth_variables_from_one_secret(manifest):
    found = containers(manifest)
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [w for w, _ in found] == ["head"] + [f"worker group {g['groupName']}" for g in groups] + ["submitter"]
    refs = {}
    for where_, container in found:
        env = {e["name"]: e for e in container.get("env", [])}
        for var in SECRET_VARS:
            assert var in env, f"{where_} ({container['name']}) has no {var}"
            assert "value" not in env[var], f"{where_}: {var} is a literal"
            refs.setdefault(var, set()).add(yaml.safe_dump(env[var]["valueFrom"]["secretKeyRef"]))
        assert not {"RAY_AUTH_TOKEN_PATH"} & env.keys()
    assert {var: len(r) for var, r in refs.items()} == {var: 1 for var in SECRET_VARS}
    secrets = {yaml.safe_load(next(iter(r)))["name"] for r in refs.values()}
    keys = {var: yaml.safe_load(next(iter(r)))["key"] for var, r in refs.items()}
    assert len(secrets) == 1 and len(set(keys.values())) == 2
    # KubeRay reads the token from the same Secret, under the key it requires (auth_token).
    auth = manifest["spec"]["rayClusterSpec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": secrets.pop()} and keys["RAY_AUTH_TOKEN"] == "auth_token"


def test_the_secret_example_matches_the_refs_and_no_token_is_in_the_file(manifest):
    text = MANIFEST.read_text()
    secret = manifest["spec"]["rayClusterSpec"]["authOptions"]["secretName"]
    command = re.search(r"kubectl create secret generic (\S+) \\\n#\s+(.*)", text)
    assert command and command.group(1) == secret
    literals = dict(re.findall(r"--from-literal=(\w+)=(\S+)", command.group(2)))
    assert literals.keys() == {"auth_mode", "auth_token"} and literals["auth_mode"] == "token"
    assert literals["auth_token"].startswith('"$(')  # generated when run, not written down
    # No literal token anywhere: every value in the manifest is short, known or a URI/quantity.
    for _, container in containers(manifest):
        for e in container.get("env", []):
            assert "value" not in e or e["name"] not in SECRET_VARS
    assert not re.search(r"\b[0-9a-f]{32,}\b|[A-Za-z0-9+/_-]{40,}", text)
    assert "RAY_AUTH_TOKEN=" not in text and "value: token" not in text
