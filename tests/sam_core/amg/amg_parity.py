"""Helpers for AMG parity tests: a model pair (official oracle and ours, same weights) whose masks
make it through AMG's filters, and the matching rule of the parity requirement."""
from __future__ import annotations

import numpy as np
import torch

# Random weights give logits of about +-0.1, so every stability score would be ~0 and every
# mask filtered out. Scaling the hypernetworks' last layer scales all mask logits (masks at
# threshold 0 are unchanged) and spreads stability scores over ~0.6-0.8.
LOGIT_GAIN = 300.0


def amg_model_pair(seed: int = 0, logit_gain: float = LOGIT_GAIN, iou_shift: float = 0.0, **sizes):
    """(official segment_anything Sam, our Sam) with identical random weights, tiny unless ``sizes``
    (``tests.sam_factory`` size names, e.g. ViT-B's) say otherwise.

    ``logit_gain`` scales the mask logits (see LOGIT_GAIN; larger gains narrow the band of pixels
    near the threshold, so stability scores rise towards 1); ``iou_shift`` is added to every
    predicted IoU (so that masks pass a realistic predicted-IoU filter such as 0.88).
    """
    from sam_core import build_sam
    from tests.sam_factory import make_official_sam, tiny_config

    ref = make_official_sam(seed=seed, **sizes)
    with torch.no_grad():
        for mlp in ref.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_gain)
            mlp.layers[-1].bias.mul_(logit_gain)
        ref.mask_decoder.iou_prediction_head.layers[-1].bias.add_(iou_shift)
    ours = build_sam(tiny_config(**sizes))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


def decode_segmentation(segmentation) -> np.ndarray:
    """Any output mode's segmentation -> (H, W) bool, decoded by pycocotools (not by our code)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool)
    height, width = segmentation["size"]
    if isinstance(segmentation["counts"], list):
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    else:
        segmentation = {"size": [height, width], "counts": segmentation["counts"].encode()}
    return mask_utils.decode(segmentation).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def matched_fraction(
    ref_records, our_records, min_iou=0.99, iou_pred_atol=1e-4, stability_atol=2e-3, same_box=True
) -> float:
    """Fraction of official records with a distinct match in ours: same crop box, mask IoU >=
    ``min_iou``, equal box (when ``same_box``), predicted IoU and stability within the tolerances
    (``None``: not compared).

    Stability counts pixels whose logit is above +-offset; two implementations' float rounding
    (amplified by LOGIT_GAIN) moves a handful of those pixels, hence its looser tolerance.
    """
    if not ref_records:
        return 1.0
    ours = [(r, decode_segmentation(r["segmentation"])) for r in our_records]
    used = set()
    matched = 0
    for ref in ref_records:
        ref_mask = decode_segmentation(ref["segmentation"])
        for j, (cand, cand_mask) in enumerate(ours):
            if j in used:
                continue
            if same_box and cand["bbox"] != ref["bbox"]:
                continue
            if iou_pred_atol is not None and abs(cand["predicted_iou"] - ref["predicted_iou"]) > iou_pred_atol:
                continue
            if stability_atol is not None and abs(cand["stability_score"] - ref["stability_score"]) > stability_atol:
                continue
            if cand["crop_box"] == ref["crop_box"] and mask_iou(ref_mask, cand_mask) >= min_iou:
                used.add(j)
                matched += 1
                break
    return matched / len(ref_records)
