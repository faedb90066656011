"""The Annotator actor class, called directly (no Ray): rows for every input, failures isolated."""
import numpy as np

from pipeline.output import schema
from pipeline.modes.automatic import Annotator
from pipeline.config import AnnotateConfig
from tests.mask_match import assert_masks_match
from tests.pipeline.standin import FakeGenerator, fake_records

CONFIG = AnnotateConfig(input="i", output="o", checkpoint="c").to_dict()


def batch(images, statuses, errors, shas):
    n = len(images)
    column = np.empty(n, dtype=object)
    column[:] = images
    return {
        "uri": np.array([f"s3://b/{i}.jpg" for i in range(n)], dtype=object),
        "image": column,
        "width": np.array([im.shape[1] for im in images], dtype=np.int32),
        "height": np.array([im.shape[0] for im in images], dtype=np.int32),
        "status": np.array(statuses, dtype=object),
        "error": errors,
        "image_sha256": shas,
        "decode_s": np.full(n, 0.01),
        "read_s": np.full(n, 0.02),
    }


def photo(h, w, seed):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_ok_and_decode_error_rows_keep_their_order_and_the_contract():
    annotator = Annotator(CONFIG, generator_factory=lambda config, device: FakeGenerator())
    images = [photo(20, 30, 0), np.zeros((0, 0, 3), np.uint8), photo(17, 11, 1)]
    table = annotator(batch(images, ["ok", "error", "ok"],
                            np.array([None, "not a recognised image format", None], dtype=object),
                            np.array(["a" * 64, None, "b" * 64], dtype=object)))
    assert table.schema.equals(schema.OUTPUT_SCHEMA)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"] == "not a recognised image format" and rows[1]["width"] is None
    expected = [schema.record_to_mask(r) for r in fake_records(images[0])]
    assert [(m["segmentation"], m["area"], m["bbox"]) for m in rows[0]["masks"]] == [
        (m["segmentation"], m["area"], m["bbox"]) for m in expected]
    assert (rows[2]["width"], rows[2]["height"], rows[2]["image_sha256"]) == (11, 17, "b" * 64)
    assert rows[0]["annotate_s"] >= 0 and rows[0]["read_s"] == 0.02


def test_all_null_text_columns_arriving_as_float32_nan_become_nulls():
    annotator = Annotator(CONFIG, generator_factory=lambda config, device: FakeGenerator())
    images = [np.zeros((0, 0, 3), np.uint8)] * 2
    nan = np.full(2, np.nan, dtype=np.float32)  # what Ray Data hands over for an all-None column
    rows = annotator(batch(images, ["error", "error"], nan, nan)).to_pylist()
    assert [(r["error"], r["image_sha256"]) for r in rows] == [("decode failed", None)] * 2


class OneBadImageGenerator(FakeGenerator):
    """Fails the batched call, and the single call for images 13 pixels high."""

    def generate_batch(self, images):
        raise RuntimeError("CUDA out of memory")

    def generate(self, image):
        if image.shape[0] == 13:
            raise RuntimeError("bad image")
        return super().generate(image)


def test_a_failing_batch_is_retried_image_by_image_and_only_the_bad_one_fails():
    annotator = Annotator(CONFIG, generator_factory=lambda config, device: OneBadImageGenerator())
    images = [photo(20, 30, 0), photo(13, 9, 1), photo(25, 25, 2)]
    none = np.array([None] * 3, dtype=object)
    rows = annotator(batch(images, ["ok"] * 3, none, none)).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "bad image" in rows[1]["error"] and (rows[1]["width"], rows[1]["height"]) == (9, 13)
    assert rows[2]["num_masks"] == len(fake_records(images[2]))


def test_one_map_batches_call_adds_the_annotate_stage_to_any_dataset_of_images(ray_session, tmp_path):
    """The public building block: ray.data.read_images -> map_batches(Annotator, ...), as the docstring shows."""
    import ray
    from PIL import Image

    from sam_core import AutomaticMaskGenerator, load_sam
    from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint

    checkpoint = str(save_official_checkpoint(make_official_sam(seed=2), tmp_path / "tiny.pth"))
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = real_photos()[:2]
    for k, image in enumerate(photos):
        Image.fromarray(image).save(folder / f"p{k}.png")
    amg = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)

    images = ray.data.read_images(str(folder), include_paths=True, mode="RGB")
    annotated = images.map_batches(Annotator, fn_constructor_kwargs={"checkpoint": checkpoint, **amg},
                                   compute=ray.data.ActorPoolStrategy(size=1), batch_size=2)
    rows = {row["uri"].rsplit("/", 1)[1]: row for row in annotated.take_all()}

    assert sorted(rows) == ["p0.png", "p1.png"]
    generator = AutomaticMaskGenerator(load_sam(checkpoint), output_mode="coco_rle", **amg)
    for k, image in enumerate(photos):
        row = rows[f"p{k}.png"]
        assert (row["status"], row["height"], row["width"]) == ("ok", *image.shape[:2])
        expected = generator.generate(image)
        assert row["num_masks"] == len(expected) > 0
        assert_masks_match(row["masks"], expected)
