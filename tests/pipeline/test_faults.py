"""Faults that a test can afford: every input keeps exactly one row.

- an annotator actor killed (SIGKILL) in the middle of a batch;
- the driver killed in the middle of a unit, then the same command rerun;
- a worker node lost mid-run on a head-plus-two-workers ``ray.cluster_utils.Cluster``;
- the model failing to load: missing, corrupt, wrong format, wrong sha256 (on the driver,
  before any image), and failing inside the actors (the job stops with the message);
- a batch made only of objects that vanished (all-null columns through Ray Data).

The annotate stage is the pipeline's own stand-in generator where the model does not matter,
so these tests exercise Ray Data, the read/decode stages and the sink, not SAM.
S3 server restarts are in ``bench/fault_injection.py`` (too slow for the suite).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import AnnotateConfig
from pipeline.run import run
from pipeline.output.sink import DATA_FILE
from tests.pipeline.bad_inputs import jpeg, photo
from tests.pipeline.faulty_stages import BrokenModelAnnotator, CrashingAnnotator
from tests.pipeline.standin import StandInAnnotator

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_images(folder: Path, count: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        path.write_bytes(jpeg(photo(24 + i % 5, 16 + i % 3, seed=i)))
        paths.append(str(path))
    return paths


def read_rows(output: Path) -> list:
    shards = sorted(p for p in output.iterdir() if DATA_FILE.match(p.name))
    return [row for shard in shards for row in pq.read_table(shard).to_pylist()]


def config_for(tmp_path: Path, **overrides) -> AnnotateConfig:
    values = dict(
        input=str(tmp_path / "images"),
        output=str(tmp_path / "out"),
        checkpoint="unused-by-stand-in",
        num_actors=1,
        batch_size=2,
        rows_per_file=4,
        unit_size=8,
    )
    values.update(overrides)
    return AnnotateConfig(**values)


def test_annotator_actor_killed_mid_run_loses_and_duplicates_nothing(ray_session, tmp_path):
    inputs = write_images(tmp_path / "images", 16)
    config = config_for(tmp_path)
    marker = tmp_path / "crashed"
    stage = (CrashingAnnotator, {"config": config.to_dict(), "crash_marker": str(marker)})
    summary = run(config, progress=False, stage=stage)
    assert marker.exists(), "the actor was never killed: the test proved nothing"
    uris = [row["uri"] for row in read_rows(tmp_path / "out")]
    assert sorted(uris) == sorted(inputs)  # rows equal inputs, no duplicates
    assert summary.ok == len(inputs) and summary.failed == 0


DRIVER = textwrap.dedent(
    """
    import os, sys, ray
    from pipeline.config import AnnotateConfig
    from pipeline.run import run
    from tests.pipeline.faulty_stages import SlowAnnotator

    ray.init(num_cpus=2, num_gpus=0, object_store_memory=128 * 1024 * 1024, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("PYTHONPATH", "SLOW_ANNOTATOR_S", "OMP_NUM_THREADS",
                                                                  "HOLD_UNTIL_COMMITTED") if k in os.environ}})
    config = AnnotateConfig(input=sys.argv[1], output=sys.argv[2], checkpoint="unused", num_actors=1,
                            batch_size=2, rows_per_file=int(os.environ.get("ROWS_PER_FILE", "4")),
                            unit_size=int(os.environ.get("UNIT_SIZE", "8")))
    summary = run(config, progress=False, stage=(SlowAnnotator, {"config": config.to_dict()}))
    print("SUMMARY", summary.units_done_before, summary.ok, summary.failed, flush=True)
    """
)


def start_driver(tmp_path: Path, slow_s: float, script: str = DRIVER, **sizes: int) -> subprocess.Popen:
    """``sizes``: ``UNIT_SIZE``, ``ROWS_PER_FILE`` (and ``HOLD_UNTIL_COMMITTED``) for ``DRIVER``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SLOW_ANNOTATOR_S": str(slow_s), "OMP_NUM_THREADS": "1",
           **{name: str(value) for name, value in sizes.items()}}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "images"), str(tmp_path / "out")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: Ray's processes go with it below
    )


def run_driver(tmp_path: Path, slow_s: float, script: str = DRIVER, **sizes: int) -> str:
    """Run a driver script to its end; its output (it must exit 0)."""
    job = start_driver(tmp_path, slow_s, script, **sizes)
    try:
        log, _ = job.communicate()
    finally:
        stop_group(job)
    assert job.returncode == 0, log[-3000:]
    return log


def printed(log: str, tag: str) -> list:
    """The words of the line the driver printed starting with ``tag``."""
    return next(line for line in log.splitlines() if line.startswith(tag)).split()


def stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def uncommitted_files(out: Path) -> list:
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    return [p for p in out.iterdir() if DATA_FILE.match(p.name) and DATA_FILE.match(p.name)["unit"] not in committed]


def test_driver_killed_in_the_middle_of_a_unit_then_rerun_completes_the_rest(tmp_path):
    inputs = write_images(tmp_path / "images", 40)  # 5 units of 8 images, files of at most 4 rows
    out = tmp_path / "out"
    first = start_driver(tmp_path, slow_s=0.4)
    try:
        # Kill once a unit is committed and the next one has a file written but no commit record.
        while first.poll() is None and not (list((out / "_commits").glob("*.json")) and uncommitted_files(out)):
            time.sleep(0.05)
        assert first.poll() is None, f"the first run ended before it could be killed:\n{first.stdout.read()}"
        os.kill(first.pid, signal.SIGKILL)  # the driver only, as a lost head node would
    finally:
        stop_group(first)

    committed_before = len(list((out / "_commits").glob("*.json")))
    stale = uncommitted_files(out)
    assert 1 <= committed_before < 5 and stale
    assert not (out / "_SUCCESS").exists()
    rows_in_committed = len(read_rows(out)) - sum(pq.read_metadata(p).num_rows for p in stale)

    log = run_driver(tmp_path, slow_s=0.0)
    done_before, ok, failed = map(int, printed(log, "SUMMARY")[1:])
    assert done_before == committed_before and ok == len(inputs) - rows_in_committed and failed == 0

    uris = [row["uri"] for row in read_rows(out)]
    assert sorted(uris) == sorted(inputs)  # the stale half unit was replaced, not duplicated
    assert len(list((out / "_commits").glob("*.json"))) == 5
    assert (out / "_SUCCESS").exists()


def test_driver_killed_after_the_first_ramp_unit_then_rerun_does_the_rest_once(tmp_path):
    """The first unit (16 of 48 images) commits while the run goes on, though files hold 256 rows."""
    inputs = write_images(tmp_path / "images", 48)  # units [0, 16) (the ramp), [16, 32), [32, 48)
    out = tmp_path / "out"
    # The later units wait for a commit record: the first one can commit only if it is written on its own.
    first = start_driver(tmp_path, slow_s=0.3, UNIT_SIZE=32, ROWS_PER_FILE=256,
                         HOLD_UNTIL_COMMITTED=str(out / "_commits"))
    try:
        while first.poll() is None and not list((out / "_commits").glob("*.json")):
            time.sleep(0.05)
        committed = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
        assert first.poll() is None, f"the first run ended before any commit was seen:\n{first.stdout.read()}"
        os.kill(first.pid, signal.SIGKILL)
    finally:
        stop_group(first)
    assert [(c["start"], c["stop"], c["rows"]) for c in committed] == [(0, 16, 16)]
    assert not (out / "_SUCCESS").exists()

    log = run_driver(tmp_path, slow_s=0.0, UNIT_SIZE=32, ROWS_PER_FILE=256)
    done_before, ok, failed = map(int, printed(log, "SUMMARY")[1:])
    assert done_before >= 1 and failed == 0
    uris = [row["uri"] for row in read_rows(out)]
    assert sorted(uris) == sorted(inputs)  # the killed run's later units were redone, not duplicated
    records = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    spans = sorted((record["start"], record["stop"]) for record in records)
    assert spans[0] == (0, 16) and spans[-1][1] == 48 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert (out / "_SUCCESS").exists()


NODE_LOSS_DRIVER = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.config import AnnotateConfig
    from pipeline.run import run
    from tests.pipeline.faulty_stages import SlowAnnotator

    images, out = sys.argv[1], sys.argv[2]
    env = {k: os.environ[k] for k in ("PYTHONPATH", "SLOW_ANNOTATOR_S", "OMP_NUM_THREADS")}
    store = 80 * 2**20
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "object_store_memory": store, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=store) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    config = AnnotateConfig(input=images, output=out, checkpoint="unused", num_actors=2, batch_size=2,
                            rows_per_file=4, unit_size=8)

    def lose_a_worker_after_the_first_commit():
        while not list(Path(out, "_commits").glob("*.json")):
            time.sleep(0.05)
        done = len(list(Path(out, "_commits").glob("*.json")))
        cluster.remove_node(workers[0])  # as a preempted node goes: its actor, tasks and objects with it
        print("REMOVED after", done, "commits", flush=True)

    threading.Thread(target=lose_a_worker_after_the_first_commit, daemon=True).start()
    summary = run(config, progress=False, stage=(SlowAnnotator, {"config": config.to_dict()}))
    print("SUMMARY", summary.units_committed, summary.units_planned, summary.ok, summary.failed, flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_a_worker_node_lost_mid_run_and_the_run_finishes_by_itself(tmp_path):
    """Head plus two worker nodes on this machine (ray.cluster_utils.Cluster); one is removed mid-run."""
    inputs = write_images(tmp_path / "images", 96)  # 12 units
    log = run_driver(tmp_path, slow_s=0.4, script=NODE_LOSS_DRIVER)
    assert int(printed(log, "REMOVED")[2]) < 12, "the node was removed after the run had committed everything"
    assert list(map(int, printed(log, "SUMMARY")[1:])) == [12, 12, len(inputs), 0]
    uris = [row["uri"] for row in read_rows(tmp_path / "out")]
    assert sorted(uris) == sorted(inputs)  # rows = inputs, no duplicates
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_batch_of_only_vanished_objects_still_gives_one_clean_row_each(ray_session, tmp_path):
    manifest = tmp_path / "inputs.txt"
    gone = [str(tmp_path / "images" / f"gone_{i}.jpg") for i in range(5)]
    manifest.write_text("\n".join(gone) + "\n")
    config = config_for(tmp_path, input=str(manifest))
    run(config, progress=False, stage=(StandInAnnotator, {"config": config.to_dict()}))
    rows = read_rows(tmp_path / "out")
    assert sorted(r["uri"] for r in rows) == sorted(gone)
    for row in rows:
        assert row["status"] == "error" and "not found" in row["error"]
        assert row["image_sha256"] is None  # never read: null, not the text "nan"
        assert row["width"] is None and row["num_masks"] == 0


def test_model_failing_inside_the_actors_stops_the_job_with_its_message(ray_session, tmp_path):
    write_images(tmp_path / "images", 4)
    config = config_for(tmp_path)
    with pytest.raises(Exception, match="truncated download"):
        run(config, progress=False, stage=(BrokenModelAnnotator, {"config": config.to_dict()}))
    assert not list((tmp_path / "out").glob("part-*.parquet"))
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.sam_factory import make_official_sam, save_official_checkpoint

    return save_official_checkpoint(make_official_sam(seed=1), tmp_path_factory.mktemp("model") / "tiny.pth")


def _bad_checkpoints(folder: Path, good: Path) -> dict:
    folder.mkdir(exist_ok=True)
    data = good.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 3])
    (folder / "photo.pth").write_bytes(jpeg(photo()))
    (folder / "text.pth").write_text("<html>404 Not Found</html>\n")
    return {
        "missing": str(folder / "nowhere" / "sam_vit_b.pth"),
        "truncated": str(folder / "truncated.pth"),
        "not a checkpoint": str(folder / "photo.pth"),
        "text": str(folder / "text.pth"),
    }


@pytest.mark.parametrize("kind", ["missing", "truncated", "not a checkpoint", "text"])
def test_model_that_cannot_load_fails_fast_before_any_image(ray_session, tmp_path, tiny_checkpoint, kind):
    from sam_core import CheckpointError

    write_images(tmp_path / "images", 3)
    checkpoint = _bad_checkpoints(tmp_path / "models", Path(tiny_checkpoint))[kind]
    with pytest.raises(CheckpointError) as info:
        run(config_for(tmp_path, checkpoint=checkpoint), progress=False)
    message = str(info.value)
    assert Path(checkpoint).name in message or "nowhere" in message
    # Failed before the plan ran: nothing written, not even a manifest.
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_checkpoint_sha256_fails_fast_before_any_image(ray_session, tmp_path, tiny_checkpoint):
    from sam_core import CheckpointError

    write_images(tmp_path / "images", 3)
    config = config_for(tmp_path, checkpoint=str(tiny_checkpoint), checkpoint_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="sha256"):
        run(config, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_overwrite_with_a_model_that_cannot_load_keeps_the_existing_output(ray_session, tmp_path, tiny_checkpoint):
    """Failing fast means before any side effect: --overwrite must not wipe the last good run first."""
    from sam_core import CheckpointError

    inputs = write_images(tmp_path / "images", 3)
    config = config_for(tmp_path)
    run(config, progress=False, stage=(StandInAnnotator, {"config": config.to_dict()}))
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(read_rows(tmp_path / "out")) == len(inputs)

    broken = _bad_checkpoints(tmp_path / "models", Path(tiny_checkpoint))["truncated"]
    with pytest.raises(CheckpointError):
        run(config_for(tmp_path, checkpoint=broken, overwrite=True), progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert len(read_rows(tmp_path / "out")) == len(inputs)


# --- pipeline.retry: the backoff helper for object-store calls -------------------------------

class Flaky:
    """Fails with ``error`` for the first ``failures`` calls, then returns "done"."""

    def __init__(self, failures: int, error: BaseException):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_transient_errors_are_retried_with_growing_backoff():
    from pipeline.retry import with_retries

    slept = []
    call = Flaky(3, ConnectionError("Could not connect to the endpoint URL"))
    assert with_retries(call, what="writing a shard", attempts=5, first_backoff_s=0.5, sleep=slept.append) == "done"
    assert call.calls == 4 and slept == [0.5, 1.0, 2.0]


def test_permanent_errors_are_raised_at_once():
    from pipeline.retry import with_retries

    slept = []
    call = Flaky(1, FileNotFoundError("s3://bucket/gone.jpg"))
    with pytest.raises(FileNotFoundError):
        with_retries(call, what="reading", sleep=slept.append)
    assert call.calls == 1 and slept == []


def test_exhausted_retries_say_what_failed_without_credentials(monkeypatch):
    from pipeline.retry import RetriesExhausted, with_retries

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "retry-test-secret-value")
    slept = []
    call = Flaky(10, OSError("503 Slow Down for key retry-test-secret-value"))
    with pytest.raises(RetriesExhausted) as info:
        with_retries(call, what="writing s3://out/part-0001-000000.parquet", attempts=4,
                     first_backoff_s=1.0, max_backoff_s=2.0, sleep=slept.append)
    message = str(info.value)
    assert call.calls == 4 and slept == [1.0, 2.0, 2.0]
    assert "part-0001-000000.parquet" in message and "failed 4 times" in message and "503" in message
    assert "retry-test-secret-value" not in message
    assert isinstance(info.value.__cause__, OSError)


class FlakyFilesystem:
    """Wraps an fsspec filesystem; each listed method fails once, as calls to a restarting S3 do."""

    def __init__(self, fs, flaky=("exists", "makedirs", "open", "ls", "info")):
        self._fs, self._pending = fs, set(flaky)
        self.failures = []

    def __getattr__(self, name):
        attribute = getattr(self._fs, name)
        if name not in self._pending or not callable(attribute):
            return attribute

        def once_failing(*args, **kwargs):
            if name in self._pending:
                self._pending.discard(name)
                self.failures.append(name)
                raise ConnectionError(f"Could not connect to the endpoint URL (during {name})")
            return attribute(*args, **kwargs)

        return once_failing


def test_shard_write_survives_a_store_that_drops_every_kind_of_call_once():
    """What an S3 restart looks like to the sink: each call it makes may fail once, then work."""
    import pyarrow as pa
    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.output.sink import Output

    store = MemoryFileSystem()  # process-wide: a fresh root per call keeps tests apart
    root = f"memory://fault-test-{os.getpid()}-{time.monotonic_ns()}/out"
    output = Output(root)
    output.fs = FlakyFilesystem(store)
    table = pa.table({"uri": ["s3://b/a.jpg", "s3://b/b.jpg"], "status": ["ok", "error"]})
    output.write_table(table, "part-txt-0123456789ab-0-8-000000-0123abcd.parquet")
    assert output.fs.failures, "no call failed: the test proved nothing"
    with store.open(output.path("part-txt-0123456789ab-0-8-000000-0123abcd.parquet"), "rb") as handle:
        assert pq.read_table(handle).to_pylist() == table.to_pylist()
    store.rm(root.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)
