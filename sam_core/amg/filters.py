"""Mask quality filters and box geometry used by the automatic mask generator.

Boxes are XYXY in pixels with inclusive max edges (a one-pixel mask at (x, y) has box
[x, y, x, y]), as segment-anything computes them.
"""
from __future__ import annotations

from typing import Sequence

import torch


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks binarised at ``mask_threshold + offset`` and ``mask_threshold - offset``.

    The high-threshold mask lies inside the low one, so the IoU is a ratio of pixel counts.
    Args:
        logits: (..., H, W) float mask logits.
    Returns:
        (...) float32 scores; NaN where the low-threshold mask is empty.
    """
    inner = count_above(logits, mask_threshold + offset)
    outer = count_above(logits, mask_threshold - offset)
    return inner / outer


def count_above(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Number of pixels above ``threshold`` per mask: (..., H, W) -> (...) int32."""
    # Partial sums along the last axis in int16 keep the intermediate small, where it fits.
    partial = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    return (logits > threshold).sum(-1, dtype=partial).sum(-1, dtype=torch.int32)


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around boolean masks.

    Args:
        masks: (..., H, W) bool.
    Returns:
        (..., 4) int64 XYXY with inclusive max edges; [0, 0, 0, 0] for an empty mask.
    """
    height, width = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    # any() over bool runs element by element on a CPU (~0.7 ms per 512x512 mask measured); the
    # same reduction as a uint8 max is vectorised (~0.01 ms).
    as_bytes = masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)
    rows = as_bytes.amax(dim=-1).bool()  # (..., H)
    cols = as_bytes.amax(dim=-2).bool()  # (..., W)
    top, bottom = _first_and_last_true(rows, height)
    left, right = _first_and_last_true(cols, width)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(dim=-1)
    return boxes.masked_fill(empty.unsqueeze(-1), 0)


def _first_and_last_true(flags: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first and last True along the last axis of (..., length) bool."""
    as_int = flags.to(torch.uint8)
    first = as_int.argmax(dim=-1)
    last = (length - 1) - as_int.flip(-1).argmax(dim=-1)
    return first, last


def box_xyxy_to_xywh(box_xyxy: Sequence[int]) -> list:
    """[x0, y0, x1, y1] -> [x0, y0, x1 - x0, y1 - y0] as a list of Python numbers."""
    x0, y0, x1, y1 = (v.item() if hasattr(v, "item") else v for v in box_xyxy)
    return [x0, y0, x1 - x0, y1 - y0]


def is_box_near_crop_edge(
    boxes_xyxy: torch.Tensor, crop_box: Sequence[int], image_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """Which boxes come within ``atol`` pixels of an edge of the crop that is not an image edge.

    Such masks are likely cut off by the crop, so the generator drops them.
    Args:
        boxes_xyxy: (N, 4) boxes in crop coordinates.
        crop_box, image_box: XYXY in image coordinates.
    Returns:
        (N,) bool.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes_xyxy.device)
    image = torch.as_tensor(image_box, dtype=torch.float32, device=boxes_xyxy.device)
    boxes = uncrop_boxes_xyxy(boxes_xyxy, crop_box).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def uncrop_boxes_xyxy(boxes_xyxy: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    """(N, 4) boxes from crop to image coordinates."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes_xyxy + torch.tensor([x0, y0, x0, y0], device=boxes_xyxy.device)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(N, 4) -> (N,) areas (x1 - x0) * (y1 - y0), in the boxes' dtype."""
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
