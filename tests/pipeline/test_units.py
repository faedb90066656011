"""Units of work: stable ids, a fixed grid, manifests cut so that every entry lands in one unit,
and listings that pick up late arrivals without repeating anything."""
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import units
from pipeline.inputs.read import parquet_uris, text_manifest_entries, unit_uris
from pipeline.output.sink import Output
from pipeline.inputs.units import InputError, Unit


def test_uncovered_and_cut_keep_one_grid_whatever_was_committed():
    assert units.uncovered(10, []) == [(0, 10)]
    assert units.uncovered(10, [(0, 3), (5, 8)]) == [(3, 5), (8, 10)]
    assert units.uncovered(10, [(0, 10)]) == []
    assert list(units.cut([(0, 10)], 4)) == [(0, 4), (4, 8), (8, 10)]
    # A gap left by --limit (0-3 done) is cut on the same grid as a fresh plan would be.
    assert list(units.cut(units.uncovered(10, [(0, 3)]), 4)) == [(3, 4), (4, 8), (8, 10)]


def test_unit_ids_are_our_names_and_parse_back():
    unit = Unit(units.KIND_TEXT, "s3://b/../../etc/passwd;rm -rf.txt", "s3://b/../../etc/passwd;rm -rf.txt", 4096, 8192)
    assert unit.id.startswith("txt-") and "passwd" not in unit.id and "/" not in unit.id
    assert units.parse_unit_id(unit.id) == ("txt", units.source_hash(unit.source_key), 4096, 8192)
    assert units.parse_unit_id("part-0001-000000") is None and units.parse_unit_id("zz-0123456789ab-0-1") is None
    assert Unit.from_row(unit.to_row()) == unit


def write_manifest(path, entries, seed=0):
    """Entries with blank lines, comments, CRLF and no final newline mixed in."""
    rng = random.Random(seed)
    lines = []
    for entry in entries:
        if rng.random() < 0.2:
            lines.append(rng.choice(["", "# comment", "   "]))
        lines.append(entry + ("\r" if rng.random() < 0.1 else ""))
    path.write_bytes("\n".join(lines).encode())


def uris_of(plan, options=None):
    return [uri for unit in plan.units for uri in unit_uris(unit, options or {})]


def plan(input_uri, committed=(), unit_size=4, limit=None, output=None, run_index=1, ramp_from=None):
    staging = Path(str(input_uri)).parent  # a listing snapshot is staged beside the test's input
    return units.plan_units(str(input_uri), {}, set(committed), unit_size=unit_size, limit=limit,
                            output=output, run_index=run_index, staging_dir=str(staging), ramp_from=ramp_from)


@pytest.mark.parametrize("unit_size", [1, 3, 7, 50])
def test_text_manifest_byte_ranges_give_every_entry_to_exactly_one_unit(tmp_path, unit_size):
    entries = [f"s3://bucket/{'x' * random.Random(i).randrange(1, 40)}/{i}.jpg" for i in range(103)]
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, entries)
    planned = plan(manifest, unit_size=unit_size)
    assert len(planned.units) > 1 or unit_size == 50
    assert uris_of(planned) == entries  # in order, none lost, none twice
    assert planned.known_items is None  # line counts are not known without reading the file


def test_appended_lines_become_new_units_after_the_committed_ones(tmp_path):
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, [f"s3://b/{i}.jpg" for i in range(20)])
    first = plan(manifest)
    committed = {unit.id for unit in first.units}
    assert plan(manifest, committed).units == []  # a rerun after completion plans nothing
    with open(manifest, "a") as handle:  # late arrivals: new lines at the end
        handle.write("\ns3://b/late-1.jpg\ns3://b/late-2.jpg\n")
    second = plan(manifest, committed)
    assert uris_of(second) == ["s3://b/late-1.jpg", "s3://b/late-2.jpg"]
    assert not {unit.id for unit in second.units} & committed


def test_an_uncommitted_unit_is_planned_again_with_the_same_id(tmp_path):
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, [f"s3://b/{i}.jpg" for i in range(20)])
    first = plan(manifest)
    committed = {unit.id for unit in first.units[::2]}
    again = plan(manifest, committed)
    assert [unit.id for unit in again.units] == [unit.id for unit in first.units[1::2]]


def test_text_manifest_limit_covers_the_first_n_entries_and_a_later_run_the_rest(tmp_path):
    entries = [f"s3://b/{i}.jpg" for i in range(30)]
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, entries, seed=3)
    limited = plan(manifest, limit=7)
    assert uris_of(limited) == entries[:7]
    rest = plan(manifest, {unit.id for unit in limited.units})
    assert uris_of(rest) == entries[7:]


def test_the_same_manifest_spelled_another_way_keeps_its_unit_ids(tmp_path, monkeypatch):
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, [f"s3://b/{i}.jpg" for i in range(9)])
    monkeypatch.chdir(tmp_path)
    assert [u.id for u in plan("list.txt").units] == [u.id for u in plan(f"file://{manifest}").units]


def test_a_manifest_that_shrank_is_refused(tmp_path):
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, [f"s3://b/{i}.jpg" for i in range(20)])
    committed = {unit.id for unit in plan(manifest).units}
    manifest.write_text("s3://b/0.jpg\n")
    with pytest.raises(InputError, match="shorter than when it was annotated"):
        plan(manifest, committed)


def test_parquet_manifest_rows_are_cut_by_row_groups_and_limit(tmp_path):
    manifest = tmp_path / "list.parquet"
    values = [f"s3://b/{i}.jpg" if i % 7 else None for i in range(40)]
    pq.write_table(pa.table({"uri": values, "other": list(range(40))}), manifest, row_group_size=9)
    planned = plan(manifest, unit_size=6)
    assert uris_of(planned) == values and planned.known_items == 40
    assert [u.size for u in planned.units][:2] == [6, 6]
    assert uris_of(plan(manifest, unit_size=6, limit=13)) == values[:13]


def test_parquet_manifest_without_uri_column_is_a_clear_error(tmp_path):
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), manifest)
    with pytest.raises(InputError, match="neither a .uri. column"):
        plan(manifest)


def test_missing_inputs_are_one_line_errors(tmp_path):
    output = Output(str(tmp_path / "out"))
    with pytest.raises(InputError, match="does not exist"):
        plan(tmp_path / "nope", output=output)
    with pytest.raises(InputError, match="does not exist"):
        plan(tmp_path / "nope.txt", output=output)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    with pytest.raises(InputError, match="holds no image files"):
        plan(tmp_path / "empty", output=output)


def test_new_entries_streams_the_difference_in_listing_order():
    old_a = ["s/a/1.jpg", "s/a/3.jpg", "s/b/1.jpg"]
    old_b = ["s/a/2.jpg", "s/c.jpg"]
    fresh = ["s/a/1.jpg", "s/a/2.jpg", "s/a/2b.jpg", "s/a/3.jpg", "s/b/1.jpg", "s/b/9.jpg", "s/c.jpg", "s/d.jpg"]
    assert list(units.new_entries(iter(fresh), [iter(old_a), iter(old_b)])) == ["s/a/2b.jpg", "s/b/9.jpg", "s/d.jpg"]


def publish(output, planned):
    if planned.snapshot_name:
        output.publish_listing(planned.snapshot_local_path, planned.snapshot_name)


def test_a_prefix_is_snapshotted_and_late_arrivals_get_only_their_own_units(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.jpg", "c.jpg", "sub/b.png", "sub/d.png", "e.jpg"):
        (images / name).write_bytes(b"x")
    output = Output(str(tmp_path / "out"))
    first = plan(images, output=output, unit_size=2, run_index=1)
    publish(output, first)
    assert first.snapshot_name == "0001" and first.new_listed == 5 and len(first.units) == 3
    assert [u.rsplit("/images/", 1)[1] for u in uris_of(first)] == ["a.jpg", "c.jpg", "e.jpg", "sub/b.png",
                                                                    "sub/d.png"]
    committed = {unit.id for unit in first.units}
    rerun = plan(images, committed, output=output, unit_size=2, run_index=2)
    assert rerun.units == [] and rerun.snapshot_name is None

    (images / "sub" / "c2.png").write_bytes(b"x")  # a late arrival in the middle of the order
    late = plan(images, committed, output=output, unit_size=2, run_index=2)
    publish(output, late)
    assert late.snapshot_name == "0002" and late.new_listed == 1
    assert uris_of(late) == [str(images / "sub" / "c2.png")]
    assert output.listing_snapshots() == ["0001", "0002"]
    assert output.next_run_index() == 3  # a snapshot takes its run index even without a manifest


def placeholder_images(folder, names):
    """``folder`` with one placeholder object per name: listings read names, not bytes."""
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_a_listing_limit_extends_on_a_later_run(tmp_path):
    images = placeholder_images(tmp_path / "images", [f"{i}.jpg" for i in range(5)])
    output = Output(str(tmp_path / "out"))
    first = plan(images, output=output, limit=2)
    publish(output, first)
    assert [u.rsplit("/", 1)[1] for u in uris_of(first)] == ["0.jpg", "1.jpg"]
    rest = plan(images, {u.id for u in first.units}, output=output, run_index=2)
    publish(output, rest)
    assert [u.rsplit("/", 1)[1] for u in uris_of(rest)] == ["2.jpg", "3.jpg", "4.jpg"]


def test_readers_of_text_and_parquet_units_take_exactly_their_range(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    manifest = tmp_path / "m.txt"
    manifest.write_bytes(b"aa\nbbb\ncc\n")
    # bytes: "aa\n" 0-2, "bbb\n" 3-6, "cc\n" 7-9; a range owns the lines that start in it
    assert list(text_manifest_entries(fs, str(manifest), 0, 1)) == ["aa"]
    assert list(text_manifest_entries(fs, str(manifest), 1, 4)) == ["bbb"]
    assert list(text_manifest_entries(fs, str(manifest), 4, 7)) == []
    assert list(text_manifest_entries(fs, str(manifest), 7, 10)) == ["cc"]
    table = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": [str(i) for i in range(10)]}), table, row_group_size=3)
    assert list(parquet_uris(fs, str(table), 2, 8)) == [str(i) for i in range(2, 8)]


def test_a_smaller_limit_after_a_larger_one_plans_nothing_rather_than_refusing(tmp_path):
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, [f"s3://b/{i}.jpg" for i in range(30)])
    committed = {unit.id for unit in plan(manifest, limit=20).units}
    assert plan(manifest, committed, limit=10).units == []
    table = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": [f"s3://b/{i}.jpg" for i in range(30)]}), table)
    committed = {unit.id for unit in plan(table, limit=20).units}
    assert plan(table, committed, limit=10).units == []


def test_a_parquet_manifest_with_a_binary_column_is_still_a_manifest(tmp_path):
    table = tmp_path / "list.parquet"
    pq.write_table(pa.table({"uri": ["s3://b/1.jpg", "s3://b/2.jpg"], "sha256": [b"\x01" * 32, b"\x02" * 32]}), table)
    planned = plan(table)
    assert [u.kind for u in planned.units] == ["pq"] and uris_of(planned) == ["s3://b/1.jpg", "s3://b/2.jpg"]


# --- The ramp: a run's first units are small ------------------------------------------------------

def ranges(planned):
    return [(u.start, u.stop) for u in planned.units]


def test_a_run_starts_with_small_units_that_double_up_to_the_grid(tmp_path):
    manifest = tmp_path / "list.parquet"
    values = [f"s3://b/{i}.jpg" for i in range(3000)]
    pq.write_table(pa.table({"uri": values}), manifest, row_group_size=500)
    planned = plan(manifest, unit_size=1024, ramp_from=16)
    assert ranges(planned) == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, 512), (512, 1024),
                               (1024, 2048), (2048, 3000)]
    assert [u.flush for u in planned.units] == [True] * 6 + [False] * 3  # only ramp units are flushed
    assert uris_of(planned) == values and planned.known_items == 3000
    assert ranges(plan(manifest, unit_size=1024)) == [(0, 1024), (1024, 2048), (2048, 3000)]  # no ramp asked
    assert ranges(plan(manifest, unit_size=8, ramp_from=16)) == ranges(plan(manifest, unit_size=8))  # nothing to ramp
    # Ids are ours and stable: planning the same state again gives the same units.
    assert [u.id for u in plan(manifest, unit_size=1024, ramp_from=16).units] == [u.id for u in planned.units]


def test_resume_after_a_run_killed_mid_ramp_plans_the_rest_once_and_ramps_again(tmp_path):
    manifest = tmp_path / "list.parquet"
    values = [f"s3://b/{i}.jpg" for i in range(3000)]
    pq.write_table(pa.table({"uri": values}), manifest, row_group_size=500)
    first = plan(manifest, unit_size=1024, ramp_from=16)
    # Killed with the first two ramp units and the fourth committed (units end out of order).
    committed = {first.units[i].id for i in (0, 1, 3)}
    resumed = plan(manifest, committed, unit_size=1024, ramp_from=16, run_index=2)
    assert not {u.id for u in resumed.units} & committed
    # The gap [32, 64) takes the ramp's first size; the ramp goes on after the committed [64, 128)
    # and ends on the grid: later units are the grid's, as in the killed run.
    assert ranges(resumed) == [(32, 48), (48, 64), (128, 192), (192, 256), (256, 512), (512, 1024),
                               (1024, 2048), (2048, 3000)]
    assert [u.flush for u in resumed.units] == [True] * 6 + [False] * 2
    done = [uri for u in first.units if u.id in committed for uri in unit_uris(u, {})]
    assert sorted(done + uris_of(resumed)) == sorted(values)  # every entry once, none twice
    # A resume in the middle of a grid cell (after --limit 1500) ramps from there, back onto the grid.
    limited = {u.id for u in first.units[:7]} | {units.unit_id("pq", first.units[0].source_key, 1024, 1500)}
    later = plan(manifest, limited, unit_size=1024, ramp_from=16, run_index=3)
    assert ranges(later) == [(1500, 1504), (1504, 1536), (1536, 1600), (1600, 1664), (1664, 1792), (1792, 2048),
                             (2048, 3000)]
    assert uris_of(later) == values[1500:]


def test_text_manifest_ramp_is_in_bytes_and_gives_every_entry_to_one_unit(tmp_path):
    entries = [f"s3://bucket/{i:05d}.jpg" for i in range(3000)]
    manifest = tmp_path / "list.txt"
    write_manifest(manifest, entries, seed=5)
    planned = plan(manifest, unit_size=1024, ramp_from=16)
    assert uris_of(planned) == entries
    counts = [len(list(unit_uris(u, {}))) for u in planned.units]
    assert 8 <= counts[0] <= 24 and counts[1] <= 40  # about 16 lines, then about 16 more
    assert [u.flush for u in planned.units].count(True) == 6


def test_a_listing_ramps_its_first_units(tmp_path):
    images = placeholder_images(tmp_path / "images", [f"{i:02d}.jpg" for i in range(40)])
    output = Output(str(tmp_path / "out"))
    planned = plan(images, output=output, unit_size=32, ramp_from=4)
    assert ranges(planned) == [(0, 4), (4, 8), (8, 16), (16, 32), (32, 40)]
    assert [u.kind for u in planned.units] == ["ls"] * 5
    assert [u.flush for u in planned.units] == [True] * 3 + [False] * 2


def test_only_the_first_shard_is_cut_into_member_ranges(tmp_path):
    from pipeline.inputs.read import tar_items
    from tests.pipeline.shard_corpus import sa1b_members, tar_bytes

    for n in range(3):
        (tmp_path / f"sa_{n:06d}.tar").write_bytes(tar_bytes(sa1b_members(n * 100, 40 if n == 0 else 3)))
    pattern = str(tmp_path / "sa_{000000..000002}.tar")
    planned = units.plan_units(pattern, {}, set(), unit_size=64, limit=None, output=None, run_index=1, ramp_from=4)
    assert [(u.source.rsplit("/", 1)[1], u.start, u.stop) for u in planned.units] == [
        ("sa_000000.tar", 0, 4), ("sa_000000.tar", 4, 8), ("sa_000000.tar", 8, 16), ("sa_000000.tar", 16, 32),
        ("sa_000000.tar", 32, units.END), ("sa_000001.tar", 0, units.END), ("sa_000002.tar", 0, units.END)]
    members = [item.key for u in planned.units[:5] for item in tar_items(u.source, u.start, u.stop, {})]
    assert members == [item.key for item in tar_items(planned.units[0].source, 0, units.END, {})]
    assert len(members) == 40
