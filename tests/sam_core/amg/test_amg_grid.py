"""Point grids and crop boxes: hand-worked cases, then the oracle on many sizes."""
import numpy as np
import pytest

from sam_core.amg.grid import build_all_layer_point_grids, build_point_grid, generate_crop_boxes


def test_point_grid_is_cell_centres_x_fastest():
    grid = build_point_grid(2)
    np.testing.assert_array_equal(grid, [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])


def test_layer_grids_shrink_by_the_downscale_factor():
    grids = build_all_layer_point_grids(8, 2, 2)
    assert [len(g) for g in grids] == [64, 16, 4]


def test_one_crop_layer_by_hand():
    # 100x200 (h x w): overlap = int(0.5 * 100 * 2 / 2) = 50; crop_w = ceil((50 + 200) / 2) = 125,
    # crop_h = ceil((50 + 100) / 2) = 75; starts x: 0, 75; y: 0, 25.
    boxes, layers = generate_crop_boxes((100, 200), 1, 0.5)
    assert boxes == [[0, 0, 200, 100], [0, 0, 125, 75], [0, 25, 125, 100], [75, 0, 200, 75], [75, 25, 200, 100]]
    assert layers == [0, 1, 1, 1, 1]


@pytest.mark.oracle
@pytest.mark.parametrize("n_per_side", [1, 3, 8, 32])
def test_point_grid_matches_oracle(n_per_side):
    from segment_anything.utils import amg

    np.testing.assert_array_equal(build_point_grid(n_per_side), amg.build_point_grid(n_per_side))
    for ours, ref in zip(build_all_layer_point_grids(n_per_side, 2, 1), amg.build_all_layer_point_grids(n_per_side, 2, 1)):
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.oracle
def test_crop_boxes_match_oracle_on_random_sizes():
    from segment_anything.utils import amg

    rng = np.random.default_rng(0)
    for _ in range(50):
        size = tuple(int(v) for v in rng.integers(20, 3000, size=2))
        n_layers = int(rng.integers(0, 4))
        ratio = float(rng.uniform(0, 0.6))
        assert generate_crop_boxes(size, n_layers, ratio) == amg.generate_crop_boxes(size, n_layers, ratio)
