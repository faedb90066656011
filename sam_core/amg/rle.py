"""Masks <-> run-length encodings.

Uncompressed RLE is pycocotools' format: ``{"size": [h, w], "counts": [n0, n1, ...]}`` with runs
over the mask in column-major (Fortran) order, starting with a run of zeros (possibly empty).
COCO RLE is the compressed string form, produced by pycocotools.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Encode a batch of masks in one vectorised pass.

    Args:
        masks: (B, H, W) bool.
    Returns:
        B uncompressed RLE dicts.
    """
    batch, height, width = masks.shape
    if batch == 0:
        return []
    flat = masks.transpose(1, 2).reshape(batch, height * width)
    changes = flat[:, 1:] != flat[:, :-1]
    mask_index, position = changes.nonzero(as_tuple=True)
    # Run boundaries of every mask, laid end to end: 0, each change + 1, H*W.
    per_mask = torch.bincount(mask_index, minlength=batch).cpu().numpy()
    positions = (position + 1).cpu().numpy()
    starts_with_one = flat[:, 0].cpu().numpy()
    size = [int(height), int(width)]
    out = []
    offset = 0
    for i in range(batch):
        bounds = np.empty(per_mask[i] + 2, dtype=np.int64)
        bounds[0] = 0
        bounds[1:-1] = positions[offset : offset + per_mask[i]]
        bounds[-1] = height * width
        offset += per_mask[i]
        counts = np.diff(bounds).tolist()
        if starts_with_one[i]:
            counts.insert(0, 0)
        out.append({"size": size, "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE to an (H, W) bool array."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def rle_to_coco(rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> COCO RLE ``{"size": [h, w], "counts": str}`` (pycocotools' compression)."""
    from pycocotools import mask as mask_utils

    height, width = rle["size"]
    coco = mask_utils.frPyObjects(rle, height, width)
    return {"size": [int(v) for v in coco["size"]], "counts": coco["counts"].decode("ascii")}
