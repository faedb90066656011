"""The Annotator actor class, called directly (no Ray): rows for every input, failures isolated."""
import numpy as np

from pipeline import schema
from pipeline.annotate import Annotator
from pipeline.config import AnnotateConfig
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
