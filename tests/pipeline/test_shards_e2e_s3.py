"""Shards end to end on a real S3 server (SeaweedFS): SA-1B-style tars by brace pattern, a damaged
shard, a rerun, a late shard, HF-style Parquet with a garbage cell, and export and preview of the rows."""
import hashlib
import json

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs import annotate as cli
from jobs import export, preview
from pipeline.inputs.read import fetch_bytes
from tests.pipeline.shard_corpus import damaged_shard, hf_parquet, sa1b_annotation, sa1b_members, tar_bytes
from tests.sam_factory import make_official_sam, save_official_checkpoint

pytestmark = pytest.mark.s3

PREFIX = "s3://images/shards-e2e"
AMG = ["--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def corpus(s3, ray_session, tmp_path_factory):
    fs = s3.filesystem()
    fs.pipe(f"{PREFIX}/sa1b/sa_000000.tar", tar_bytes(sa1b_members(0, 4)))
    damaged, damaged_keys = damaged_shard(10)
    fs.pipe(f"{PREFIX}/sa1b/sa_000001.tar", damaged)
    parquet, *hf_images = hf_parquet(None, 5, garbage_row=2)
    fs.pipe(f"{PREFIX}/hf/train-00000-of-00001.parquet", parquet)
    checkpoint = save_official_checkpoint(make_official_sam(seed=11), tmp_path_factory.mktemp("ckpt") / "t.pth")
    fs.put(str(checkpoint), "models/shards-e2e/tiny.pth")
    return {"damaged_keys": damaged_keys, "hf_images": hf_images}


def annotate(output: str, *args) -> int:
    return cli.main(["--output", output, "--checkpoint", "s3://models/shards-e2e/tiny.pth", "--num-actors", "1",
                     "--batch-size", "2", "--no-progress", *AMG, *args])


def rows_of(s3, output: str) -> dict:
    fs = s3.filesystem()
    fs.invalidate_cache()
    table = pq.read_table(output.removeprefix("s3://"), filesystem=fs)
    return {row["uri"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def sa1b_run(s3, corpus):
    output = f"s3://annotations/shards-e2e/sa1b-out"
    brace = f"{PREFIX}/sa1b/sa_{{000000..000001}}.tar"
    assert annotate(output, "--input", brace, "--sidecar", "json") == 0
    return {"output": output, "brace": brace, "rows": rows_of(s3, output)}


def test_every_image_member_gets_a_row_with_its_key_sidecar_and_a_uri_that_opens_it(sa1b_run, corpus):
    rows = sa1b_run["rows"]
    members = {row["key"]: row for row in rows.values() if row["key"]}
    assert sorted(members) == sorted([f"sa_{n}" for n in range(4)] + corpus["damaged_keys"])  # no README row
    for key, row in members.items():
        assert row["uri"].startswith("tar://") and row["uri"].endswith(".tar")
        assert hashlib.sha256(fetch_bytes(row["uri"])).hexdigest() == row["image_sha256"]
        if row["uri"].endswith("sa_000000.tar"):  # fsspec opens a member of a whole shard by itself
            with fsspec.open(row["uri"], "rb") as handle:
                assert hashlib.sha256(handle.read()).hexdigest() == row["image_sha256"]
        if key == "sa_13":  # the truncated member came without a json: null, not ""
            assert row["sidecar_json"] is None
        else:
            assert json.loads(row["sidecar_json"]) == sa1b_annotation(key)
    assert members["sa_13"]["status"] == "error" and "corrupt or truncated" in members["sa_13"]["error"]
    assert all(members[f"sa_{n}"]["status"] == "ok" and members[f"sa_{n}"]["num_masks"] > 0 for n in range(4))


def test_a_damaged_shard_gives_its_rows_before_the_damage_and_one_error_row_naming_it(sa1b_run):
    rows = sa1b_run["rows"]
    shard = f"{PREFIX}/sa1b/sa_000001.tar"
    assert rows[shard]["status"] == "error" and rows[shard]["key"] is None
    assert "tar shard is damaged after member" in rows[shard]["error"] and "sa_14.json" in rows[shard]["error"]
    assert sum(row["uri"].endswith("sa_000001.tar") for row in rows.values()) == 1 + 5  # 5 images + the error


def test_a_rerun_adds_nothing_and_a_new_shard_only_its_own_rows(sa1b_run, s3, monkeypatch):
    def no_ray(address):
        raise AssertionError("a rerun with nothing to do must not start Ray")

    before = sa1b_run["rows"]
    with monkeypatch.context() as patch:
        patch.setattr(cli, "init_ray", no_ray)
        assert annotate(sa1b_run["output"], "--input", sa1b_run["brace"], "--sidecar", "json") == 0
    assert rows_of(s3, sa1b_run["output"]).keys() == before.keys()

    s3.filesystem().pipe(f"{PREFIX}/sa1b/sa_000002.tar", tar_bytes(sa1b_members(20, 2)))
    wider = f"{PREFIX}/sa1b/sa_{{000000..000002}}.tar"
    assert annotate(sa1b_run["output"], "--input", wider, "--sidecar", "json") == 0
    after = rows_of(s3, sa1b_run["output"])
    assert sorted(set(after) - set(before)) == sorted(f"tar://sa_{n}.jpg::{PREFIX}/sa1b/sa_000002.tar"
                                                      for n in (20, 21))
    assert len(after) == len(before) + 2


def test_export_names_sa1b_files_by_key_and_preview_renders_shard_rows(sa1b_run, tmp_path):
    counts = export.write_sa1b(sa1b_run["output"], str(tmp_path / "sa1b"))
    names = sorted(p.name for p in (tmp_path / "sa1b").iterdir())
    assert counts.images == len(names) and "sa_0.json" in names and "sa_10.json" in names
    record = json.loads((tmp_path / "sa1b" / "sa_1.json").read_text())
    assert record["image"]["file_name"].startswith("tar://sa_1.jpg::")
    written = preview.write_previews(sa1b_run["output"], str(tmp_path / "preview"), n=3)
    assert len(written) == 3 and all((tmp_path / "preview" / path.rsplit("/", 1)[1]).exists() for path, _ in written)
    assert any("_sa_" in path.rsplit("/", 1)[1] for path, _ in written)  # named after the key


def test_hf_parquet_rows_by_index_and_by_id_with_one_garbage_cell(s3, corpus):
    prefix_output = "s3://annotations/shards-e2e/hf-out"
    assert annotate(prefix_output, "--input", f"{PREFIX}/hf/") == 0
    rows = rows_of(s3, prefix_output)
    file_uri = f"{PREFIX}/hf/train-00000-of-00001.parquet"
    assert sorted(rows) == sorted(f"{file_uri}#row={k}" for k in range(5))
    assert [rows[f"{file_uri}#row={k}"]["status"] for k in range(5)] == ["ok", "ok", "error", "ok", "ok"]
    assert "not a recognised image format" in rows[f"{file_uri}#row=2"]["error"]
    assert fetch_bytes(f"{file_uri}#row=3") == corpus["hf_images"][3]

    by_id_output = "s3://annotations/shards-e2e/hf-by-id"
    assert annotate(by_id_output, "--input", file_uri, "--id-column", "id") == 0
    by_id = rows_of(s3, by_id_output)
    assert sorted(by_id) == sorted(f"{file_uri}#id=id-{k:03d}" for k in range(5))
    assert by_id[f"{file_uri}#id=id-004"]["key"] == "id-004"
    assert fetch_bytes(f"{file_uri}#id=id-004") == corpus["hf_images"][4]
