"""Our AutomaticMaskGenerator against segment-anything's SamAutomaticMaskGenerator (the oracle).

Same tiny random weights, same real photos, several configurations. Requirement: the same number
of masks, and >= 98% of the official masks matched at mask IoU >= 0.99 with equal boxes, crop
boxes and scores.
"""
import numpy as np
import pytest

from tests.sam_core.amg.amg_parity import amg_model_pair, decode_segmentation, matched_fraction

pytestmark = pytest.mark.oracle

NMS_OFF = dict(box_nms_thresh=1.0, crop_nms_thresh=1.0)
CONFIGS = {
    "nms_off_no_filters": dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, **NMS_OFF),
    "nms_on_defaults": dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0),
    "filters_on": dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.75, **NMS_OFF),
    "crops_nms_off": dict(points_per_side=6, pred_iou_thresh=0.05, stability_score_thresh=0.7, crop_n_layers=1, **NMS_OFF),
    "crops_nms_on": dict(
        points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.6, crop_n_layers=1,
        crop_n_points_downscale_factor=2, box_nms_thresh=0.9, crop_nms_thresh=0.5,
    ),
    "small_regions_nms_off": dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=150, **NMS_OFF),
    "small_regions_nms_on": dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_mask_region_area=150, box_nms_thresh=0.95),
}


@pytest.fixture(scope="module")
def models():
    return amg_model_pair(seed=0)


@pytest.fixture(scope="module")
def photos():
    from tests.sam_factory import real_photos

    return real_photos()


def _run_both(models, image, **kwargs):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_core import AutomaticMaskGenerator

    ref_model, our_model = models
    ref = SamAutomaticMaskGenerator(ref_model, **kwargs).generate(image)
    ours = AutomaticMaskGenerator(our_model, **kwargs).generate(image)
    return ref, ours


def _assert_parity(ref, ours):
    assert len(ours) == len(ref)
    assert matched_fraction(ref, ours) >= 0.98


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("photo", [1, 2])
def test_parity(models, photos, config, photo):
    ref, ours = _run_both(models, photos[photo], **CONFIGS[config])
    assert len(ref) > 0, "configuration lets no mask through: the comparison would be empty"
    _assert_parity(ref, ours)


@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_output_modes(models, photos, output_mode):
    kwargs = dict(CONFIGS["filters_on"], points_per_side=4, output_mode=output_mode)
    ref, ours = _run_both(models, photos[2], **kwargs)
    assert len(ref) > 0
    _assert_parity(ref, ours)
    for record in ours:
        assert set(record) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
        assert record["area"] == int(decode_segmentation(record["segmentation"]).sum())
    if output_mode == "coco_rle":
        # same compressed strings, not just the same pixels
        assert sorted(r["segmentation"]["counts"] for r in ref) == sorted(r["segmentation"]["counts"] for r in ours)
    elif output_mode == "uncompressed_rle":
        assert sorted(map(str, (r["segmentation"] for r in ref))) == sorted(map(str, (r["segmentation"] for r in ours)))


def test_explicit_point_grids(models, photos):
    rng = np.random.default_rng(0)
    grids = [rng.uniform(0, 1, size=(20, 2)), rng.uniform(0, 1, size=(12, 2))]
    kwargs = dict(points_per_side=None, point_grids=grids, crop_n_layers=1, pred_iou_thresh=0.0,
                  stability_score_thresh=0.5, **NMS_OFF)
    ref, ours = _run_both(models, photos[2], **kwargs)
    assert len(ref) > 0
    _assert_parity(ref, ours)
    assert sorted(map(str, (r["point_coords"] for r in ref))) == sorted(map(str, (r["point_coords"] for r in ours)))


def test_generate_batch_matches_official_per_image(models, photos):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_core import AutomaticMaskGenerator

    ref_model, our_model = models
    kwargs = dict(CONFIGS["crops_nms_off"], points_per_side=4)
    ours = AutomaticMaskGenerator(our_model, encoder_batch_size=3, **kwargs).generate_batch(photos[1:])
    assert len(ours) == 2
    for image, our_records in zip(photos[1:], ours):
        ref = SamAutomaticMaskGenerator(ref_model, **kwargs).generate(image)
        assert len(ref) > 0
        _assert_parity(ref, our_records)


def test_crop_layers_contribute_masks(models, photos):
    # Random-weight masks are scattered over the whole crop, so the inner-crop-edge filter drops
    # every mask of an ordinary crop. A square image with crop_overlap_ratio=1.0 makes every
    # layer-1 crop the whole image (no inner edges): crop-layer grids, crop NMS preferring smaller
    # crops (here all tied) and the merge across crops then all carry masks.
    square = photos[2][:, 20:110]
    kwargs = dict(points_per_side=6, crop_n_layers=1, crop_overlap_ratio=1.0, pred_iou_thresh=0.05,
                  stability_score_thresh=0.7, box_nms_thresh=1.0, crop_nms_thresh=0.9)
    ref, ours = _run_both(models, square, **kwargs)
    assert len(ref) > 0
    _assert_parity(ref, ours)


@pytest.mark.parametrize("crop_nms_thresh", [1.0, 0.7])
def test_crop_masks_with_edge_filter_disabled_on_both_sides(models, photos, monkeypatch, crop_nms_thresh):
    # With the inner-crop-edge filter switched off in BOTH generators, every crop contributes
    # masks, so un-cropping of masks, boxes and points, and the cross-crop NMS preferring smaller
    # crops, are compared on real offsets.
    import segment_anything.automatic_mask_generator as official_module
    import torch

    import sam_core.amg.generator as our_module

    def never_near(boxes, *args, **kwargs):
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)

    monkeypatch.setattr(official_module, "is_box_near_crop_edge", never_near)
    monkeypatch.setattr(our_module, "is_box_near_crop_edge", never_near)
    kwargs = dict(points_per_side=4, crop_n_layers=1, pred_iou_thresh=0.05, stability_score_thresh=0.7,
                  box_nms_thresh=1.0, crop_nms_thresh=crop_nms_thresh, output_mode="coco_rle")
    ref, ours = _run_both(models, photos[1], **kwargs)
    crops = {tuple(r["crop_box"]) for r in ref}
    assert len(crops) >= 3, crops  # masks from the whole image and from several crops
    _assert_parity(ref, ours)
