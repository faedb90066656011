"""Stability score, mask boxes and the crop-edge filter: by hand and against the oracle."""
import numpy as np
import pytest
import torch

from sam_core.amg.filters import (
    box_xyxy_to_xywh,
    is_box_near_crop_edge,
    masks_to_boxes_xyxy,
    stability_score,
    uncrop_boxes_xyxy,
)


def test_stability_score_by_hand():
    logits = torch.tensor([[[3.0, 0.5], [-0.5, -2.0]]])  # > 1: one pixel; > -1: three pixels
    assert stability_score(logits, 0.0, 1.0).tolist() == pytest.approx([1 / 3])


def test_stability_counts_rows_longer_than_int16():
    """The generator scores transposed masks, so a tall image's columns are the summed rows."""
    logits = torch.full((1, 2, 40000), 5.0)
    logits[0, 0, :3] = 0.5  # between the thresholds: outside the inner mask, inside the outer
    assert stability_score(logits, 0.0, 1.0).tolist() == pytest.approx([79997 / 80000])


def test_boxes_by_hand_including_empty():
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    assert masks_to_boxes_xyxy(masks).tolist() == [[2, 1, 4, 2], [0, 0, 0, 0]]


def test_xywh_and_uncrop():
    assert box_xyxy_to_xywh(torch.tensor([2, 1, 4, 2])) == [2, 1, 2, 1]
    assert uncrop_boxes_xyxy(torch.tensor([[1, 2, 3, 4]]), [10, 20, 50, 60]).tolist() == [[11, 22, 13, 24]]


def test_near_crop_edge_by_hand():
    crop, image = [100, 0, 200, 100], [0, 0, 200, 100]
    boxes = torch.tensor([[5, 40, 30, 60], [40, 40, 60, 60], [80, 40, 100, 60]])
    # first touches the inner left edge; the last touches the crop's right edge, which is the image's.
    assert is_box_near_crop_edge(boxes, crop, image).tolist() == [True, False, False]


@pytest.mark.oracle
def test_filters_match_oracle_on_random_masks():
    from segment_anything.utils import amg

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 37, 53, generator=gen) * 3
    np.testing.assert_array_equal(
        stability_score(logits, 0.0, 1.0).numpy(), amg.calculate_stability_score(logits, 0.0, 1.0).numpy()
    )
    masks = torch.nn.functional.avg_pool2d(logits[:, None], 9, 1, 4)[:, 0] > 1.0
    masks[3] = False
    ours = masks_to_boxes_xyxy(masks)
    assert torch.equal(ours, amg.batched_mask_to_box(masks))
    for crop in ([0, 0, 53, 37], [10, 5, 40, 30], [0, 10, 30, 37]):
        assert torch.equal(
            is_box_near_crop_edge(ours, crop, [0, 0, 53, 37], atol=4),
            amg.is_box_near_crop_edge(ours, crop, [0, 0, 53, 37], atol=4),
        )


@pytest.mark.oracle
def test_uncrop_masks_matches_oracle():
    from segment_anything.utils import amg

    from sam_core.amg.decoding import uncrop_masks

    masks = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0)) > 0.5
    for crop in ([5, 7, 35, 27], [0, 0, 30, 20], [0, 3, 30, 23]):
        expected = amg.uncrop_masks(masks, crop, 40, 50)
        assert torch.equal(uncrop_masks(masks, crop, (40, 50)), expected)
        transposed = uncrop_masks(masks.transpose(1, 2), crop, (40, 50), transposed=True)
        assert torch.equal(transposed, expected.transpose(1, 2))


def test_upscale_logits_as_matmul_equals_model_postprocessing():
    """The resize as matrix products: fp32 equal to the official two interpolations within float
    rounding, bf16 within bf16 rounding of the logits, banded blocks equal to the dense products."""
    from sam_core import build_sam
    from sam_core.amg.decoding import upscale_logits_as_matmul
    from tests.sam_factory import tiny_config

    model = build_sam(tiny_config())  # 256 input, 64x64 low-res masks
    low_res = torch.randn(5, 64, 64, generator=torch.Generator().manual_seed(0)) * 5
    for original in [(200, 300), (230, 135), (90, 135), (256, 256), (31, 257), (1000, 7)]:
        scale = 256 / max(original)
        input_size = tuple(int(v * scale + 0.5) for v in original)
        reference = model.postprocess_masks(low_res[:, None], input_size, original)[:, 0]
        ours = upscale_logits_as_matmul(model, low_res, input_size, original)
        assert ours.shape == reference.shape and ours.dtype == torch.float32
        torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-5, msg=str(original))  # weights exact vs fp32-rounded
        fast = upscale_logits_as_matmul(model, low_res.to(torch.bfloat16), input_size, original)
        assert fast.dtype == torch.bfloat16
        fast_t = upscale_logits_as_matmul(model, low_res.to(torch.bfloat16), input_size, original, transposed=True)
        assert fast_t.is_contiguous()
        assert torch.equal(fast_t, fast.transpose(1, 2))  # same products, same roundings
        for block in (1, 7, 32):  # banded products: the dense ones without their zero terms
            banded = upscale_logits_as_matmul(model, low_res, input_size, original, transposed=True, block=block)
            assert banded.is_contiguous()
            torch.testing.assert_close(banded, ours.transpose(1, 2), atol=1e-5, rtol=1e-5, msg=str((original, block)))
        # bf16 keeps 8 significant bits: error relative to the logits' scale (|logits| <= ~20).
        torch.testing.assert_close(fast.float(), reference, atol=0.15, rtol=0.02, msg=str(original))
        assert ((fast > 0) == (reference > 0)).float().mean() > 0.99
