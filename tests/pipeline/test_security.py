"""Security: credentials never leak into logs, manifests or error rows; output names are ours.

Unit tests of ``pipeline.redact`` first, then runs of the real pipeline with credentials set.
"""
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import AnnotateConfig
from pipeline.output.sink import DATA_FILE
from pipeline.inputs.units import UNIT_ID_PATTERN
from pipeline.redact import (
    MASK,
    RedactingFilter,
    env_secrets,
    is_secret_key,
    redact_mapping,
    redact_text,
    secret_values,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FQoGZXIvYXdzEXAMPLESESSIONTOKEN")


def test_env_credentials_are_masked_wherever_they_appear(aws_env):
    text = f"failed: signature for {KEY_ID} with {SECRET} rejected (token FQoGZXIvYXdzEXAMPLESESSIONTOKEN)"
    cleaned = redact_text(text)
    assert SECRET not in cleaned and KEY_ID not in cleaned and "FQoGZXIvYXdz" not in cleaned
    assert cleaned.startswith("failed: signature for ***")
    assert set(env_secrets()) == {KEY_ID, SECRET, "FQoGZXIvYXdzEXAMPLESESSIONTOKEN"}


def test_generic_credential_shapes_are_masked_without_knowing_the_value():
    text = (
        "GET https://alice:hunter2pass@store.example.com/b/k.jpg?X-Amz-Credential=AKIA/2024&"
        "X-Amz-Signature=deadbeef0123&sig=abcdef123 failed; aws_secret_access_key='s3cr3tvalue'; "
        "id AKIAABCDEFGHIJKLMNOP; password: letmein99"
    )
    cleaned = redact_text(text)
    for leaked in ("alice", "hunter2pass", "deadbeef0123", "abcdef123", "s3cr3tvalue", "AKIAABCDEFGHIJKLMNOP", "letmein99"):
        assert leaked not in cleaned, leaked
    # What is not a credential stays readable.
    assert "store.example.com/b/k.jpg" in cleaned and cleaned.startswith("GET https://***@")


def test_ordinary_text_is_left_alone(aws_env):
    text = "object not found (deleted or moved since it was listed): s3://bucket/images/design=3/a.jpg"
    assert redact_text(text) == text
    assert redact_text(None) is None


def test_storage_options_are_masked_by_key_name_and_value():
    options = {
        "key": "minio-user-1234",
        "secret": "minio-secret-5678",
        "token": None,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:8333", "aws_session_token": "tok-abcdef"},
        "anon": False,
    }
    public = redact_mapping({"storage_options": options, "note": "used minio-secret-5678 to sign"})
    text = json.dumps(public)
    for value in ("minio-user-1234", "minio-secret-5678", "tok-abcdef"):
        assert value not in text
    assert public["storage_options"]["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:8333"
    assert public["storage_options"]["anon"] is False and public["storage_options"]["token"] is None
    assert public["note"] == f"used {MASK} to sign"
    assert sorted(secret_values(options)) == ["minio-secret-5678", "minio-user-1234", "tok-abcdef"]
    assert is_secret_key("key") and is_secret_key("AWS_SECRET_ACCESS_KEY") and not is_secret_key("checkpoint_sha256")


def test_run_config_public_form_has_no_credentials(aws_env):
    config = AnnotateConfig(
        input="s3://bucket/in/",
        output="s3://bucket/out/",
        checkpoint="s3://bucket/models/tiny.pth",
        storage_options={"key": "minio-user-1234", "secret": "minio-secret-5678"},
    )
    text = json.dumps(config.to_public_dict())
    assert "minio-user-1234" not in text and "minio-secret-5678" not in text
    assert "s3://bucket/models/tiny.pth" in text
    # The full form still carries them: workers need them.
    assert config.to_dict()["storage_options"]["secret"] == "minio-secret-5678"


def test_log_filter_scrubs_messages_arguments_and_tracebacks(aws_env):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(["storage-opt-secret-99"]))
    logger = logging.getLogger("test_security.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting with %s and %s", SECRET, "storage-opt-secret-99")
        try:
            raise RuntimeError(f"auth failed for {KEY_ID}")
        except RuntimeError:
            logger.exception("read failed")
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert "read failed" in written and "RuntimeError: auth failed for ***" in written
    for leaked in (SECRET, KEY_ID, "storage-opt-secret-99"):
        assert leaked not in written


class _RunsCode:
    """A pickle payload that would create a file when unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path):
    import torch

    from sam_core import CheckpointError, load_sam

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"

    torch.save({"image_encoder.pos_embed": _RunsCode(str(marker))}, evil)
    with pytest.raises(CheckpointError):
        load_sam(str(evil))
    assert not marker.exists()
    # The same file *would* run code with an unsafe loader: the test's payload is real.
    with open(evil, "rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.exists()
    os.remove(marker)


# --- The real job with credentials set, and hostile input names --------------------------------

OUR_OUTPUT_NAME = re.compile(
    rf"^({DATA_FILE.pattern[1:-1]}|_run\.json|_SUCCESS|_runs/\d{{4,}}\.json|_commits/{UNIT_ID_PATTERN}\.json)$")
HOSTILE_NAMES = ["..jpg", "-rf .jpg", "$(touch pwned).jpg", "名前 with spaces.jpg", "%2e%2e%2fx.jpg", "a;b|c&d.jpg"]


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_input_names_never_shape_output_names(ray_session, tmp_path):
    from pipeline.run import run
    from tests.pipeline.bad_inputs import jpeg, photo
    from tests.pipeline.standin import StandInAnnotator

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(HOSTILE_NAMES):
        (images / name).write_bytes(jpeg(photo(seed=i)))
    (tmp_path / "outside.jpg").write_bytes(jpeg(photo(seed=99)))
    uris = [str(images / name) for name in HOSTILE_NAMES] + [
        f"{images}/sub/../../outside.jpg",  # resolves outside the input folder
        f"{images}/../../../../../../../etc/passwd.jpg",  # does not exist: an error row
    ]
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(uris) + "\n")
    before = tree(tmp_path)

    config = AnnotateConfig(input=str(manifest), output=str(tmp_path / "out"), checkpoint="unused",
                            num_actors=1, batch_size=4, rows_per_file=3, unit_size=4)
    run(config, progress=False, stage=(StandInAnnotator, {"config": config.to_dict()}))

    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written and all(OUR_OUTPUT_NAME.match(name) for name in written), written
    assert tree(tmp_path) - before == {"out"} | {f"out/{name}" for name in written} | {"out/_runs", "out/_commits"}
    assert not list(Path("/").glob("pwned")) and not (tmp_path / "pwned").exists()
    rows = pq.read_table(str(tmp_path / "out")).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(uris)  # kept exactly as listed, never rewritten
    by_uri = {r["uri"]: r for r in rows}
    assert by_uri[uris[-2]]["status"] == "ok" and by_uri[uris[-1]]["status"] == "error"


@pytest.mark.s3
def test_credentials_never_reach_logs_manifests_or_rows(s3, tmp_path):
    """The CLI over S3 with credentials in both the environment and --storage-options."""
    from tests.pipeline.bad_inputs import jpeg, photo
    from tests.sam_factory import make_official_sam, save_official_checkpoint

    fs = s3.filesystem()
    prefix = "images/security-run"
    fs.pipe(f"{prefix}/good.jpg", jpeg(photo(seed=1)))
    fs.pipe(f"{prefix}/truncated.jpg", jpeg(photo(seed=2))[:300])
    fs.pipe(f"{prefix}/page.jpg", b"<html>AccessDenied</html>")
    checkpoint = save_official_checkpoint(make_official_sam(seed=3), tmp_path / "tiny.pth")
    fs.put(str(checkpoint), "models/security-tiny.pth")
    secrets = [s3.secret_key, s3.access_key]
    assert all(len(s) >= 8 for s in secrets)

    ray_tmp = Path(tempfile.mkdtemp(prefix="rsec", dir="/tmp"))  # short: Ray puts sockets here
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "OMP_NUM_THREADS": "1",
           "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
           "AWS_ENDPOINT_URL": s3.endpoint_url}
    common = [
        sys.executable, "-m", "jobs.annotate", "--input", f"s3://{prefix}/",
        "--output", "s3://annotations/security-run/", "--checkpoint", "s3://models/security-tiny.pth",
        "--storage-options", json.dumps(s3.storage_options), "--points-per-side", "2",
        "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--num-actors", "1", "--no-progress",
    ]
    try:
        job = subprocess.run(common, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        assert job.returncode == 0, job.stderr[-3000:]
        refused_args = [a.replace("annotations/security-run/", "annotations/security-refused/") for a in common]
        refused = subprocess.run(refused_args + ["--checkpoint-sha256", "0" * 64], env=env,
                                 cwd=REPO_ROOT, capture_output=True, text=True)
        assert refused.returncode != 0 and "sha256" in refused.stderr
        ray_logs = {str(p): p.read_bytes() for p in ray_tmp.rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log")}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert any("worker" in path for path in ray_logs), "no Ray worker logs: nothing was checked there"
    fs.invalidate_cache()
    outputs = {path: fs.cat_file(path) for path in fs.find("annotations/security-run/")}
    rows = pq.read_table("annotations/security-run/", filesystem=fs).to_pylist()
    assert sorted(r["status"] for r in rows) == ["error", "error", "ok"]
    assert any(path.endswith("_run.json") for path in outputs)
    places = {"stdout": job.stdout, "stderr": job.stderr, "refused stderr": refused.stderr + refused.stdout}
    places.update({path: data.decode("utf-8", "replace") for path, data in outputs.items()})
    places.update({path: data.decode("utf-8", "replace") for path, data in ray_logs.items()})
    leaks = [(place, secret) for place, text in places.items() for secret in secrets if secret in text]
    assert not leaks, leaks
