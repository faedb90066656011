"""Generator behaviour that needs no oracle: argument checks, empty results, batching, fast path."""
import numpy as np
import pytest
import torch

from sam_core import AutomaticMaskGenerator
from tests.sam_core.amg.amg_parity import amg_model_pair, matched_fraction


@pytest.fixture(scope="module")
def model():
    return amg_model_pair(seed=1)[1]


@pytest.fixture(scope="module")
def photo():
    from tests.sam_factory import real_photos

    return real_photos()[2]


def test_argument_checks(model):
    with pytest.raises(ValueError, match="Exactly one"):
        AutomaticMaskGenerator(model, points_per_side=None)
    with pytest.raises(ValueError, match="Exactly one"):
        AutomaticMaskGenerator(model, points_per_side=4, point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(model, output_mode="png")
    with pytest.raises(ValueError, match="one grid per crop layer"):
        AutomaticMaskGenerator(model, points_per_side=None, point_grids=[np.zeros((1, 2))], crop_n_layers=1)


def test_nothing_passes_gives_empty_list_even_with_crops(model, photo):
    # (segment-anything raises IndexError here when crops are on)
    generator = AutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=1.0, crop_n_layers=1,
                                       min_mask_region_area=10)
    assert generator.generate(photo) == []
    assert generator.generate_batch([]) == []


def test_batch_equals_one_by_one(model, photo):
    from tests.sam_factory import real_photos

    images = [photo, real_photos()[1], photo[10:70, 5:100]]
    kwargs = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.5, box_nms_thresh=1.0)
    batched = AutomaticMaskGenerator(model, encoder_batch_size=2, **kwargs).generate_batch(images)
    single = AutomaticMaskGenerator(model, **kwargs)
    for image, records in zip(images, batched):
        one = single.generate(image)
        assert len(one) > 0 and len(records) == len(one)
        assert matched_fraction(one, records) == 1.0
        assert all(r["segmentation"].shape == image.shape[:2] for r in records)


def test_fast_path_stays_close_to_fp32(model, photo):
    kwargs = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    exact = AutomaticMaskGenerator(model, **kwargs).generate(photo)
    fast = AutomaticMaskGenerator(model, fast=True, **kwargs).generate(photo)
    assert len(fast) == len(exact) > 0
    assert matched_fraction(exact, fast, min_iou=0.9, iou_pred_atol=None, stability_atol=None, same_box=False) >= 0.9
    assert not torch.is_autocast_enabled("cpu")  # the context does not leak


def test_decoder_sub_batches_change_nothing(model, photo):
    kwargs = dict(points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    whole = AutomaticMaskGenerator(model, decoder_batch_size=64, **kwargs).generate(photo)
    split = AutomaticMaskGenerator(model, decoder_batch_size=3, **kwargs).generate(photo)
    tuned = AutomaticMaskGenerator(model, **kwargs).generate(photo)  # the size measured on this machine
    assert len(split) == len(whole) == len(tuned) == 75
    assert matched_fraction(whole, split, iou_pred_atol=1e-5, stability_atol=1e-3) == 1.0
    assert matched_fraction(whole, tuned, iou_pred_atol=1e-5, stability_atol=1e-3) == 1.0
