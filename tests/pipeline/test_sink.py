"""The output: worker-side part files named after their unit, driver-side commits, clean resume."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import schema
from pipeline.output.sink import DATA_FILE, LAYOUT, Committer, Output, OutputError, write_parts
from pipeline.inputs.units import KIND_TEXT, Unit


def unit(start, stop, source="s3://b/list.txt"):
    return Unit(KIND_TEXT, source, source, start, stop)


def annotated(rows):
    """rows: (unit, index, last, uri, status) -> an annotate-stage output table."""
    records = []
    for unit_id, index, last, uri, status in rows:
        if status == "ok":
            record = schema.ok_row(uri, 4, 3, [], "ab" * 32)
        elif status == "skip":
            record = schema.skip_row(uri)
        else:
            record = schema.error_row(uri, "broken")
        records.append(record)
    table = schema.rows_to_table(records)
    return (table.append_column("unit", pa.array([r[0] for r in rows]))
                 .append_column("unit_index", pa.array([r[1] for r in rows], pa.int64()))
                 .append_column("unit_last", pa.array([r[2] for r in rows])))


def write(output, table):
    return write_parts(table, output=str(output), storage_options={}, row_schema=schema.OUTPUT_SCHEMA)


def data_rows(root):
    return [row for p in sorted(root.iterdir()) if DATA_FILE.match(p.name) for row in pq.read_table(p).to_pylist()]


def test_rows_are_written_per_unit_under_names_from_the_unit_and_skips_are_only_reported(tmp_path):
    a, b = unit(0, 100), unit(100, 200)
    table = annotated([(b.id, 0, False, "s3://b/x.jpg", "ok"), (a.id, 1, True, "s3://b/a1.jpg", "error"),
                       (a.id, 0, False, "s3://b/a0.jpg", "ok"), (b.id, 1, False, "", "skip")])
    results = {r["unit"]: r for r in write(tmp_path, table).to_pylist()}
    assert results[a.id]["indices"] == [0, 1] and results[a.id]["last_index"] == 1
    assert (results[a.id]["rows"], results[a.id]["ok"], results[a.id]["failed"]) == (2, 1, 1)
    assert results[b.id]["indices"] == [0, 1] and results[b.id]["rows"] == 1 and results[b.id]["last_index"] == -1
    for result in results.values():
        assert DATA_FILE.match(result["file"])["unit"] == result["unit"]
    in_file = pq.read_table(tmp_path / results[a.id]["file"])
    assert in_file.schema.equals(schema.OUTPUT_SCHEMA)  # the unit columns are not part of the rows
    assert in_file.column("uri").to_pylist() == ["s3://b/a0.jpg", "s3://b/a1.jpg"]  # in unit order
    assert sorted(r["uri"] for r in data_rows(tmp_path)) == ["s3://b/a0.jpg", "s3://b/a1.jpg", "s3://b/x.jpg"]


def test_a_re_executed_write_overwrites_its_own_file_and_leaves_one_copy(tmp_path):
    a = unit(0, 100)
    table = annotated([(a.id, i, i == 2, f"s3://b/{i}.jpg", "ok") for i in range(3)])
    first = write(tmp_path, table).to_pylist()
    again = write(tmp_path, table.take([2, 0, 1])).to_pylist()  # the same rows, in another order
    assert [r["file"] for r in again] == [r["file"] for r in first]
    assert sorted(r["uri"] for r in data_rows(tmp_path)) == [f"s3://b/{i}.jpg" for i in range(3)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_unit_is_committed_once_all_its_items_are_written_whatever_their_order(tmp_path):
    output = Output(str(tmp_path))
    a, b = unit(0, 100), unit(100, 200)
    committer = Committer(output, [a, b], run_index=3)
    last_first = write(tmp_path, annotated([(a.id, 2, True, "s3://b/2.jpg", "ok"), (b.id, 0, True, "", "skip")]))
    tally = committer.add(last_first)
    assert tally.committed == [b.id] and (tally.rows, tally.ok) == (1, 1)  # b's only item was a skip
    assert output.committed_units() == {b.id}
    assert committer.add(last_first).rows == 0  # the same results again: counted once
    tally = committer.add(write(tmp_path, annotated([(a.id, 0, False, "s3://b/0.jpg", "ok"),
                                                     (a.id, 1, False, "s3://b/1.jpg", "error")])))
    assert tally.committed == [a.id] and not committer.pending
    record = json.loads((tmp_path / "_commits" / f"{a.id}.json").read_text())
    assert (record["items"], record["rows"], record["ok"], record["failed"], record["run_index"]) == (3, 3, 2, 1, 3)
    assert sorted(record["files"]) == sorted(p.name for p in tmp_path.iterdir() if DATA_FILE.match(p.name)
                                             and DATA_FILE.match(p.name)["unit"] == a.id)
    assert json.loads((tmp_path / "_commits" / f"{b.id}.json").read_text())["files"] == []


def test_a_file_repeating_rows_already_written_is_removed(tmp_path):
    output = Output(str(tmp_path))
    a = unit(0, 100)
    committer = Committer(output, [a], run_index=1)
    committer.add(write(tmp_path, annotated([(a.id, i, False, f"s3://b/{i}.jpg", "ok") for i in range(3)])))
    duplicate = write(tmp_path, annotated([(a.id, 1, False, "s3://b/1.jpg", "ok")]))  # another split of the same rows
    committer.add(duplicate)
    assert not (tmp_path / duplicate["file"][0].as_py()).exists()
    committer.add(write(tmp_path, annotated([(a.id, 3, True, "s3://b/3.jpg", "ok")])))
    assert output.committed_units() == {a.id}
    assert sorted(r["uri"] for r in data_rows(tmp_path)) == [f"s3://b/{i}.jpg" for i in range(4)]


def test_uncommitted_units_and_temporaries_are_removed_before_a_run_writes(tmp_path):
    output = Output(str(tmp_path))
    done, killed = unit(0, 100), unit(100, 200)
    committer = Committer(output, [done, killed], run_index=1)
    committer.add(write(tmp_path, annotated([(done.id, 0, True, "s3://b/0.jpg", "ok")])))
    committer.add(write(tmp_path, annotated([(killed.id, 0, False, "s3://b/100.jpg", "ok")])))  # then the kill
    (tmp_path / ".part-x.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"half a file")
    (tmp_path / "keep-me.txt").write_text("user data")
    assert output.remove_uncommitted(output.committed_units()) == 2
    assert [r["uri"] for r in data_rows(tmp_path)] == ["s3://b/0.jpg"]
    assert (tmp_path / "keep-me.txt").exists()


def test_manifests_marker_and_clear_remove_only_our_files(tmp_path):
    output = Output(str(tmp_path))
    (tmp_path / "keep-me.txt").write_text("user data")
    a = unit(0, 100)
    Committer(output, [a], 1).add(write(tmp_path, annotated([(a.id, 0, True, "s3://b/0.jpg", "ok")])))
    output.write_manifest({"run_index": 4, "config": {}, "end_time": "t", "totals": {}})
    assert output.next_run_index() == 5
    assert json.loads((tmp_path / "_run.json").read_text())["run_index"] == 4
    output.mark_complete({"run_index": 4})
    assert output.is_complete()
    output.mark_incomplete()
    assert not output.is_complete()
    output.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep-me.txt"]
    assert output.next_run_index() == 1 and output.committed_units() == set()


def test_an_output_that_is_a_file_or_from_an_older_layout_is_refused(tmp_path):
    (tmp_path / "out.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="is a file"):
        Output(str(tmp_path / "out.parquet")).check_usable()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "part-0001-000000.parquet").write_bytes(b"x")
    (tmp_path / "old" / "_run.json").write_text(json.dumps({"run_index": 1, "status": "complete", "config": {}}))
    with pytest.raises(OutputError, match="older sam-annotate"):
        Output(str(tmp_path / "old")).check_usable()
    Output(str(tmp_path / "old")).check_usable(overwrite=True)  # what the message advises
    Output(str(tmp_path / "old")).clear()
    assert not list((tmp_path / "old").iterdir())
    Output(str(tmp_path / "new")).check_usable()  # a fresh output is fine
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "_run.json").write_text(json.dumps({"layout": LAYOUT, "run_index": 1}))
    Output(str(tmp_path / "ours")).check_usable()  # and one of ours, even killed before its first commit


def test_skipped_items_reported_twice_do_not_block_the_commit(tmp_path):
    output = Output(str(tmp_path))
    a = unit(0, 100)
    committer = Committer(output, [a], run_index=1)
    skips = write(tmp_path, annotated([(a.id, 0, False, "", "skip"), (a.id, 1, False, "", "skip")]))
    committer.add(skips)
    committer.add(skips)  # a re-executed task of skips only: no file, the same positions
    committer.add(write(tmp_path, annotated([(a.id, 2, True, "s3://b/2.jpg", "ok")])))
    assert output.committed_units() == {a.id} and not committer.pending
