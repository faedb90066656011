"""Optional post-processing: fill small holes, drop small islands, then NMS away new duplicates."""
from __future__ import annotations

import torch

from sam_core.amg.candidates import MaskCandidates
from sam_core.amg.components import remove_small_regions
from sam_core.amg.filters import masks_to_boxes_xyxy
from sam_core.amg.nms import box_nms
from sam_core.amg.rle import masks_to_rle_arrays, rle_to_mask


def clean_small_regions(candidates: MaskCandidates, min_area: int, nms_thresh: float) -> MaskCandidates:
    """Remove holes then islands smaller than ``min_area`` pixels from every mask.

    Masks that changed get an NMS score of 0 and unchanged ones 1, so NMS prefers masks that
    needed no repair. Kept masks that changed get their new RLE and box.
    """
    if len(candidates) == 0:
        return candidates
    new_rles, new_boxes, unchanged = {}, [], []
    for i, rle in enumerate(candidates.rles):
        mask = rle_to_mask(rle)
        mask, holes_changed = remove_small_regions(mask, min_area, "holes")
        mask, islands_changed = remove_small_regions(mask, min_area, "islands")
        changed = holes_changed or islands_changed
        unchanged.append(float(not changed))
        mask_t = torch.from_numpy(mask)
        new_boxes.append(masks_to_boxes_xyxy(mask_t))
        if changed:  # kept as RLE: bounded memory however many masks changed
            new_rles[i] = masks_to_rle_arrays(mask_t[None])[0]
    boxes = torch.stack(new_boxes)
    keep = box_nms(boxes.float(), torch.tensor(unchanged), nms_thresh)

    result = candidates.select(keep)
    for row, i in enumerate(keep.tolist()):
        if i in new_rles:
            result.rles[row] = new_rles[i]
            result.boxes[row] = boxes[i]
    return result
