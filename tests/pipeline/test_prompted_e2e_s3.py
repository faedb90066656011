"""Prompted mode end to end on a real S3 server (SeaweedFS): images, checkpoint and prompts table in
buckets, the Ray Data job, Parquet read back with plain pyarrow, masks equal to the reference
predictor's, per-row errors, resume, and the COCO export of the result."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from jobs import annotate as annotate_cli
from jobs import export
from pipeline.output import schema
from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint

pytestmark = pytest.mark.s3

SEED = 5
PREFIX = "prompted-e2e"


@pytest.fixture(scope="module")
def bucket_data(s3, tmp_path_factory):
    """Photos, a tiny checkpoint and a prompts table in the buckets; returns what was put there."""
    fs = s3.filesystem()
    photos = real_photos()
    uris = []
    for k, photo in enumerate(photos):
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="PNG")
        uri = f"s3://images/{PREFIX}/photo_{k}.png"
        fs.pipe(uri, buffer.getvalue())
        uris.append(uri)
    checkpoint = save_official_checkpoint(make_official_sam(seed=SEED), tmp_path_factory.mktemp("ckpt") / "t.pth")
    fs.put(str(checkpoint), f"models/{PREFIX}/tiny.pth")

    (h0, w0), (h1, w1), (h2, w2) = (p.shape[:2] for p in photos)
    table = [
        {"uri": uris[0], "boxes": [[0.1 * w0, 0.2 * h0, 0.5 * w0, 0.9 * h0], [0.4 * w0, 0.1 * h0, w0, 0.6 * h0]],
         "points": None, "point_labels": None, "labels": ["cup", "saucer"], "scores": [0.9, 0.7]},
        {"uri": uris[1], "boxes": None, "points": [[[0.5 * w1, 0.3 * h1]], [[0.2 * w1, 0.8 * h1], [0.7 * w1, 0.5 * h1]]],
         "point_labels": [[1], [1, 0]], "labels": ["face", "suit"], "scores": None},
        {"uri": uris[2], "boxes": [[0.0, 0.0, w2 + 40.0, h2]], "points": None, "point_labels": None,
         "labels": ["cat"], "scores": [0.5]},
        {"uri": f"s3://images/{PREFIX}/not-uploaded.png", "boxes": [[0.0, 0.0, 4.0, 4.0]], "points": None,
         "point_labels": None, "labels": ["ghost"], "scores": [0.1]},
    ]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table), buffer)
    fs.pipe(f"s3://annotations/{PREFIX}/prompts.parquet", buffer.getvalue())
    return {"uris": uris, "photos": photos, "table": table}


COMMAND = [
    "--input", f"s3://images/{PREFIX}/", "--output", f"s3://annotations/{PREFIX}/out",
    "--checkpoint", f"s3://models/{PREFIX}/tiny.pth", "--prompts", f"s3://annotations/{PREFIX}/prompts.parquet",
    "--points-per-batch", "2", "--batch-size", "2", "--num-actors", "1", "--no-progress",
]


def run_counts(s3) -> dict:
    fs = s3.filesystem()
    fs.invalidate_cache()  # the manifest was rewritten since this (shared) filesystem last listed it
    return json.loads(fs.cat_file(f"annotations/{PREFIX}/out/_run.json"))["counts"]


@pytest.fixture(scope="module")
def job(s3, ray_session, bucket_data):
    """`python -m jobs.annotate --prompts ...`, as a user runs it; then the rows, read with plain pyarrow."""
    assert annotate_cli.main(COMMAND) == 0
    rows = pq.read_table(f"annotations/{PREFIX}/out", filesystem=s3.filesystem()).to_pylist()
    return {"counts": run_counts(s3), "rows": {r["uri"]: r for r in rows}, "n_rows": len(rows)}


def test_one_row_per_prompted_image_with_clear_errors(job, bucket_data):
    uris = bucket_data["uris"]
    rows = job["rows"]
    assert job["n_rows"] == 4 and (job["counts"]["ok"], job["counts"]["failed"]) == (2, 2)
    assert [rows[u]["status"] for u in uris] == ["ok", "ok", "error"]
    assert "outside the 135x90 image" in rows[uris[2]]["error"]
    assert (rows[uris[2]]["width"], rows[uris[2]]["height"]) == (135, 90)
    missing = rows[f"s3://images/{PREFIX}/not-uploaded.png"]
    assert missing["status"] == "error" and "not in --input" in missing["error"]


def test_masks_equal_the_reference_predictor(job, bucket_data):
    from segment_anything import SamPredictor as ReferencePredictor

    reference = ReferencePredictor(make_official_sam(seed=SEED))
    for uri, photo, prompts in zip(bucket_data["uris"][:2], bucket_data["photos"], bucket_data["table"]):
        row = job["rows"][uri]
        reference.set_image(photo)
        calls = [dict(box=np.array(box), multimask_output=False) for box in prompts["boxes"] or []]
        for clicks, labels in zip(prompts["points"] or [], prompts["point_labels"] or []):
            calls.append(dict(point_coords=np.array(clicks), point_labels=np.array(labels),
                              multimask_output=len(clicks) == 1))
        assert row["num_masks"] == len(calls) == len(row["masks"])
        for index, (mask, call) in enumerate(zip(row["masks"], calls)):
            masks, ious, _ = reference.predict(**call)
            best = int(np.argmax(ious))
            decoded = schema.decode_rle(mask["segmentation"])
            assert decoded.shape == photo.shape[:2]
            np.testing.assert_array_equal(decoded, masks[best])
            assert mask["area"] == decoded.sum()
            assert mask["predicted_iou"] == pytest.approx(float(ious[best]), abs=1e-5)
            assert mask["prompt_index"] == index
            assert mask["prompt_label"] == prompts["labels"][index]
            assert mask["prompt_score"] == (None if prompts["scores"] is None else pytest.approx(prompts["scores"][index]))


def test_rerun_writes_nothing_new(job, s3):
    assert annotate_cli.main(COMMAND) == 0
    counts = run_counts(s3)
    assert (counts["ok"], counts["failed"], counts["units_planned"], counts["units_done_before"]) == (0, 0, 0, 2)
    rows = pq.read_table(f"annotations/{PREFIX}/out", filesystem=s3.filesystem())
    assert rows.num_rows == 4


def test_an_image_uploaded_after_its_not_in_input_row_gets_no_second_row(job, s3, bucket_data):
    missing = f"s3://images/{PREFIX}/not-uploaded.png"
    buffer = io.BytesIO()
    Image.fromarray(bucket_data["photos"][0]).save(buffer, format="PNG")
    s3.filesystem().pipe(missing, buffer.getvalue())
    try:
        assert annotate_cli.main(COMMAND) == 0
        rows = pq.read_table(f"annotations/{PREFIX}/out", filesystem=s3.filesystem()).to_pylist()
        assert [r["status"] for r in rows if r["uri"] == missing] == ["error"]  # error rows are final
        assert len(rows) == 4
    finally:
        s3.filesystem().rm(missing)


def test_coco_export_of_a_prompted_run_uses_labels_as_categories(job, tmp_path):
    coco_path = tmp_path / "coco.json"
    export.write_coco(f"s3://annotations/{PREFIX}/out", str(coco_path))
    coco = COCO(str(coco_path))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["cup", "face", "saucer", "suit"]
    assert len(coco.getAnnIds()) == 4
