"""The output contract: exact Arrow types, COCO RLE that pycocotools reads, rows any reader can use."""
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline.output import schema


def blob_mask(height=37, width=53, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), bool)
    mask[5:20, 7:40] = True
    mask[rng.integers(0, height, 30), rng.integers(0, width, 30)] = True
    return mask


def binary_record(mask):
    ys, xs = np.nonzero(mask)
    return {
        "segmentation": mask,
        "area": int(mask.sum()),
        "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
        "predicted_iou": 0.91,
        "point_coords": [[3.5, 4.25]],
        "stability_score": 0.97,
        "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
    }


def test_schema_has_the_documented_columns_and_types():
    s = schema.OUTPUT_SCHEMA
    assert s.names == ["uri", "key", "width", "height", "status", "error", "masks", "num_masks", "image_sha256",
                       "read_s", "decode_s", "annotate_s"]
    assert s.field("width").type == pa.int32() and s.field("height").type == pa.int32()
    assert s.field("key").type == pa.string() and s.field("key").nullable
    mask = s.field("masks").type.value_type
    assert mask.field("segmentation").type == pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    assert mask.field("area").type == pa.int64()
    assert mask.field("bbox").type == pa.list_(pa.float64())
    assert mask.field("predicted_iou").type == pa.float32()
    assert mask.field("stability_score").type == pa.float32()
    assert mask.field("point_coords").type == pa.list_(pa.list_(pa.float64()))
    assert mask.field("crop_box").type == pa.list_(pa.float64())


def test_rle_matches_pycocotools_and_round_trips():
    mask = blob_mask()
    rle = schema.encode_rle(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}) == mask.sum()
    np.testing.assert_array_equal(schema.decode_rle(rle), mask)


def test_binary_and_rle_records_give_the_same_row():
    mask = blob_mask()
    from_binary = schema.record_to_mask(binary_record(mask))
    rle_record = {**binary_record(mask), "segmentation": schema.encode_rle(mask)}
    assert schema.record_to_mask(rle_record) == from_binary
    assert from_binary["area"] == mask.sum()


def test_error_row_has_no_masks_and_a_reason():
    row = schema.error_row("s3://b/x.jpg", "truncated")
    assert (row["status"], row["error"], row["masks"], row["num_masks"]) == ("error", "truncated", [], 0)
    assert row["width"] is None


def test_plain_pyarrow_and_duckdb_read_a_written_table(tmp_path):
    masks = [blob_mask(seed=1), blob_mask(seed=2)]
    ok = schema.ok_row("s3://b/ok.png", 53, 37, [binary_record(m) for m in masks], "ab" * 32, {"decode_s": 0.5})
    table = schema.rows_to_table([ok, schema.error_row("s3://b/bad.png", "not an image")])
    path = tmp_path / "part.parquet"
    pq.write_table(table, path)

    back = pq.read_table(path)
    assert back.schema.equals(schema.OUTPUT_SCHEMA)
    first = back.to_pylist()[0]
    for stored, truth in zip(first["masks"], masks):
        np.testing.assert_array_equal(schema.decode_rle(stored["segmentation"]), truth)
        assert stored["area"] == truth.sum()
    assert first["decode_s"] == pytest.approx(0.5)

    rows = duckdb.sql(
        f"SELECT uri, status, num_masks, masks[1].segmentation.size AS size, masks[1].area AS area "
        f"FROM read_parquet('{path}') ORDER BY uri"
    ).fetchall()
    assert rows == [("s3://b/bad.png", "error", 0, None, None),
                    ("s3://b/ok.png", "ok", 2, [37, 53], int(masks[0].sum()))]
