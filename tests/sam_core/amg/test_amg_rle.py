"""Run-length encoding: round trips, a hand-worked case, and the oracle's encoder."""
import numpy as np
import pytest
import torch

from sam_core.amg.rle import (
    masks_to_rle,
    masks_to_rle_arrays,
    rle_area,
    rle_to_coco,
    rle_to_mask,
    transposed_masks_to_rle_arrays,
)


def _random_masks(seed, batch=12, height=23, width=31):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, height, width, generator=gen)
    masks = torch.nn.functional.avg_pool2d(noise, 5, 1, 2)[:, 0] > 0.1
    masks[0] = False
    masks[1] = True
    return masks


def test_rle_by_hand():
    mask = torch.tensor([[[True, False], [True, True]]])  # column-major: 1, 1, 0, 1
    assert masks_to_rle(mask) == [{"size": [2, 2], "counts": [0, 2, 1, 1]}]


def test_array_counts_equal_list_counts_and_decode_alike():
    masks = _random_masks(2)
    masks[2, 0, 0] = True  # a mask starting with a run of ones
    for as_array, as_list, mask in zip(masks_to_rle_arrays(masks), masks_to_rle(masks), masks):
        assert as_array["counts"].dtype == np.uint32
        assert as_array["counts"].tolist() == as_list["counts"]
        assert rle_area(as_array) == rle_area(as_list) == int(mask.sum())
        np.testing.assert_array_equal(rle_to_mask(as_array), mask.numpy())
        assert rle_to_coco(as_array) == rle_to_coco(as_list)


def test_transposed_input_gives_the_same_runs():
    masks = _random_masks(3)
    masks[4] = False
    masks[4, -1, -1] = True  # a single run of ones at the very end
    direct = masks_to_rle_arrays(masks)
    transposed = transposed_masks_to_rle_arrays(masks.transpose(1, 2).contiguous())
    assert [r["size"] for r in transposed] == [r["size"] for r in direct]
    for a, b in zip(direct, transposed):
        np.testing.assert_array_equal(a["counts"], b["counts"])
    assert direct[4]["counts"].tolist() == [23 * 31 - 1, 1]


def test_round_trip_and_area():
    masks = _random_masks(0)
    for mask, rle in zip(masks, masks_to_rle(masks)):
        np.testing.assert_array_equal(rle_to_mask(rle), mask.numpy())
        assert rle_area(rle) == int(mask.sum())


@pytest.mark.oracle
def test_matches_oracle_encoder_and_pycocotools():
    from pycocotools import mask as mask_utils
    from segment_anything.utils import amg

    masks = _random_masks(1)
    ours = masks_to_rle(masks)
    assert ours == amg.mask_to_rle_pytorch(masks)
    for rle, mask in zip(ours, masks):
        coco = rle_to_coco(rle)
        assert coco == amg.coco_encode_rle(rle)
        assert coco["counts"] == mask_utils.encode(np.asfortranarray(mask.numpy()))["counts"].decode()
