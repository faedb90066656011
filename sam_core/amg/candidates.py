"""The generator's working set: one row per candidate mask, filtered and concatenated as a unit."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch


@dataclass
class MaskCandidates:
    """Columns of N candidate masks (all on the CPU).

    iou_preds (N,) float32, stability_scores (N,) float32, points (N, 2) float64 prompt (x, y),
    boxes (N, 4) int64 XYXY, crop_boxes (N, 4) int64 XYXY, rles: N uncompressed RLEs at full
    image size, with uint32 array counts (``masks_to_rle_arrays``).
    """

    iou_preds: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    stability_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))
    crop_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))
    rles: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, index: torch.Tensor) -> "MaskCandidates":
        """Rows picked by an int64 index (any order) or a bool mask."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero(as_tuple=True)[0]
        positions = index.tolist()
        return MaskCandidates(
            iou_preds=self.iou_preds[index],
            stability_scores=self.stability_scores[index],
            points=self.points[index.numpy()],
            boxes=self.boxes[index],
            crop_boxes=self.crop_boxes[index],
            rles=[self.rles[i] for i in positions],
        )

    @staticmethod
    def concat(parts: list["MaskCandidates"]) -> "MaskCandidates":
        if not parts:
            return MaskCandidates()
        merged = {}
        for column in fields(MaskCandidates):
            values = [getattr(part, column.name) for part in parts]
            if column.name == "rles":
                merged[column.name] = [rle for value in values for rle in value]
            elif column.name == "points":
                merged[column.name] = np.concatenate(values, axis=0)
            else:
                merged[column.name] = torch.cat(values, dim=0)
        return MaskCandidates(**merged)
