"""Prompted mode at scale: the prompts table sorted by image in bounded memory, looked up per block,
and the prompted images that --input lacks found by a sorted walk. No Ray: the stages are plain functions."""
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import AnnotateConfig
from pipeline.inputs.read import read_units
from pipeline.inputs.units import ORPHAN_REASON, plan_units
from pipeline.modes import prompt_index
from pipeline.modes.prompt_index import (IMAGE_KEY, SortedTable, build_sorted_prompts, image_key, sort_spilled,
                                         write_sorted_table)
from pipeline.modes.prompted import PROMPTS_COLUMN, PromptedMode, select_prompted
from pipeline.modes.prompts import TABLE_ROW, PromptError
from pipeline.inputs.sources import listing_key
from pipeline.output.sink import Output


@pytest.fixture
def small_groups(monkeypatch):
    """Row groups of 3 rows and files of 2 groups, so that a few rows exercise every boundary."""
    monkeypatch.setattr(prompt_index, "ROW_GROUP_ROWS", 3)
    monkeypatch.setattr(prompt_index, "FILE_ROWS", 6)


def key_tables(keys, rows_per_table):
    for start in range(0, len(keys), rows_per_table):
        chunk = keys[start:start + rows_per_table]
        yield pa.table({IMAGE_KEY: chunk, TABLE_ROW: pa.array(range(start, start + len(chunk)), pa.int64())})


def test_spilled_sort_with_multi_pass_merge_equals_an_in_memory_sort(tmp_path):
    rng = random.Random(0)
    keys = [f"k{rng.randrange(500):04d}" for _ in range(2000)]  # many repeated keys
    out = pa.concat_tables(sort_spilled(key_tables(keys, 37), str(tmp_path), chunk_rows=100,
                                        merge_batch_rows=7, max_fan_in=3))
    # it spilled 20 runs, merged them in groups of 3 twice (merge-0, merge-1), then once more
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir()) == ["merge-1"] * 3
    got = out[IMAGE_KEY].to_pylist()
    assert got == sorted(keys)
    assert sorted(out[TABLE_ROW].to_pylist()) == list(range(len(keys)))  # every row once


def test_image_keys_order_uris_as_a_listing_does():
    uris = ["s3://b/a.b/c.jpg", "s3://b/a/z.jpg", "s3://b/a-1.jpg", "s3://b/a/b/c.jpg", "s3://b/a0.jpg"]
    assert sorted(uris, key=image_key) == sorted(uris, key=listing_key)
    assert image_key("file:///data/x.png") == image_key("/data/x.png")


def write_prompts(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_lookup_gives_each_images_rows_in_table_order_across_files_and_row_groups(tmp_path, small_groups):
    folder = tmp_path / "prompts"
    folder.mkdir()
    # Two files; image a has rows in both and more rows than a row group; b is written file://.
    write_prompts(folder / "0.parquet", [{"uri": "s3://b/a.jpg", "boxes": [[k, 0.0, k + 1.0, 1.0]], "labels": [f"a{k}"]}
                                         for k in range(4)] + [{"uri": "file:///d/b.jpg", "boxes": [[0, 0, 2, 2]],
                                                                "labels": ["b"]}])
    write_prompts(folder / "1.parquet", [{"uri": f"s3://b/z{k}.jpg", "boxes": [[0, 0, 1, 1]], "labels": None}
                                         for k in range(5)]
                  + [{"uri": "s3://b/a.jpg", "boxes": [[9.0, 0.0, 10.0, 1.0]], "labels": ["a-last"]}])
    target = str(tmp_path / "out" / "table")
    assert build_sorted_prompts(str(folder), {}, target) == 11
    table = SortedTable(target)
    assert len(table.files) == 4 and len({f for f in table.files}) == 2  # 4 row groups in 2 files
    assert table.first_keys == sorted(table.first_keys)
    found = table.lookup([image_key("s3://b/a.jpg"), image_key("/d/b.jpg"), image_key("s3://b/none.jpg")])
    assert set(found) == {image_key("s3://b/a.jpg"), image_key("/d/b.jpg")}
    a_rows = found[image_key("s3://b/a.jpg")]
    assert [r["labels"] for r in a_rows] == [["a0"], ["a1"], ["a2"], ["a3"], ["a-last"]]
    assert [r[TABLE_ROW] for r in a_rows] == [0, 1, 2, 3, 10]
    # A block with the local path selects b under its file:// spelling, with the prompts as JSON.
    (keep_b, columns), (keep_none, _) = select_prompted(target, None, "{}", ["/d/b.jpg", "s3://b/none.jpg"])
    assert keep_b and not keep_none
    assert json.loads(columns[PROMPTS_COLUMN])["prompts"][0]["box_xyxy"] == [0.0, 0.0, 2.0, 2.0]


def test_a_rerun_reuses_the_sorted_table_and_a_half_written_one_is_rebuilt(tmp_path):
    table_path = tmp_path / "p.parquet"
    write_prompts(table_path, [{"uri": "s3://b/a.jpg", "boxes": [[0, 0, 1, 1]]}])
    target = tmp_path / "out" / "table"
    build_sorted_prompts(str(table_path), {}, str(target))
    (target / "index.parquet").unlink()  # as if the driver was stopped before the index
    (target / "part-99999.parquet").write_bytes(b"stale")
    assert build_sorted_prompts(str(table_path), {}, str(target)) == 1
    assert sorted(p.name for p in target.iterdir()) == ["index.parquet", "part-00000.parquet"]
    stamp = (target / "index.parquet").stat().st_mtime_ns
    build_sorted_prompts(str(table_path), {}, str(target))
    assert (target / "index.parquet").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("rows, message", [
    ([{"uri": "s3://b/a.jpg"}, {"uri": None}], "prompts table row 1 has no uri"),
    ([{"uri": ""}], "prompts table row 0 has no uri"),
    ([{"image": "s3://b/a.jpg"}], "has no 'uri' column"),
])
def test_a_table_without_uris_is_refused_in_one_line(tmp_path, rows, message):
    table_path = tmp_path / "p.parquet"
    write_prompts(table_path, rows)
    with pytest.raises(PromptError, match=message) as raised:
        build_sorted_prompts(str(table_path), {}, str(tmp_path / "out"))
    assert "\n" not in str(raised.value)


def test_files_that_disagree_on_a_column_type_are_refused(tmp_path):
    (tmp_path / "p").mkdir()
    write_prompts(tmp_path / "p" / "0.parquet", [{"uri": "s3://b/a.jpg", "labels": ["x"]}])
    write_prompts(tmp_path / "p" / "1.parquet", [{"uri": "s3://b/b.jpg", "labels": [[1.5]]}])
    with pytest.raises(PromptError, match="disagree on column types"):
        build_sorted_prompts(str(tmp_path / "p"), {}, str(tmp_path / "out"))


def test_only_prompted_images_are_read_and_unlisted_prompts_get_units_of_error_rows(tmp_path, small_groups):
    table = tmp_path / "prompts.parquet"
    write_prompts(table, [{"uri": uri, "boxes": [[[0.0, 0.0, 1.0, 1.0]]]}
                          for uri in ["s3://b/c.jpg", "s3://b/a.jpg", "s3://b/gone.jpg", "s3://b/d.jpg",
                                      "s3://b/gone2.jpg"]])
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("s3://b/d.jpg\ns3://b/a.jpg\ns3://b/b.jpg\ns3://b/c.jpg\n")  # not sorted
    config = AnnotateConfig(input=str(manifest), output=str(tmp_path / "out"), checkpoint="c", prompts=str(table),
                            unit_size=1)
    output = Output(config.output)
    plan = plan_units(str(manifest), {}, set(), unit_size=100, limit=None, output=output, run_index=1)
    mode = PromptedMode()
    mode.prepare(config)
    orphan_units = mode.extra_units(config, plan, set(), output)
    assert [u.kind for u in orphan_units] == ["po", "po"]  # unit_size 1: one unit per orphan
    select = mode.selector(config)
    errors = []
    for unit in orphan_units:  # read as the job reads them: with the mode's selector
        (block,) = read_units({name: np.array([value], dtype=object) for name, value in unit.to_row().items()},
                              select=select)
        errors += list(zip(block["uri"], block["read_error"], block["skip"]))
    assert errors == [("s3://b/gone.jpg", ORPHAN_REASON, False), ("s3://b/gone2.jpg", ORPHAN_REASON, False)]

    assert [keep for keep, _ in select(["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/gone.jpg"])] == [True, False, False]
    # error rows are final: once committed, a rerun plans no orphan unit and finds them again from the output
    rerun = PromptedMode()
    assert rerun.extra_units(config, plan, {u.id for u in orphan_units}, output) == []
    assert rerun.selector(config)(["s3://b/gone.jpg"]) == [(False, {})]  # turned up later: still no second row


def test_no_orphans_are_looked_for_under_limit(tmp_path):
    table = tmp_path / "prompts.parquet"
    write_prompts(table, [{"uri": "s3://b/gone.jpg", "boxes": [[0.0, 0.0, 1.0, 1.0]]}])
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("s3://b/a.jpg\n")
    config = AnnotateConfig(input=str(manifest), output=str(tmp_path / "out"), checkpoint="c", prompts=str(table),
                            limit=1)
    output = Output(config.output)
    plan = plan_units(str(manifest), {}, set(), unit_size=100, limit=1, output=output, run_index=1)
    mode = PromptedMode()
    assert mode.extra_units(config, plan, set(), output) == []
    (keep, _), = mode.selector(config)(["s3://b/gone.jpg"])
    assert keep and mode.orphans_uri is None  # not taken for a missing image: it may lie past the limit


def test_write_sorted_table_indexes_every_row_group(tmp_path, small_groups):
    keys = [f"k{k:02d}" for k in range(8)]
    schema = pa.schema([pa.field(IMAGE_KEY, pa.string()), pa.field(TABLE_ROW, pa.int64())])
    import fsspec

    rows = write_sorted_table(key_tables(keys, 5), fsspec.filesystem("file"), str(tmp_path / "t"), schema)
    table = SortedTable(str(tmp_path / "t"))
    assert rows == 8 and table.rows == [3, 3, 2] and table.first_keys == ["k00", "k03", "k06"]
    assert table.last_keys == ["k02", "k05", "k07"]
