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
    costs it nothing.
    """

    def __call__(self, batch):
        if (batch["status"] != STATUS_SKIP).any():
            time.sleep(float(os.environ.get("SLOW_ANNOTATOR_S", "0")))
        return super().__call__(batch)


class BrokenModelAnnotator(StandInAnnotator):
    """An actor whose model cannot load where it runs (e.g. checkpoint unreachable from workers)."""

    def __init__(self, config: dict):
        raise RuntimeError("cannot load checkpoint s3://models/tiny.pth: truncated download (12 of 900 bytes)")
