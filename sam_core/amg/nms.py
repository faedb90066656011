"""Greedy non-maximum suppression on boxes, without torchvision."""
from __future__ import annotations

import numpy as np
import torch


def box_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy NMS, highest score first.

    A box is dropped when its IoU with an already kept, higher-scored box exceeds
    ``iou_threshold``; equal scores keep their input order. Areas are (x1 - x0) * (y1 - y0), in
    float32, the convention of torchvision's ``nms``, so an IoU threshold of 1.0 keeps everything.
    Args:
        boxes_xyxy: (N, 4) boxes.
        scores: (N,) scores.
    Returns:
        (K,) int64 indices into the inputs.
    """
    if len(boxes_xyxy) == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores.detach().cpu().float(), descending=True, stable=True).indices.numpy()
    boxes = boxes_xyxy.detach().cpu().to(torch.float32).numpy()[order]
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        kept.append(i)
        rest = slice(i + 1, None)
        overlap_w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), np.float32(0))
        overlap_h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), np.float32(0))
        intersection = overlap_w * overlap_h
        with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: NaN, never suppressed
            iou = intersection / (areas[i] + areas[rest] - intersection)
        suppressed[rest] |= iou > iou_threshold
    return torch.from_numpy(order[kept].astype(np.int64))
