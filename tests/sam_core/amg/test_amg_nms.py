"""Our box NMS against hand-worked cases and torchvision's (the oracle's) batched_nms."""
import pytest
import torch

from sam_core.amg.nms import box_nms


def test_nms_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.8, 0.5])
    # box 1 (0.9) suppresses box 0 (IoU 0.81) and box 3; box 2 is disjoint.
    assert box_nms(boxes, scores, 0.7).tolist() == [1, 2]
    # a threshold of 1.0 keeps even identical boxes; equal scores keep input order
    assert box_nms(boxes, scores, 1.0).tolist() == [1, 2, 0, 3]
    assert box_nms(boxes[:0], scores[:0], 0.5).tolist() == []


@pytest.mark.oracle
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_nms_matches_torchvision_with_ties(threshold):
    from torchvision.ops import batched_nms

    gen = torch.Generator().manual_seed(1)
    xy = torch.randint(0, 80, (300, 2), generator=gen)
    wh = torch.randint(0, 40, (300, 2), generator=gen)
    boxes = torch.cat([xy, xy + wh], dim=1).float()
    scores = torch.randint(0, 5, (300,), generator=gen).float()  # many ties, as in crop NMS
    ref = batched_nms(boxes, scores, torch.zeros(300), iou_threshold=threshold)
    assert box_nms(boxes, scores, threshold).tolist() == ref.tolist()
