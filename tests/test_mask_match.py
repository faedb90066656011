"""The IoU matcher the pipeline tests use must still catch what a pipeline bug would produce."""
import numpy as np
import pytest

from pipeline.output.schema import encode_rle
from tests.mask_match import assert_masks_match


def record(mask: np.ndarray, score: float) -> dict:
    return {"segmentation": encode_rle(mask), "predicted_iou": score}


def square(top: int, left: int, size: int = 20) -> np.ndarray:
    mask = np.zeros((64, 64), dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_an_edge_pixel_and_a_swapped_order_pass():
    a, b = square(0, 0), square(30, 30)
    nudged = a.copy()
    nudged[19, 19] = False
    assert_masks_match([record(nudged, 0.9), record(b, 0.8)], [record(b, 0.8), record(a, 0.9)])


@pytest.mark.parametrize("got, expected", [
    ([record(square(0, 0), 0.9)], [record(square(0, 0), 0.9), record(square(30, 30), 0.8)]),  # lost mask
    ([record(square(5, 5), 0.9)], [record(square(0, 0), 0.9)]),  # shifted mask
    ([record(square(0, 0), 0.5)], [record(square(0, 0), 0.9)]),  # wrong score
    ([record(square(0, 0), 0.9)] * 2, [record(square(0, 0), 0.9), record(square(30, 30), 0.9)]),  # one mask twice
])
def test_a_lost_shifted_rescored_or_duplicated_mask_fails(got, expected):
    with pytest.raises(AssertionError):
        assert_masks_match(got, expected)
