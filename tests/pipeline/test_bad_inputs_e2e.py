"""One end-to-end run of the real pipeline over every bad-input class of issue 5.

A directory holds the whole corpus of ``tests/pipeline/bad_inputs.py`` plus one object that is
deleted after the run has listed its inputs and before the read stage reaches it. The run
uses a tiny random-weight SAM checkpoint. Expected: one row per input, the right status and
reason per case, masks in displayed orientation, and good rows equal to what the generator
gives for those images on their own.
"""
import json

import pyarrow.parquet as pq
import pytest

from pipeline.inputs import units
from pipeline.config import AnnotateConfig
from pipeline.inputs.decode import decode_image
from pipeline.run import run
from pipeline.output.schema import decode_rle
from tests.mask_match import assert_masks_match
from tests.pipeline.bad_inputs import BOMB_MAX_PIXELS, corpus, jpeg, photo

AMG = dict(points_per_side=2, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
DELETED = "deleted_after_listing.jpg"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.sam_factory import make_official_sam, save_official_checkpoint

    return save_official_checkpoint(make_official_sam(seed=7), tmp_path_factory.mktemp("model") / "tiny.pth")


@pytest.fixture(scope="module")
def bad_input_run(ray_session, tiny_checkpoint, tmp_path_factory):
    cases = corpus()
    root = tmp_path_factory.mktemp("bad_inputs")
    images = root / "images"
    images.mkdir()
    for case in cases:
        (images / case.name).write_bytes(case.data)
    (images / DELETED).write_bytes(jpeg(photo(seed=9)))

    config = AnnotateConfig(
        input=str(images),
        output=str(root / "out"),
        checkpoint=str(tiny_checkpoint),
        max_pixels=BOMB_MAX_PIXELS,
        num_actors=1,
        batch_size=4,
        **AMG,
    )
    plan_units = units.plan_units

    def list_then_delete(*args, **kwargs):
        planned = plan_units(*args, **kwargs)
        (images / DELETED).unlink()  # gone between listing and reading
        return planned

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(units, "plan_units", list_then_delete)
        summary = run(config, progress=False)
    table = pq.read_table(str(root / "out"))
    rows = {row["uri"]: row for row in table.to_pylist()}
    return cases, images, summary, table, rows, root / "out"


def test_one_row_per_input_and_no_duplicates(bad_input_run):
    cases, images, summary, table, rows, _ = bad_input_run
    expected = {str(images / c.name) for c in cases} | {str(images / DELETED)}
    assert table.num_rows == len(expected) == len(rows)
    assert set(rows) == expected
    assert summary.ok + summary.failed == len(expected)


def test_object_deleted_after_listing_is_an_error_row(bad_input_run):
    _, images, _, _, rows, _ = bad_input_run
    row = rows[str(images / DELETED)]
    assert row["status"] == "error" and "not found" in row["error"]
    assert row["num_masks"] == 0 and not row["masks"]


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.name)
def test_each_case_has_the_right_row(bad_input_run, case):
    _, images, _, _, rows, _ = bad_input_run
    row = rows[str(images / case.name)]
    assert row["status"] == case.status, row["error"]
    if case.status == "error":
        assert case.reason in row["error"].lower()
        assert not row["masks"]
        return
    assert row["error"] is None
    assert (row["width"], row["height"]) == case.size_wh
    assert row["num_masks"] == len(row["masks"]) > 0
    for mask in row["masks"]:
        # Masks are in displayed orientation: the EXIF-rotated photo's masks are H x W as shown.
        assert mask["segmentation"]["size"] == [case.size_wh[1], case.size_wh[0]]
        assert mask["area"] == int(decode_rle(mask["segmentation"]).sum())


@pytest.mark.parametrize("name", ["good.jpg", "rotated.jpg", "cmyk.jpg"])
def test_good_rows_equal_the_generator_run_on_that_image_alone(bad_input_run, tiny_checkpoint, name):
    from sam_core import AutomaticMaskGenerator, load_sam

    cases, images, _, _, rows, _ = bad_input_run
    case = next(c for c in cases if c.name == name)
    generator = AutomaticMaskGenerator(load_sam(str(tiny_checkpoint)), output_mode="coco_rle", **AMG)
    expected = generator.generate(decode_image(case.data))
    assert_masks_match(rows[str(images / name)]["masks"], expected)


def test_run_manifest_counts_agree_with_rows(bad_input_run):
    _, _, summary, table, rows, out = bad_input_run
    manifest = json.loads((out / "_run.json").read_text())
    assert (out / "_SUCCESS").exists()
    errors = sum(1 for r in rows.values() if r["status"] == "error")
    assert manifest["counts"]["failed"] == errors == summary.failed
    assert manifest["counts"]["ok"] == table.num_rows - errors


def test_the_whole_output_reads_with_pyarrow_dataset_duckdb_and_the_export_reader(bad_input_run):
    """No project code needed: the data files are the output; _commits/, _listings/, _runs/ are skipped."""
    import duckdb
    import pyarrow.dataset as ds

    from jobs.export import iter_rows

    _, _, _, table, rows, out = bad_input_run
    assert (out / "_listings").is_dir() and (out / "_commits").is_dir()
    assert sorted(ds.dataset(str(out), format="parquet").to_table().column("uri").to_pylist()) == sorted(rows)
    found = duckdb.sql(f"SELECT uri FROM read_parquet('{out}/part-*.parquet')").fetchall()
    assert sorted(uri for (uri,) in found) == sorted(rows)
    assert sorted(row["uri"] for row in iter_rows(str(out), columns=["uri"])) == sorted(rows)
