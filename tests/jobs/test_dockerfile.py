"""The Dockerfile's steps, tested without a docker daemon (none is available where this runs).

What a build would do is done here piece by piece, offline:
- FROM with its build args resolves to Ray's image for rayjob.yaml's rayVersion, a Ray that the
  project's own requirement accepts, for each VARIANT;
- the torch step's shell runs for each VARIANT with `pip` replaced by a recorder: which index,
  which package (unpinned), a wrong VARIANT refused;
- the COPY lines, with .dockerignore applied, are carried out into a temporary directory; that
  tree is built into a wheel (Requires-Dist = pyproject's dependencies; every module and the
  package data inside), the wheel's `python -m jobs.annotate` runs, and the project step's pip
  command, recorded the same way, is replayed as `pip install --dry-run --no-index`, which
  resolves the project's dependencies against this environment;
- every image rayjob.yaml names is the tag the Dockerfile documents, with pyproject's version.
Pulling the base image and downloading CUDA torch cannot be tested offline.
"""
import email.parser
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RAYJOB = REPO / "jobs" / "k8s" / "rayjob.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = ("sam_core", "pipeline", "jobs")


# --- a small Dockerfile parser ---

def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, `\\` continuations joined."""
    found, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment line inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        found.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def substitute(value: str, variables: dict) -> str:
    """Docker's ${VAR}, $VAR and ${VAR:-default} in FROM, COPY, WORKDIR."""
    def one(m):
        name, default = m.group(1) or m.group(3), m.group(2)
        got = variables.get(name, "")
        return got if got or default is None else default
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", one, value)


class Build:
    """The Dockerfile's single stage as `docker build --build-arg ...` would see it."""

    def __init__(self, build_args: dict | None = None):
        self.build_args = build_args or {}
        self.steps = instructions(DOCKERFILE.read_text())
        global_args, self.stage, seen_from = {}, [], False
        for keyword, args in self.steps:
            if keyword == "FROM":
                assert not seen_from, "one stage expected"
                seen_from = True
            if not seen_from:
                assert keyword == "ARG", f"{keyword} before FROM"
                name, _, default = args.partition("=")
                global_args[name] = self.build_args.get(name, default)
            elif keyword != "FROM":
                self.stage.append((keyword, args))
        self.global_args = global_args
        (self.from_line,) = [a for k, a in self.steps if k == "FROM"]

    @property
    def base_image(self) -> str:
        return substitute(self.from_line.split()[0], self.global_args)

    def env_at(self, index: int) -> dict:
        """The build args a RUN at stage position `index` sees (a bare ARG takes the global default)."""
        env = {}
        for keyword, args in self.stage[:index]:
            if keyword == "ARG":
                name, eq, default = args.partition("=")
                if name in self.build_args:
                    env[name] = self.build_args[name]
                elif eq:
                    env[name] = default
                elif name in self.global_args:
                    env[name] = self.global_args[name]
        return env

    def runs(self) -> list[tuple[int, str]]:
        return [(i, a) for i, (k, a) in enumerate(self.stage) if k == "RUN"]

    def run_with_pip_recorded(self, index: int, tmp_path: Path, cwd: Path | None = None):
        """Run the RUN at `index` in /bin/sh -c, as docker does, with a `pip` that only records its arguments."""
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
        pip = bindir / "pip"
        pip.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            "open(os.environ['PIP_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        )
        pip.chmod(0o755)
        log = tmp_path / "pip.log"
        log.write_text("")
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "PIP_LOG": str(log), **self.env_at(index)}
        done = subprocess.run(["/bin/sh", "-c", self.stage[index][1]], env=env, cwd=cwd or tmp_path,
                              capture_output=True, text=True, timeout=30)
        return done, [json.loads(line) for line in log.read_text().splitlines()]

    def workdirs_and_copies(self):
        """(WORKDIR at that point, flags, sources, destination) per COPY, in order."""
        workdir, copies = "/", []
        for index, (keyword, args) in enumerate(self.stage):
            variables = {**self.global_args, **self.env_at(index)}
            if keyword == "WORKDIR":
                workdir = os.path.join(workdir, substitute(args, variables))
            elif keyword in ("COPY", "ADD"):
                assert keyword == "COPY", "ADD fetches and unpacks: COPY expected"
                words = shlex.split(substitute(args, variables))
                flags = [w for w in words if w.startswith("--")]
                *sources, dest = [w for w in words if not w.startswith("--")]
                copies.append((workdir, flags, sources, dest))
        return copies


def torch_run(build: Build) -> int:
    (index,) = [i for i, a in build.runs() if re.search(r"\btorch\b", a)]
    return index


def project_run(build: Build) -> int:
    (index,) = [i for i, a in build.runs() if not re.search(r"\btorch\b", a) and "pip install" in a]
    return index


def project_dir(build: Build) -> str:
    """Where in the image the project step's pip finds the project (its path argument, from its WORKDIR)."""
    index = project_run(build)
    workdir = [w for k, w in build.stage[:index] if k == "WORKDIR"][-1]
    (path,) = [w for w in shlex.split(build.stage[index][1]) if w.startswith((".", "/"))]
    return os.path.normpath(os.path.join(workdir, path))


def rayjob_images() -> list[str]:
    rayjob = yaml.safe_load(RAYJOB.read_text())
    spec = rayjob["spec"]
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]]
    pods += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    pods += [spec["submitterPodTemplate"]]
    return [c["image"] for pod in pods for c in pod["spec"]["containers"]]


def requirement(name: str) -> Requirement:
    (found,) = [Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == name]
    return found


# --- .dockerignore, as docker reads it ---

def ignore_patterns() -> list[str]:
    lines = [l.strip() for l in DOCKERIGNORE.read_text().splitlines()]
    return [l.lstrip("/") for l in lines if l and not l.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is left out if it or a directory above it matches; the last match wins."""
    parts = path.split("/")
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            verdict = not negate
    return verdict


def test_the_dockerignore_matcher_itself():
    patterns = ["**/__pycache__", "*.egg-info", ".venv", "tests"]
    assert ignored("jobs/__pycache__/x.pyc", patterns) and ignored("__pycache__/a", patterns)
    assert ignored("sam_annotate.egg-info/PKG-INFO", patterns) and ignored("tests/jobs/test_x.py", patterns)
    assert not ignored("jobs/annotate.py", patterns) and not ignored("jobs/tests.py", patterns)
    assert not ignored("x/tests/a", ["tests"]) and ignored("x/tests/a", ["**/tests"])
    assert not ignored("tests/keep", ["tests", "!tests/keep"])


def assemble(build: Build, root: Path) -> None:
    """Carry out the COPY lines: context = the repository less .dockerignore, image = `root`."""
    patterns = ignore_patterns()
    for workdir, _, sources, dest in build.workdirs_and_copies():
        target = Path(os.path.join(workdir, dest))
        for source in sources:
            assert not ignored(source, patterns), f".dockerignore leaves out {source}, which COPY needs"
            src = REPO / source
            assert src.exists(), f"COPY {source}: not in the build context"
            if src.is_dir():  # docker copies a directory's contents into the destination
                for f in sorted(src.rglob("*")):
                    rel = f.relative_to(REPO).as_posix()
                    if f.is_file() and not ignored(rel, patterns):
                        out = root / target.relative_to("/") / f.relative_to(src)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, out)
            else:
                into_dir = dest.endswith("/") or len(sources) > 1
                out = root / target.relative_to("/") / (src.name if into_dir else "")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)


def package_files() -> set[str]:
    """What the wheel must hold: every module of the packages, and the package data pyproject names."""
    patterns = ignore_patterns()
    files = set()
    for package in PACKAGES:
        for f in (REPO / package).rglob("*.py"):
            rel = f.relative_to(REPO).as_posix()
            if not ignored(rel, patterns):
                files.add(rel)
    for package, globs in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in globs:
            files |= {f.relative_to(REPO).as_posix() for f in (REPO / package).glob(pattern) if f.is_file()}
    return files


# --- tests ---

def test_the_parser_reads_the_dockerfile():
    build = Build()
    keywords = {k for k, _ in build.steps}
    assert keywords <= {"ARG", "FROM", "LABEL", "RUN", "WORKDIR", "COPY", "ENV", "USER"}
    assert [k for k, _ in build.steps].count("FROM") == 1
    assert {"RAY_VERSION", "PYTHON_VERSION", "VARIANT"} <= build.global_args.keys()
    # the parser joins continued lines: the torch step is one instruction, its `case` whole
    run = build.stage[torch_run(build)][1]
    assert "case" in run and "esac" in run and "pip install" in run


def test_the_base_image_is_rays_own_for_the_rayjobs_ray_version():
    rayjob = yaml.safe_load(RAYJOB.read_text())
    ray_version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    build = Build()
    # Ray's tags: {Ray version}-py{3XY}-{cpu|gpu|cuXX}; gpu is the default here
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cpu)", build.base_image)
    assert m, build.base_image
    assert build.base_image == f"rayproject/ray:{ray_version}-py311-gpu"
    assert m.group(1) == ray_version == build.global_args["RAY_VERSION"]
    # the project's own requirement accepts that Ray, and that Python
    assert Version(ray_version) in requirement("ray").specifier
    assert "data" in requirement("ray").extras
    assert Version(f"3.{m.group(2)}") in SpecifierSet(PROJECT["requires-python"])


def test_build_args_pick_the_cpu_base_and_other_versions():
    assert Build({"VARIANT": "cpu"}).base_image == "rayproject/ray:2.60.0-py311-cpu"
    assert Build({"RAY_VERSION": "2.61.0", "PYTHON_VERSION": "py312"}).base_image == "rayproject/ray:2.61.0-py312-gpu"


@pytest.mark.parametrize(
    "build_args, index_url",
    [
        ({}, "https://download.pytorch.org/whl/cu130"),
        ({"VARIANT": "cpu"}, "https://download.pytorch.org/whl/cpu"),
        ({"TORCH_CUDA": "cu128"}, "https://download.pytorch.org/whl/cu128"),
        ({"VARIANT": "cpu", "TORCH_INDEX_URL": "https://mirror.example/whl/cpu"}, "https://mirror.example/whl/cpu"),
    ],
)
def test_the_torch_step_installs_unpinned_torch_from_the_chosen_index(tmp_path, build_args, index_url):
    build = Build(build_args)
    done, calls = build.run_with_pip_recorded(torch_run(build), tmp_path)
    assert done.returncode == 0, done.stderr
    assert calls == [["install", "--no-cache-dir", "torch", "--index-url", index_url]]
    assert not Requirement("torch").specifier  # unpinned: the index's newest build


def test_a_wrong_variant_stops_the_build_before_pip(tmp_path):
    build = Build({"VARIANT": "rocm"})
    done, calls = build.run_with_pip_recorded(torch_run(build), tmp_path)
    assert done.returncode != 0 and "VARIANT must be gpu or cpu" in done.stderr
    assert calls == []


def test_torch_comes_before_the_project_so_pip_keeps_it():
    build = Build()
    assert torch_run(build) < project_run(build)
    first_copy = min(i for i, (k, _) in enumerate(build.stage) if k == "COPY")
    assert torch_run(build) < first_copy  # and a source change does not redownload torch


def test_the_project_step_installs_the_copied_project_without_extras_and_keeps_rays_version(tmp_path):
    build = Build()
    done, calls = build.run_with_pip_recorded(project_run(build), tmp_path)
    assert done.returncode == 0, done.stderr
    (call,) = calls
    assert call[:2] == ["install", "--no-cache-dir"]
    paths = [a for a in call[2:] if a.startswith((".", "/"))]
    (path,) = paths
    assert "[" not in path  # no test (or any) extra
    copied = {os.path.normpath(os.path.join(w, d, s if d.endswith("/") else "")) for w, _, ss, d in
              build.workdirs_and_copies() for s in ss if s == "pyproject.toml"}
    assert copied == {os.path.join(project_dir(build), "pyproject.toml")}
    (ray,) = [Requirement(a) for a in call[2:] if a not in paths]
    assert ray.name == "ray" and {"default", "data"} <= ray.extras
    assert str(ray.specifier) == f"=={build.global_args['RAY_VERSION']}"
    assert Version(build.global_args["RAY_VERSION"]) in requirement("ray").specifier


def test_the_copies_take_the_project_owned_by_rays_user(tmp_path):
    build = Build()
    copies = build.workdirs_and_copies()
    sources = [s for _, _, ss, _ in copies for s in ss]
    readme = PROJECT["readme"]
    assert sorted(sources) == sorted(["pyproject.toml", readme, *PACKAGES])
    assert all("--chown=ray:users" in flags for _, flags, _, _ in copies)
    for workdir, _, ss, dest in copies:  # a directory goes to a directory of its own name
        for s in ss:
            if (REPO / s).is_dir():
                assert len(ss) == 1 and Path(dest).name == s
    assemble(build, tmp_path / "image")
    project = tmp_path / "image" / project_dir(build).lstrip("/")
    got = {f.relative_to(project).as_posix() for f in project.rglob("*") if f.is_file()}
    assert package_files() | {"pyproject.toml", readme} <= got
    assert not {f for f in got if "__pycache__" in f or f.endswith(".pyc")}
    for excluded in (".venv", ".git", "tests", "bench", "docs", "demo-output", "sam_annotate.egg-info"):
        assert ignored(excluded, ignore_patterns()), excluded


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The COPY lines carried out, and that tree built into a wheel, offline, as `pip install .` would."""
    tmp = tmp_path_factory.mktemp("image")
    build = Build()
    assemble(build, tmp)
    project = tmp / project_dir(build).lstrip("/")
    wheels = tmp / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "-w", str(wheels), str(project)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = wheels.glob("*.whl")
    return tmp, project, wheel


def test_the_wheel_requires_exactly_pyprojects_dependencies(built):
    _, _, wheel = built
    assert wheel.name.startswith(f"sam_annotate-{PROJECT['version']}-")
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(z.read(meta).decode())
    runtime = [Requirement(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r]
    key = lambda r: (r.name, tuple(sorted(r.extras)), str(r.specifier))
    assert sorted(map(key, runtime)) == sorted(key(Requirement(r)) for r in PROJECT["dependencies"])
    assert metadata["Version"] == PROJECT["version"]


def test_the_wheel_holds_every_module_and_the_k8s_yaml(built):
    _, _, wheel = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    missing = package_files() - names
    assert not missing, f"left out of the wheel: {sorted(missing)[:10]}"
    assert {"jobs/k8s/rayjob.yaml", "jobs/runtime_env.yaml"} <= names
    assert any(fnmatch.fnmatch(n, "jobs/samples/*.jpg") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    assert "sam-annotate = jobs.annotate:main" in entry_points


def test_the_installed_wheel_runs_the_rayjob_entrypoint(built, tmp_path):
    _, _, wheel = built
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=60)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import jobs, pipeline, sam_core; print(jobs.__file__, pipeline.__file__, sam_core.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(str(site)) for p in where.stdout.split()), where.stdout
    entrypoint = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "jobs.annotate"]
    helped = subprocess.run([sys.executable, "-m", "jobs.annotate", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--checkpoint" in helped.stdout, helped.stderr


def test_the_project_steps_pip_command_resolves_offline_as_a_dry_run(built, tmp_path):
    tmp, project, _ = built
    build = Build()
    _, (call,) = build.run_with_pip_recorded(project_run(build), tmp_path)
    path = next(a for a in call if a.startswith((".", "/")))
    # The recorded command, replayed on the copied tree. The ray pin is left out here (checked
    # against pyproject above): this environment's Ray need not be the image's, nor have `default`.
    args = [a for a in call if a in ("install", path) or a.startswith("--")]
    assert args == ["install", "--no-cache-dir", path]
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--dry-run", "--no-index", "--no-build-isolation"],
        cwd=tmp / [w for k, w in build.stage[:project_run(build)] if k == "WORKDIR"][-1].lstrip("/"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"Would install sam-annotate-{PROJECT['version']}" in done.stdout


def test_every_image_in_the_rayjob_is_the_one_the_dockerfile_builds():
    text = DOCKERFILE.read_text()
    tags = dict(re.findall(r"docker build (?:--build-arg (VARIANT=\w+) )?-t (\S+) \.", text))
    gpu, cpu = tags[""], tags["VARIANT=cpu"]
    name, _, version = gpu.rpartition(":")
    assert version == PROJECT["version"] and cpu == f"{gpu}-cpu"
    assert re.search(rf'org\.opencontainers\.image\.version="{re.escape(PROJECT["version"])}"', text)
    assert f"docker push {gpu}" in text
    images = rayjob_images()
    assert len(images) >= 3 and set(images) == {gpu}
    # the how-to in rayjob.yaml's and the README's comments name the same image
    for doc in (RAYJOB, REPO / "README.md"):
        named = re.findall(r"docker (?:build[^\n]*? -t|push) (\S+)", doc.read_text())
        assert named and set(named) <= {gpu, cpu}, (doc.name, named)
