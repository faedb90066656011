"""The output contract: one Parquet row per input object.

| column          | type                 | notes                                            |
|-----------------|----------------------|--------------------------------------------------|
| uri             | string               | the input URI exactly, scheme included; a shard member's opens it with fsspec |
| key             | string               | a shard member's WebDataset key / Parquet id; null for loose objects |
| width, height   | int32                | after EXIF orientation; null if never decoded    |
| status          | string               | "ok" or "error"                                  |
| error           | string               | null when ok, otherwise a human-readable reason  |
| masks           | list<MASK_STRUCT>    | one struct per mask                              |
| num_masks       | int32                | len(masks)                                       |
| image_sha256    | string               | sha256 of the stored bytes; null if never read   |
| read_s          | float64              | seconds spent reading the object                 |
| decode_s        | float64              | seconds spent decoding                           |
| annotate_s      | float64              | this image's share of its annotate batch         |

MASK_STRUCT: segmentation struct<size: list<int32> [h, w], counts: string (COCO compressed
RLE)>, area int64, bbox list<float64> XYWH, predicted_iou float32, point_coords
list<list<float64>>, stability_score float32, crop_box list<float64> XYWH.

Plain pyarrow and DuckDB read it; no project code is needed.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"
# An item that gets no row (a blank stretch of a manifest, an image without prompts): it travels
# to the writer only so that its unit can be seen complete. Never written.
STATUS_SKIP = "skip"

# Where each item belongs, from the read stage to the writer: the unit's id, the item's position
# in the unit, and whether it is the unit's last item. The writer names files after them and the
# driver commits a unit from them; they are not part of the output rows.
UNIT_COLUMNS = ("unit", "unit_index", "unit_last")

SEGMENTATION_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

MASK_FIELDS = [
    pa.field("segmentation", SEGMENTATION_TYPE),
    pa.field("area", pa.int64()),
    pa.field("bbox", pa.list_(pa.float64())),
    pa.field("predicted_iou", pa.float32()),
    pa.field("point_coords", pa.list_(pa.list_(pa.float64()))),
    pa.field("stability_score", pa.float32()),
    pa.field("crop_box", pa.list_(pa.float64())),
]
MASK_STRUCT = pa.struct(MASK_FIELDS)

TIMING_COLUMNS = ("read_s", "decode_s", "annotate_s")


def output_schema(extra_mask_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    """The row schema; `extra_mask_fields` lets a prompted mode carry e.g. label/score per mask."""
    mask_struct = pa.struct(MASK_FIELDS + list(extra_mask_fields))
    return pa.schema(
        [
            pa.field("uri", pa.string(), nullable=False),
            pa.field("key", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("status", pa.string(), nullable=False),
            pa.field("error", pa.string()),
            pa.field("masks", pa.list_(mask_struct)),
            pa.field("num_masks", pa.int32()),
            pa.field("image_sha256", pa.string()),
        ]
        + [pa.field(name, pa.float64()) for name in TIMING_COLUMNS]
    )


OUTPUT_SCHEMA = output_schema()

SIDECAR_PREFIX = "sidecar_"


def with_sidecars(schema: pa.Schema, sidecars: Sequence[str]) -> pa.Schema:
    """``schema`` plus a nullable string column ``sidecar_<ext>`` per requested shard sidecar."""
    for ext in sidecars:
        schema = schema.append(pa.field(SIDECAR_PREFIX + ext, pa.string()))
    return schema


def encode_rle(mask: np.ndarray) -> dict:
    """HxW bool mask -> COCO compressed RLE {"size": [h, w], "counts": str} (pycocotools)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(segmentation: dict) -> np.ndarray:
    """COCO compressed RLE (as stored in a row) -> HxW bool mask."""
    from pycocotools import mask as mask_utils

    counts = segmentation["counts"]
    rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def record_to_mask(record: dict) -> dict:
    """One AutomaticMaskGenerator record (output_mode="coco_rle" or "binary_mask") -> MASK_STRUCT value."""
    segmentation = record["segmentation"]
    if isinstance(segmentation, np.ndarray):
        segmentation = encode_rle(segmentation)
    counts = segmentation["counts"]
    return {
        "segmentation": {
            "size": [int(v) for v in segmentation["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
        },
        "area": int(record["area"]),
        "bbox": [float(v) for v in record["bbox"]],
        "predicted_iou": float(record["predicted_iou"]),
        "point_coords": [[float(v) for v in point] for point in record["point_coords"]],
        "stability_score": float(record["stability_score"]),
        "crop_box": [float(v) for v in record["crop_box"]],
    }


def ok_row(
    uri: str,
    width: int,
    height: int,
    records: Iterable[dict],
    image_sha256: Optional[str],
    timings: Optional[dict] = None,
) -> dict:
    """A row for a successfully annotated image."""
    masks = [record_to_mask(record) for record in records]
    return {
        "uri": uri,
        "width": int(width),
        "height": int(height),
        "status": STATUS_OK,
        "error": None,
        "masks": masks,
        "num_masks": len(masks),
        "image_sha256": image_sha256,
        **_timings(timings),
    }


def error_row(
    uri: str,
    reason: str,
    width: Optional[int] = None,
    height: Optional[int] = None,
    image_sha256: Optional[str] = None,
    timings: Optional[dict] = None,
) -> dict:
    """A row for an input that could not be annotated; `reason` is shown to people."""
    return {
        "uri": uri,
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "status": STATUS_ERROR,
        "error": str(reason),
        "masks": [],
        "num_masks": 0,
        "image_sha256": image_sha256,
        **_timings(timings),
    }


def skip_row(uri: str = "") -> dict:
    """The placeholder row of an item that is not written (see ``STATUS_SKIP``)."""
    return {**error_row(uri, ""), "status": STATUS_SKIP, "error": None}


def rows_to_table(rows: Sequence[dict], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Table:
    """Rows (dicts with exactly the schema's columns) -> a table with exactly that schema."""
    return pa.Table.from_pylist(list(rows), schema=schema)


def _timings(timings: Optional[dict]) -> dict:
    timings = timings or {}
    return {name: _float_or_none(timings.get(name)) for name in TIMING_COLUMNS}


def _float_or_none(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value
