"""Masks <-> run-length encodings.

Uncompressed RLE is pycocotools' format: ``{"size": [h, w], "counts": [n0, n1, ...]}`` with runs
over the mask in column-major (Fortran) order, starting with a run of zeros (possibly empty).
COCO RLE is the compressed string form, produced by pycocotools.

Inside the generator the counts stay NumPy uint32 arrays (``masks_to_rle_arrays``): a noisy mask
has tens of thousands of runs, and holding, summing and decoding them as Python lists of ints
measured slower than the rest of the per-mask work put together. ``rle_area``, ``rle_to_mask``
and ``rle_to_coco`` take either form; ``masks_to_rle`` gives the list form that
segment-anything returns.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Encode a batch of (B, H, W) bool masks as B uncompressed RLE dicts with list counts."""
    return [with_list_counts(rle) for rle in masks_to_rle_arrays(masks)]


def with_list_counts(rle: dict[str, Any]) -> dict[str, Any]:
    """An RLE whose counts are a plain list of ints (segment-anything's and pycocotools' form)."""
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.tolist() if isinstance(counts, np.ndarray) else counts}


def masks_to_rle_arrays(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Encode a batch of masks in one vectorised pass.

    Args:
        masks: (B, H, W) bool.
    Returns:
        B uncompressed RLE dicts whose counts are uint32 NumPy arrays.
    """
    batch, height, width = masks.shape
    if batch == 0:
        return []
    flat = masks.transpose(1, 2).reshape(batch, height * width)
    changes = flat[:, 1:] != flat[:, :-1]
    mask_index, position = changes.nonzero(as_tuple=True)
    per_mask = torch.bincount(mask_index, minlength=batch).cpu().numpy()
    run_starts = (position + 1).cpu().numpy()  # every run but each mask's first, masks end to end
    starts_with_one = flat[:, 0].cpu().numpy()
    # Run lengths between consecutive starts; a mask's first start counts from 0.
    lengths = np.diff(run_starts, prepend=0)
    offsets = np.concatenate(([0], np.cumsum(per_mask)))
    first = offsets[:-1][per_mask > 0]
    lengths[first] = run_starts[first]
    total = height * width
    size = [int(height), int(width)]
    out = []
    for i in range(batch):
        begin, end = offsets[i], offsets[i + 1]
        lead = int(starts_with_one[i])  # an empty run of zeros comes first
        counts = np.empty(lead + end - begin + 1, dtype=np.uint32)
        counts[:lead] = 0
        counts[lead:-1] = lengths[begin:end]
        counts[-1] = total - (run_starts[end - 1] if end > begin else 0)
        out.append({"size": size, "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE to an (H, W) bool array."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"])
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    counts = rle["counts"]
    if isinstance(counts, np.ndarray):
        return int(counts[1::2].sum(dtype=np.int64))
    return int(sum(counts[1::2]))


def rle_to_coco(rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> COCO RLE ``{"size": [h, w], "counts": str}`` (pycocotools' compression)."""
    from pycocotools import mask as mask_utils

    height, width = rle["size"]
    coco = mask_utils.frPyObjects(rle, height, width)  # takes list or array counts
    return {"size": [int(v) for v in coco["size"]], "counts": coco["counts"].decode("ascii")}
