"""End to end on a real S3 server (SeaweedFS): photos and a tiny checkpoint in buckets, Parquet back.

The job gets its endpoint and credentials from the standard AWS environment (set by the `s3`
fixture for the driver and by `ray_session` for the workers), as it would on a cluster.
"""
import hashlib
import io
import json
import uuid

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import AnnotateConfig
from pipeline.inputs.decode import decode_image
from pipeline.run import run
from tests.mask_match import assert_masks_match
from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint

pytestmark = pytest.mark.s3

# Tiny grid; NMS off so that the random model yields many masks per image to compare.
AMG = dict(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
NAMES = ("p0.PNG", "nested/p1.jpg", "nested/deeper/p2.png")


@pytest.fixture(scope="module")
def checkpoint(s3, tmp_path_factory):
    local = save_official_checkpoint(make_official_sam(seed=0), tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    uri = f"s3://models/{uuid.uuid4().hex[:8]}/tiny_sam.pth"
    s3.filesystem().put(str(local), uri)
    return {"uri": uri, "local": local, "sha256": hashlib.sha256(local.read_bytes()).hexdigest()}


def encode(photo: np.ndarray, name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG" if name.lower().endswith(".jpg") else "PNG")
    return buffer.getvalue()


def upload_corpus(s3) -> dict:
    """Photos under a fresh prefix (plus a non-image that listing must skip); uri -> bytes."""
    prefix = f"s3://images/{uuid.uuid4().hex[:8]}/photos"
    fs = s3.filesystem()
    stored = {}
    for name, photo in zip(NAMES, real_photos()):
        stored[f"{prefix}/{name}"] = encode(photo, name)
        fs.pipe(f"{prefix}/{name}", stored[f"{prefix}/{name}"])
    fs.pipe(f"{prefix}/README.txt", b"not an image")
    return {"input": prefix + "/", "bytes": stored}


def make_config(corpus, checkpoint, **overrides) -> AnnotateConfig:
    output = f"s3://annotations/{uuid.uuid4().hex[:8]}/out"
    values = dict(input=corpus["input"], output=output, checkpoint=checkpoint["uri"], batch_size=2, rows_per_file=2)
    return AnnotateConfig(**{**values, **AMG, **overrides})


def arrow_s3(s3) -> pafs.S3FileSystem:
    """pyarrow's own S3 client: the output must need no project code to read."""
    host = s3.endpoint_url.split("://", 1)[1]
    return pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=s3.access_key,
                             secret_key=s3.secret_key, region="us-east-1")


def read_rows(s3, output: str) -> list:
    return pq.read_table(output.removeprefix("s3://"), filesystem=arrow_s3(s3)).to_pylist()


def data_file_names(s3, output: str) -> list:
    fs = s3.filesystem()
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[1] for p in fs.glob(output.removeprefix("s3://") + "/part-*.parquet"))


def test_rows_equal_the_generator_run_directly_on_each_image(ray_session, s3, checkpoint):
    from sam_core import AutomaticMaskGenerator, load_sam

    corpus = upload_corpus(s3)
    config = make_config(corpus, checkpoint)
    summary = run(config, progress=False)
    assert (summary.ok, summary.failed, summary.units_committed, summary.units_planned) == (3, 0, 1, 1)

    rows = {row["uri"]: row for row in read_rows(s3, config.output)}
    assert sorted(rows) == sorted(corpus["bytes"])  # scheme kept, README.txt skipped, one row each

    generator = AutomaticMaskGenerator(load_sam(str(checkpoint["local"])), output_mode="coco_rle", **AMG)
    for uri, data in corpus["bytes"].items():
        row, image = rows[uri], decode_image(data)
        assert (row["status"], row["error"]) == ("ok", None)
        assert (row["height"], row["width"]) == image.shape[:2]
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert row["num_masks"] == len(row["masks"]) > 0
        for mask in row["masks"]:
            rle = {"size": mask["segmentation"]["size"], "counts": mask["segmentation"]["counts"].encode()}
            decoded = mask_utils.decode(rle)
            assert decoded.shape == image.shape[:2]
            assert mask["area"] == int(decoded.sum())
        assert_masks_match(row["masks"], generator.generate(image))

    fs = s3.filesystem()
    manifest_text = fs.cat(config.output.removeprefix("s3://") + "/_run.json").decode()
    manifest = json.loads(manifest_text)
    assert manifest["status"] == "complete"
    assert manifest["checkpoint_sha256"] == checkpoint["sha256"]
    assert manifest["counts"]["ok"] == 3 and manifest["totals"]["units_committed"] == 1
    assert manifest["config"]["points_per_side"] == AMG["points_per_side"]
    assert s3.secret_key not in manifest_text
    assert fs.exists(config.output.removeprefix("s3://") + "/_SUCCESS")


def test_resume_rerun_new_inputs_and_overwrite(ray_session, s3, checkpoint):
    corpus = upload_corpus(s3)
    config = make_config(corpus, checkpoint, limit=2)
    assert run(config, progress=False).processed == 2

    config.limit = None  # the rest of the corpus: only the missing image is processed
    resumed = run(config, progress=False)
    assert (resumed.processed, resumed.units_done_before) == (1, 1)
    files = data_file_names(s3, config.output)

    def no_ray_needed():
        raise AssertionError("a rerun with nothing to do must not start Ray")

    rerun = run(config, progress=False, connect=no_ray_needed)  # complete: no work, no new file
    assert (rerun.processed, rerun.units_planned, rerun.units_done_before) == (0, 0, 2)
    assert data_file_names(s3, config.output) == files

    new_uri = corpus["input"] + "late/p3.png"  # a late arrival, listed between the others
    s3.filesystem().pipe(new_uri, encode(real_photos()[0][::2, ::2].copy(), "p3.png"))
    extended = run(config, progress=False)
    assert (extended.processed, extended.units_planned) == (1, 1)
    uris = [row["uri"] for row in read_rows(s3, config.output)]
    assert len(uris) == len(set(uris)) == 4 and new_uri in uris

    with pytest.raises(ValueError, match="points_per_side"):
        run(AnnotateConfig(**{**config.to_dict(), "points_per_side": 5}), progress=False)

    config.overwrite = True
    fresh = run(config, progress=False)
    assert (fresh.processed, fresh.units_done_before) == (4, 0)
    fs = s3.filesystem()
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(config.output.removeprefix("s3://") + "/_listings")] == ["0001.parquet"]
    uris = [row["uri"] for row in read_rows(s3, config.output)]
    assert len(uris) == len(set(uris)) == 4
