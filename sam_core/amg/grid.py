"""Where the automatic mask generator prompts: point grids and crop boxes.

Points are normalised to [0, 1] as (x, y); crop boxes are integer pixel boxes XYXY.
"""
from __future__ import annotations

import math

import numpy as np


def build_point_grid(n_per_side: int) -> np.ndarray:
    """An ``n_per_side`` x ``n_per_side`` grid of cell centres in [0, 1]^2.

    Returns float64 (n_per_side**2, 2) as (x, y), x varying fastest (row-major over the image).
    """
    half_cell = 1.0 / (2 * n_per_side)
    centres = np.linspace(half_cell, 1.0 - half_cell, n_per_side)
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer (layer 0 is the whole image); layer i has
    ``int(n_per_side / scale_per_layer**i)`` points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def _crop_length(image_length: int, n_crops: int, overlap: int) -> int:
    """Length of each of ``n_crops`` equal crops covering ``image_length`` with ``overlap`` between neighbours."""
    return int(math.ceil((overlap * (n_crops - 1) + image_length) / n_crops))


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of every layer, the whole image first.

    Layer i >= 1 tiles the image with (2**i) x (2**i) crops that overlap by
    ``overlap_ratio * short_side * 2 / 2**i`` pixels. Within a layer, crops are ordered with y varying
    fastest (column by column), as segment-anything orders them.

    Args:
        image_size: (height, width) of the image.
    Returns:
        (boxes, layer_indices): boxes as [x0, y0, x1, y1] integer pixel boxes (x1, y1 exclusive).
    """
    height, width = image_size
    short_side = min(height, width)
    boxes, layers = [[0, 0, width, height]], [0]
    for layer in range(1, n_layers + 1):
        n_per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w = _crop_length(width, n_per_side, overlap)
        crop_h = _crop_length(height, n_per_side, overlap)
        x_starts = [int((crop_w - overlap) * i) for i in range(n_per_side)]
        y_starts = [int((crop_h - overlap) * i) for i in range(n_per_side)]
        for x0 in x_starts:
            for y0 in y_starts:
                boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
                layers.append(layer)
    return boxes, layers
