"""A small annotation output on local disk, written as jobs.annotate writes it, for export/preview tests.

Masks are simple known shapes (rectangles, discs) so that tests can compare decoded masks with the
truth; the Parquet columns follow the output contract (``pipeline/output/schema.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.output import schema
from tests.sam_factory import real_photos

EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # the stored pixels must be rotated 90 degrees clockwise to display upright


def shape_masks(height: int, width: int) -> list[np.ndarray]:
    """Three bool (H, W) masks: a rectangle, a disc, a thin strip at the right edge."""
    rect = np.zeros((height, width), bool)
    rect[height // 8: height // 2, width // 8: width // 2] = True
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - 0.65 * height) ** 2 + (xx - 0.6 * width) ** 2 < (0.2 * min(height, width)) ** 2
    strip = np.zeros((height, width), bool)
    strip[:, width - 3:] = True
    return [rect, disc, strip]


def mask_record(mask: np.ndarray, iou: float) -> dict:
    """A generator-style record for a bool (H, W) mask (what ``schema.ok_row`` takes)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    return {
        "segmentation": mask,
        "area": int(mask.sum()),
        "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
        "predicted_iou": iou,
        "stability_score": 0.97,
        "point_coords": [[float(x0), float(y0)]],
        "crop_box": [0.0, 0.0, float(mask.shape[1]), float(mask.shape[0])],
    }


def write_annotated_output(root: Path, prompt_labels: list[str] | None = None) -> dict:
    """Write source images and a two-shard output under ``root``.

    Returns ``{"output": dir, "rows": [...], "masks": {uri: [bool masks]}}``. The second photo is
    stored sideways with an EXIF rotation, so its row's width/height are the upright ones. One row is
    an error row.
    """
    images_dir, output_dir = root / "images", root / "out"
    images_dir.mkdir(parents=True)
    output_dir.mkdir()
    rows, truth = [], {}
    for index, photo in enumerate(real_photos()):
        path = images_dir / f"photo_{index}.png"
        if index == 1:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = ROTATE_90_CW
            # stored pixels are the upright photo turned counter-clockwise
            Image.fromarray(np.rot90(photo, 1)).save(path, exif=exif)
        else:
            Image.fromarray(photo).save(path)
        height, width = photo.shape[:2]
        masks = shape_masks(height, width)
        uri = path.as_uri()
        truth[uri] = masks
        row = schema.ok_row(uri, width, height, [mask_record(m, 0.9 - 0.1 * k) for k, m in enumerate(masks)],
                            image_sha256=f"{index:064x}")
        for k, mask in enumerate(row["masks"]):
            mask["prompt_label"] = prompt_labels[k] if prompt_labels else None
        rows.append(row)
    rows.append(schema.error_row((images_dir / "broken.jpg").as_uri(), "cannot identify image file"))
    table_schema = schema.output_schema([pa.field("prompt_label", pa.string())])
    pq.write_table(schema.rows_to_table(rows[:2], table_schema), output_dir / "part-00000.parquet")
    pq.write_table(schema.rows_to_table(rows[2:], table_schema), output_dir / "part-00001.parquet")
    (output_dir / "_run.json").write_text(json.dumps({"parameters": {}}))
    return {"output": output_dir, "rows": rows, "masks": truth}
