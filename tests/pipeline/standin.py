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
