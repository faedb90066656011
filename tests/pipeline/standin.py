"""A stand-in mask generator with the AutomaticMaskGenerator interface, for plan and sink tests.

It makes masks from the image itself (pixels brighter than the mean, and the top-left
quadrant), so rows are real, checkable data without any model.
"""
from __future__ import annotations

import numpy as np

from pipeline.modes.automatic import Annotator
from pipeline.output.schema import encode_rle


def fake_records(image: np.ndarray) -> list:
    height, width = image.shape[:2]
    bright = image.mean(axis=2) > image.mean()
    quadrant = np.zeros((height, width), bool)
    quadrant[: max(1, height // 2), : max(1, width // 2)] = True
    records = []
    for mask in (bright, quadrant):
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        records.append(
            {
                "segmentation": encode_rle(mask),
                "area": int(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                "predicted_iou": 0.9,
                "point_coords": [[float(xs[0]), float(ys[0])]],
                "stability_score": 0.95,
                "crop_box": [0.0, 0.0, float(width), float(height)],
            }
        )
    return records


class FakeGenerator:
    def generate(self, image):
        return fake_records(image)

    def generate_batch(self, images):
        return [fake_records(image) for image in images]


class StandInAnnotator(Annotator):
    """``Annotator`` with the stand-in generator instead of a SAM checkpoint."""

    def __init__(self, config: dict):
        super().__init__(config, generator_factory=lambda config, device: FakeGenerator())


class StandInPromptedAnnotator(StandInAnnotator):
    """``StandInAnnotator`` for prompted runs: rows of the prompted schema (the prompt fields null), and
    the prompts column consumed, as ``PromptedAnnotator`` does."""

    def __call__(self, batch: dict):
        import pyarrow as pa

        from pipeline.modes.prompted import PROMPTED_OUTPUT_SCHEMA, PROMPTS_COLUMN

        table = super().__call__({name: values for name, values in batch.items() if name != PROMPTS_COLUMN})
        rows = table.select(PROMPTED_OUTPUT_SCHEMA.names).to_pylist()
        prompted = pa.Table.from_pylist(rows, schema=PROMPTED_OUTPUT_SCHEMA)
        for name in table.column_names:
            if name not in PROMPTED_OUTPUT_SCHEMA.names:
                prompted = prompted.append_column(name, table[name])
        return prompted
