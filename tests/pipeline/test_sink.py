"""Output directory: deterministic non-colliding shard names, manifests, marker, resume reads, --overwrite."""
import json

import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.sink import Output, OutputExistsError, ShardWriter


def rows(*uris):
    return schema.rows_to_table([schema.error_row(uri, "x") for uri in uris])


def write_run(output, uris, rows_per_shard):
    writer = ShardWriter(output, output.next_run_index(), schema.OUTPUT_SCHEMA, rows_per_shard)
    for start in range(0, len(uris), 3):
        writer.write(rows(*uris[start: start + 3]))
    writer.close()
    return writer


def test_shards_split_at_rows_per_shard_and_are_named_by_run_and_sequence(tmp_path):
    output = Output(str(tmp_path))
    writer = write_run(output, [f"u{i}" for i in range(7)], rows_per_shard=3)
    assert [p.rsplit("/", 1)[1] for p in writer.shards_written] == [
        "part-0001-000000.parquet", "part-0001-000001.parquet", "part-0001-000002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in writer.shards_written] == [3, 3, 1]
    assert writer.rows_written == 7
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_second_run_gets_new_names_and_resume_sees_every_written_uri(tmp_path):
    output = Output(str(tmp_path))
    write_run(output, ["a", "b"], rows_per_shard=10)
    second = write_run(output, ["c"], rows_per_shard=10)
    assert second.shards_written[0].endswith("part-0002-000000.parquet")
    assert output.written_uris() == {"a", "b", "c"}
    assert pq.read_table(str(tmp_path)).num_rows == 3


def test_an_existing_shard_is_never_overwritten(tmp_path):
    output = Output(str(tmp_path))
    write_run(output, ["a"], rows_per_shard=10)
    writer = ShardWriter(output, 1, schema.OUTPUT_SCHEMA, 10)  # as a concurrent run 1 would
    writer.write(rows("b"))
    with pytest.raises(OutputExistsError):
        writer.close()
    assert output.written_uris() == {"a"}


def test_run_history_counts_towards_the_next_index(tmp_path):
    output = Output(str(tmp_path))
    output.write_manifest({"run_index": 4, "config": {}})
    assert output.next_run_index() == 5
    assert json.loads((tmp_path / "_run.json").read_text())["run_index"] == 4
    assert (tmp_path / "_runs" / "0004.json").exists()


def test_completion_marker_and_clear_remove_only_our_files(tmp_path):
    output = Output(str(tmp_path))
    (tmp_path / "keep-me.txt").write_text("user data")
    (tmp_path / ".part-0001-000007.parquet.0123abcd.tmp").write_bytes(b"half a shard from a killed run")
    write_run(output, ["a"], rows_per_shard=10)
    manifest = {"run_index": 1, "config": {}, "end_time": "t", "totals": {"rows": 1}}
    output.write_manifest(manifest)
    output.mark_complete(manifest)
    assert output.is_complete()
    output.mark_incomplete()
    assert not output.is_complete()
    output.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep-me.txt"]
    assert output.next_run_index() == 1
