"""Read stage: bytes per URI, a reason instead of an exception, retries only for transient errors."""
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import read


class FlakyMemoryFileSystem(MemoryFileSystem):
    """In-memory store whose first `failures` reads raise a connection error."""

    protocol = "flakymem"
    failures = 0
    calls = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol("memory://" + path.removeprefix("flakymem://"))

    def cat_file(self, path, start=None, end=None, **kwargs):
        type(self).calls += 1
        if type(self).calls <= type(self).failures:
            raise ConnectionError("connection reset by peer")
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    import fsspec

    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    monkeypatch.setattr(read, "FIRST_BACKOFF_S", 0.0)
    fs = FlakyMemoryFileSystem()
    fs.pipe("/bucket/a.jpg", b"abc")
    FlakyMemoryFileSystem.calls = 0
    yield FlakyMemoryFileSystem
    fs.rm("/bucket", recursive=True)


def test_a_batch_gets_bytes_and_reasons_row_by_row(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8data")
    batch = {"uri": np.array([str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")], dtype=object)}
    out = read.read_batch(batch)
    assert list(out["bytes"]) == [b"\xff\xd8data", b""]
    assert out["read_error"][0] == ""
    assert "not found" in out["read_error"][1]
    assert list(out["uri"]) == list(batch["uri"]) and (out["read_s"] >= 0).all()


def test_transient_errors_are_retried_then_succeed(flaky):
    flaky.failures = read.RETRIES
    assert read.read_object("flakymem://bucket/a.jpg", {}) == (b"abc", None)
    assert flaky.calls == read.RETRIES + 1


def test_persistent_errors_become_a_reason_after_the_last_retry(flaky):
    flaky.failures = read.RETRIES + 1
    data, reason = read.read_object("flakymem://bucket/a.jpg", {})
    assert data is None and "failed 4 times" in reason and "ConnectionError" in reason
