"""Annotate stages that fail on purpose, for the fault tests.

They live in an importable module (not a test file) because Ray workers unpickle them by
module name: ``tests.pipeline.faulty_stages`` resolves on a worker, a pytest-imported test
module does not.
"""
import os
import signal
import time

from pipeline.output.schema import STATUS_SKIP
from tests.pipeline.standin import StandInAnnotator


class CrashingAnnotator(StandInAnnotator):
    """Kills its own process with SIGKILL on its ``crash_on_call``-th batch, once per marker file."""

    def __init__(self, config: dict, crash_marker: str, crash_on_call: int = 3):
        super().__init__(config)
        self.crash_marker = crash_marker
        self.crash_on_call = crash_on_call
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.crash_on_call:
            try:
                os.close(os.open(self.crash_marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass  # already crashed once: this incarnation works normally
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


class SlowAnnotator(StandInAnnotator):
    """The stand-in, slowed down so that a driver can be killed while shards are being written.

    Slow on images only, as a model is: a batch of skipped rows (the read stage's flush rows)
    costs it nothing. With ``HOLD_UNTIL_COMMITTED`` (a ``_commits`` folder), images of every unit
    but the first (start 0) wait until a commit record is there (at most ``HOLD_MAX_S``), so that
    a test can tell "the first unit committed while the rest was still to do" by order alone: an
    actor runs several batches at once in threads, so sleeps alone do not order the units.
    """

    def __call__(self, batch):
        images = batch["status"] != STATUS_SKIP
        if images.any():
            time.sleep(float(os.environ.get("SLOW_ANNOTATOR_S", "0")))
            commits = os.environ.get("HOLD_UNTIL_COMMITTED")
            later = any(str(unit).split("-")[2] != "0" for unit in batch["unit"][images])  # <kind>-<hash>-<start>-
            deadline = time.monotonic() + float(os.environ.get("HOLD_MAX_S", "60"))
            while commits and later and not _has_commit(commits) and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().__call__(batch)


def _has_commit(folder: str) -> bool:
    return os.path.isdir(folder) and any(name.endswith(".json") for name in os.listdir(folder))


class BrokenModelAnnotator(StandInAnnotator):
    """An actor whose model cannot load where it runs (e.g. checkpoint unreachable from workers)."""

    def __init__(self, config: dict):
        raise RuntimeError("cannot load checkpoint s3://models/tiny.pth: truncated download (12 of 900 bytes)")
