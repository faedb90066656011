"""Comparing the masks a job wrote with the masks the generator gives when run directly.

The two runs compute the same thing in different conditions: the job batches images through the
encoder, runs under its actor's thread count, and may pick other (equally exact) kernels, since
``sam_core.modeling.cpu_linear`` and ``sam_core.amg.tuning`` time their choices per process. Float
rounding then differs, and a random test model's logits lie close to zero over wide areas, so a
pixel on a mask's edge can flip. Masks are therefore matched by IoU, not byte for byte; the count,
the pairing and the scores must still agree, which no pipeline bug (a wrong image, a lost or
shifted mask, a dropped row) would keep.
"""
from __future__ import annotations

import numpy as np

from pipeline.output.schema import decode_rle
from tests.sam_core.amg.amg_parity import mask_iou


def assert_masks_match(got: list, expected: list, min_iou: float = 0.98, score_atol: float = 1e-3) -> None:
    """Each written mask (``got``, rows' ``masks``) pairs with its own generator mask (``expected``,
    ``coco_rle`` output): same count, IoU >= ``min_iou``, predicted IoU within ``score_atol``.

    The mask at the same position is taken when it matches (the usual case); otherwise the best
    unpaired one, since two scores that differ in rounding may swap places in the sorted output.
    """
    assert len(got) == len(expected), (len(got), len(expected))
    ours = [decode_rle(m["segmentation"]) for m in got]
    theirs = [decode_rle(m["segmentation"]) for m in expected]
    unpaired = set(range(len(theirs)))
    for k, mask in enumerate(ours):
        match, iou = k, (mask_iou(mask, theirs[k]) if k in unpaired else -1.0)
        if iou < min_iou:
            match, iou = max(((j, mask_iou(mask, theirs[j])) for j in unpaired), key=lambda pair: pair[1])
        assert iou >= min_iou, f"written mask {k}: best IoU with an unpaired generator mask is {iou:.4f}"
        unpaired.remove(match)
        np.testing.assert_allclose(got[k]["predicted_iou"], expected[match]["predicted_iou"], atol=score_atol)
