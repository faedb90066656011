"""8-connected components of a binary mask, and removal of small holes and islands.

Pure numpy: the mask is cut into horizontal runs, runs in neighbouring rows that touch
(diagonals included) are joined, and components are the connected sets of runs. Labels are
numbered as OpenCV's block-based scan meets the components: by the first 2x2 pixel block (in
raster order of blocks) that holds a pixel of the component.
"""
from __future__ import annotations

import numpy as np


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in an (H, W) bool mask, in raster order.

    Returns (row, start, end) int64 arrays, ``end`` exclusive.
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends
    start_rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return start_rows.astype(np.int64), starts.astype(np.int64), ends.astype(np.int64)


def _touching_run_pairs(rows, starts, ends, width) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of runs where b is in the row below a and touches it 8-connectedly."""
    stride = width + 2
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    # Run b below a touches a when b.start <= a.end and b.end >= a.start (ends exclusive, so
    # these inequalities admit the diagonal neighbour). Keys sort runs in raster order.
    first = np.searchsorted(end_keys, (rows + 1) * stride + starts, side="left")
    stop = np.searchsorted(start_keys, (rows + 1) * stride + ends, side="right")
    n_pairs = np.maximum(stop - first, 0)
    upper = np.repeat(np.arange(len(rows)), n_pairs)
    within = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    lower = first[upper] + within
    return upper, lower


def _component_of_run(n_runs: int, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Smallest run index of each run's component, by min-label propagation with pointer jumping."""
    label = np.arange(n_runs)
    while True:
        previous = label.copy()
        np.minimum.at(label, upper, label[lower])
        np.minimum.at(label, lower, label[upper])
        label = label[label]
        if np.array_equal(label, previous):
            return label


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the 8-connected components of ``mask``.

    Args:
        mask: (H, W) bool.
    Returns:
        (labels, sizes): (H, W) int32 labels, 0 for background and 1..K for components in the
        order described above; (K,) int64 pixel counts, ``sizes[k - 1]`` for label k.
    """
    height, width = mask.shape
    labels = np.zeros((height, width), dtype=np.int32)
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return labels, np.zeros(0, dtype=np.int64)
    upper, lower = _touching_run_pairs(rows, starts, ends, width)
    root = _component_of_run(len(rows), upper, lower)
    _, component = np.unique(root, return_inverse=True)
    # Two components never share a 2x2 block (its pixels are all 8-neighbours), so the first
    # block of each component orders them without ties.
    first_block = np.full(component.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_block, component, (rows // 2) * (width // 2 + 1) + starts // 2)
    rank = np.empty_like(first_block)
    rank[np.argsort(first_block)] = np.arange(len(first_block))
    run_label = rank[component] + 1
    roots = first_block
    sizes = np.bincount(run_label, weights=ends - starts, minlength=len(roots) + 1)[1:].astype(np.int64)
    lengths = ends - starts
    flat = labels.reshape(-1)
    pixel_index = np.repeat(rows * width + starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    flat[pixel_index] = np.repeat(run_label, lengths)
    return labels, sizes


def remove_small_regions(mask: np.ndarray, area_threshold: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes or drop islands smaller than ``area_threshold`` pixels.

    ``mode="holes"`` fills 8-connected components of the background (any, including those
    touching the border) smaller than the threshold; ``mode="islands"`` drops foreground
    components smaller than it, keeping the largest one if all are small.
    Args:
        mask: (H, W) bool.
    Returns:
        (new_mask, changed): changed is True when any small region was found.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    labels, sizes = connected_components(mask ^ fill_holes)
    small = sizes < area_threshold
    if not small.any():
        return mask, False
    if fill_holes:
        keep_label = np.concatenate([[True], small])  # background of ~mask is the mask itself
    else:
        keep_label = np.concatenate([[False], ~small])
        if not keep_label.any():
            keep_label[int(np.argmax(sizes)) + 1] = True
    return keep_label[labels], True
