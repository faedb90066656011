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
    """Encode a batch of (B, H, W) bool masks; counts are uint32 NumPy arrays."""
    return transposed_masks_to_rle_arrays(masks.transpose(1, 2))


def transposed_masks_to_rle_arrays(masks_t: torch.Tensor) -> list[dict[str, Any]]:
    """``masks_to_rle_arrays`` for masks given transposed, (B, W, H): RLE runs down the columns,
    so a contiguous transposed batch is already in run order and needs no copy.

    One vectorised pass finds every change point of the batch; only those leave the device.
    """
    batch, width, height = masks_t.shape
    if batch == 0:
        return []
    flat = masks_t.reshape(batch, width * height)
    span = width * height - 1  # change slots per mask
    hits = (flat[:, 1:] != flat[:, :-1]).view(-1).nonzero().view(-1)  # mask * span + slot, ascending
    per_mask = torch.searchsorted(hits, torch.arange(batch + 1, device=hits.device) * span)
    hits, per_mask = hits.cpu().numpy(), per_mask.cpu().numpy()
    starts_with_one = flat[:, 0].cpu().numpy()
    # Run lengths between consecutive change points; a mask's first run starts at its pixel 0.
    lengths = np.diff(hits, prepend=0)
    mask_base = np.arange(batch) * span - 1  # hit - base = the pixel that starts a new run
    firsts = per_mask[:-1][per_mask[1:] > per_mask[:-1]]
    lengths[firsts] = hits[firsts] - mask_base[per_mask[1:] > per_mask[:-1]]
    total = width * height
    size = [int(height), int(width)]
    out = []
    for i in range(batch):
        begin, end = per_mask[i], per_mask[i + 1]
        lead = int(starts_with_one[i])  # an empty run of zeros comes first
        counts = np.empty(lead + end - begin + 1, dtype=np.uint32)
        counts[:lead] = 0
        counts[lead:-1] = lengths[begin:end]
        counts[-1] = total - (hits[end - 1] - mask_base[i] if end > begin else 0)
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
