"""Connected components and small-region removal, by hand and against OpenCV (the oracle's tool)."""
import numpy as np
import pytest

from sam_core.amg.components import connected_components, remove_small_regions


def test_components_by_hand_diagonal_joins():
    mask = np.array(
        [
            [1, 0, 0, 1],
            [0, 1, 0, 1],
            [0, 0, 0, 0],
            [1, 1, 0, 0],
        ],
        dtype=bool,
    )
    labels, sizes = connected_components(mask)
    np.testing.assert_array_equal(labels, [[1, 0, 0, 2], [0, 1, 0, 2], [0, 0, 0, 0], [3, 3, 0, 0]])
    assert sizes.tolist() == [2, 2, 2]


def test_u_shape_joins_late():
    # Two arms meet only at the bottom row: the first-pixel order must still give label 1 to both.
    mask = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
    labels, sizes = connected_components(mask)
    assert set(labels[mask].tolist()) == {1} and sizes.tolist() == [7]


def test_remove_small_regions_by_hand():
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False  # one-pixel hole
    mask[7, 7] = True  # one-pixel island
    filled, changed = remove_small_regions(mask, 2, "holes")
    assert changed and filled[3, 3] and filled.sum() == mask.sum() + 1
    cleaned, changed = remove_small_regions(filled, 2, "islands")
    assert changed and not cleaned[7, 7] and cleaned.sum() == 25
    same, changed = remove_small_regions(cleaned, 2, "islands")
    assert not changed and same is cleaned
    only_small = np.zeros((5, 5), dtype=bool)
    only_small[0, 0] = only_small[2, 2:4] = True
    kept, _ = remove_small_regions(only_small, 10, "islands")  # all small: the largest stays
    assert kept.sum() == 2 and kept[2, 2]


def _blobs(seed, shape=(61, 47), threshold=0.7):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    kernel = np.ones(3) / 3
    smooth = np.apply_along_axis(lambda r: np.convolve(r, kernel, "same"), 1, noise)
    smooth = np.apply_along_axis(lambda c: np.convolve(c, kernel, "same"), 0, smooth)
    return smooth > threshold * smooth.std()


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(8))
def test_components_match_opencv(seed):
    cv2 = pytest.importorskip("cv2")
    mask = _blobs(seed, threshold=0.2 * seed - 0.4)
    n, ref_labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    labels, sizes = connected_components(mask)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(sizes, stats[1:, -1])


@pytest.mark.oracle
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_oracle(seed, mode):
    pytest.importorskip("cv2")
    from segment_anything.utils.amg import remove_small_regions as ref_remove

    mask = _blobs(seed, threshold=0.2 * seed - 0.6)
    for area in (1, 3, 10, 60):
        ours, changed = remove_small_regions(mask, area, mode)
        ref, ref_changed = ref_remove(mask, area, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(ours, ref)
