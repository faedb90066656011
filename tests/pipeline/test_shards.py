"""Shards on local disk: tar members streamed with their keys and sidecars, damage reported where it
happened, Parquet image bytes, brace notation, and every row's image fetched back from its uri."""
import json

import fsspec
import pytest

from pipeline.inputs import sources, units
from pipeline.inputs.read import fetch_bytes, parquet_image_items, tar_items, webdataset_key
from tests.pipeline.shard_corpus import damaged_shard, hf_parquet, sa1b_members, tar_bytes


def test_webdataset_keys_split_at_the_first_dot_of_the_name():
    assert webdataset_key("sa_1.jpg") == ("sa_1", "jpg")
    assert webdataset_key("dir/x.y/sample.seg.png") == ("dir/x.y/sample", "seg.png")


def test_brace_notation_expands_to_the_shard_names():
    assert sources.expand_braces("s3://b/sa_{000008..000010}.tar") == [
        "s3://b/sa_000008.tar", "s3://b/sa_000009.tar", "s3://b/sa_000010.tar"]
    assert sources.expand_braces("s3://b/{a,b}/{1..2}.tar") == ["s3://b/a/1.tar", "s3://b/a/2.tar",
                                                                "s3://b/b/1.tar", "s3://b/b/2.tar"]


def test_a_tar_gives_one_item_per_image_member_with_its_key_and_sidecar(tmp_path):
    shard = tmp_path / "sa_000000.tar"
    members = sa1b_members(1, 3)
    shard.write_bytes(tar_bytes(members))
    items = list(tar_items(str(shard), 0, units.END, {}, sidecars=["json"]))
    assert [item.key for item in items] == ["sa_1", "sa_2", "sa_3"]
    assert [item.data for item in items] == [data for name, data in members if name.endswith(".jpg")]
    assert json.loads(items[1].sidecars["json"])["image"]["file_name"] == "sa_2.jpg"
    for item in items:  # the uri is the fsspec URL of exactly that member
        with fsspec.open(item.uri, "rb") as handle:
            assert handle.read() == item.data
    assert [i.key for i in tar_items(str(shard), 1, 2, {})] == ["sa_2"]  # a range of the images


def test_a_damaged_shard_gives_the_images_before_the_damage_and_one_error_naming_it(tmp_path):
    shard = tmp_path / "sa_000001.tar"
    data, whole_keys = damaged_shard(10)
    shard.write_bytes(data)
    items = list(tar_items(str(shard), 0, units.END, {}))
    good, last = items[:-1], items[-1]
    assert [item.key for item in good] == whole_keys  # README.txt got no item; the cut member none either
    assert all(item.error is None for item in good)
    assert last.uri == str(shard) and "tar shard is damaged after member" in last.error
    assert "sa_14.json" in last.error and "near byte" in last.error


def test_a_shard_that_is_not_a_tar_or_is_missing_is_one_error_item(tmp_path):
    (tmp_path / "page.tar").write_text("<html>404</html>")
    (item,) = tar_items(str(tmp_path / "page.tar"), 0, units.END, {})
    assert "damaged before its first member" in item.error
    (item,) = tar_items(str(tmp_path / "gone.tar"), 0, units.END, {})
    assert "not found" in item.error


def test_parquet_image_rows_get_uris_that_fetch_their_bytes_back(tmp_path):
    path = tmp_path / "train-00000.parquet"
    _, *images = hf_parquet(path, 7, garbage_row=4)
    items = list(parquet_image_items(str(path), 0, units.END, {}))
    assert [item.uri.rsplit("#", 1)[1] for item in items] == [f"row={k}" for k in range(7)]
    assert [item.key for item in items] == [str(k) for k in range(7)]
    for k, item in enumerate(items):
        assert fetch_bytes(item.uri) == item.data
        if k != 4:
            assert item.data == images[k]
    by_id = list(parquet_image_items(str(path), 2, 4, {}, id_column="id"))
    assert [item.uri.rsplit("#", 1)[1] for item in by_id] == ["id=id-002", "id=id-003"]
    assert fetch_bytes(by_id[1].uri) == images[3]


def test_a_parquet_without_image_bytes_is_one_error_item(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"caption": ["a"]}), path)
    (item,) = parquet_image_items(str(path), 0, units.END, {})
    assert "no image column" in item.error


def test_planning_gives_one_unit_per_shard_and_only_new_shards_on_a_rerun(tmp_path):
    for n in range(3):
        (tmp_path / f"sa_{n:06d}.tar").write_bytes(tar_bytes(sa1b_members(n * 10, 2)))
    pattern = str(tmp_path / "sa_{000000..000002}.tar")
    plan = units.plan_units(pattern, {}, set(), unit_size=1024, limit=None, output=None, run_index=1)
    assert [u.kind for u in plan.units] == ["tar"] * 3 and all(u.id.endswith("-0-end") for u in plan.units)
    committed = {u.id for u in plan.units}
    assert units.plan_units(pattern, {}, committed, unit_size=1024, limit=None, output=None, run_index=2).units == []
    wider = str(tmp_path / "sa_{000000..000003}.tar")
    (tmp_path / "sa_000003.tar").write_bytes(tar_bytes(sa1b_members(30, 2)))
    (new,) = units.plan_units(wider, {}, committed, unit_size=1024, limit=None, output=None, run_index=2).units
    assert new.source.endswith("sa_000003.tar")
    limited = units.plan_units(pattern, {}, set(), unit_size=1024, limit=3, output=None, run_index=1).units
    assert [(u.start, u.stop) for u in limited] == [(0, 3)]  # the first shard's first 3 images
    rest = units.plan_units(pattern, {}, {u.id for u in limited}, unit_size=1024, limit=None, output=None,
                            run_index=2).units
    assert [(u.start, u.stop) for u in rest] == [(3, units.END), (0, units.END), (0, units.END)]


def test_a_parquet_file_of_images_is_a_shard_and_one_of_uris_a_manifest(tmp_path):
    hf_parquet(tmp_path / "images.parquet", 4)
    (unit,) = units.plan_units(str(tmp_path / "images.parquet"), {}, set(), unit_size=2, limit=None, output=None,
                               run_index=1).units
    assert unit.kind == "img"
    with pytest.raises(units.InputError, match="brace notation names shards"):
        units.plan_units(str(tmp_path / "{a,b}.jpg"), {}, set(), unit_size=2, limit=None, output=None, run_index=1)


def test_a_shard_cut_by_limit_reports_its_damage_once_whichever_unit_reaches_it(tmp_path):
    shard = tmp_path / "sa_000009.tar"
    data, whole_keys = damaged_shard(10)  # 5 images, then the damage
    shard.write_bytes(data)

    def errors(start, stop):
        return [item for item in tar_items(str(shard), start, stop, {}) if item.error and item.uri == str(shard)]

    assert len(errors(0, 3)) == 0 and len(errors(3, units.END)) == 1  # --limit 3, then the rest
    assert len(errors(0, 7)) == 1 and len(errors(7, units.END)) == 0  # --limit 7, then the rest
    (tmp_path / "gone.tar").unlink(missing_ok=True)
    assert len(list(tar_items(str(tmp_path / "gone.tar"), 0, 3, {}))) == 1
    assert list(tar_items(str(tmp_path / "gone.tar"), 3, units.END, {})) == []


def test_a_named_shard_that_is_not_there_yet_is_left_for_a_later_run(tmp_path):
    (tmp_path / "s_000000.tar").write_bytes(tar_bytes(sa1b_members(0, 2)))
    pattern = str(tmp_path / "s_{000000..000001}.tar")
    first = units.plan_units(pattern, {}, set(), unit_size=8, limit=None, output=None, run_index=1).units
    assert [u.source.rsplit("/", 1)[1] for u in first] == ["s_000000.tar"]
    (tmp_path / "s_000001.tar").write_bytes(tar_bytes(sa1b_members(10, 2)))  # it arrives
    later = units.plan_units(pattern, {}, {u.id for u in first}, unit_size=8, limit=None, output=None,
                             run_index=2).units
    assert [u.source.rsplit("/", 1)[1] for u in later] == ["s_000001.tar"]
    with pytest.raises(units.InputError, match="none of them there"):
        units.plan_units(str(tmp_path / "t_{0..1}.tar"), {}, set(), unit_size=8, limit=None, output=None,
                         run_index=1)


def test_a_limit_over_images_and_shards_takes_n_in_all(tmp_path):
    from pipeline.output.sink import Output

    (tmp_path / "in").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "in" / name).write_bytes(b"x")
    (tmp_path / "in" / "z.tar").write_bytes(tar_bytes(sa1b_members(0, 5)))
    planned = units.plan_units(str(tmp_path / "in"), {}, set(), unit_size=8, limit=4, output=Output(str(tmp_path / "o")),
                               run_index=1, staging_dir=str(tmp_path))
    assert sorted((u.kind, u.start, u.stop) for u in planned.units) == [("ls", 0, 2), ("tar", 0, 2)]
