"""Read stage: bytes per URI, a reason instead of an exception, retries only for transient errors."""
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.inputs import read


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


def unit_batch(*planned):
    rows = [unit.to_row() for unit in planned]
    return {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}


def test_a_unit_streams_its_items_with_bytes_and_reasons_row_by_row(tmp_path):
    from pipeline.inputs.units import plan_units

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8data")
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join([str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg"), "", str(tmp_path / "a.jpg")]))
    (unit,) = plan_units(str(manifest), {}, set(), unit_size=100, limit=None, output=None, run_index=1).units
    blocks = list(read.read_units(unit_batch(unit), items_per_block=2))
    assert [len(block["uri"]) for block in blocks] == [2, 1]  # streamed a block at a time
    out = {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}
    assert list(out["bytes"]) == [b"\xff\xd8data", b"", b"\xff\xd8data"]
    assert list(out["read_error"])[0] == "" and "not found" in out["read_error"][1]
    assert list(out["unit"]) == [unit.id] * 3 and list(out["unit_index"]) == [0, 1, 2]
    assert list(out["unit_last"]) == [False, False, True] and not out["skip"].any()
    assert (out["read_s"] >= 0).all()


def test_a_unit_with_no_entry_still_reports_its_end(tmp_path):
    from pipeline.inputs.units import plan_units

    manifest = tmp_path / "inputs.txt"
    manifest.write_text("# only a comment\n\n")
    (unit,) = plan_units(str(manifest), {}, set(), unit_size=100, limit=None, output=None, run_index=1).units
    (block,) = read.read_units(unit_batch(unit))
    assert list(block["skip"]) == [True] and list(block["unit_last"]) == [True]


def test_transient_errors_are_retried_then_succeed(flaky):
    flaky.failures = read.RETRIES
    assert read.read_object("flakymem://bucket/a.jpg", {}) == (b"abc", None)
    assert flaky.calls == read.RETRIES + 1


def test_persistent_errors_become_a_reason_after_the_last_retry(flaky):
    flaky.failures = read.RETRIES + 1
    data, reason = read.read_object("flakymem://bucket/a.jpg", {})
    assert data is None and "failed 4 times" in reason and "ConnectionError" in reason
