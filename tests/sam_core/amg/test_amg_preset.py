"""The SA-1B preset against segment-anything's generator run with the paper's parameters."""
import numpy as np
import pytest
import torch

from tests.sam_core.amg.amg_parity import LOGIT_GAIN, amg_model_pair, matched_fraction

pytestmark = pytest.mark.oracle

# SA-1B's fully automatic stage as the paper describes it (appendix B), in segment-anything's names.
PAPER_SA1B = dict(
    points_per_side=32, crop_n_layers=2, crop_n_points_downscale_factor=2, pred_iou_thresh=0.88,
    stability_score_thresh=0.95, box_nms_thresh=0.7, crop_nms_thresh=0.7, min_mask_region_area=100,
)


@pytest.fixture(scope="module")
def models():
    # Random weights predict IoUs near 0 and stability scores near 0.7: shifted IoUs and 10x the
    # usual logit gain let masks through the preset's 0.88 / 0.95 filters (the same on both sides).
    return amg_model_pair(seed=0, logit_gain=10 * LOGIT_GAIN, iou_shift=1.0)


def test_preset_is_the_papers_recipe(models):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_core import AutomaticMaskGenerator

    ref_model, our_model = models
    official = SamAutomaticMaskGenerator(ref_model, **PAPER_SA1B)
    ours = AutomaticMaskGenerator.preset("sa1b", our_model)
    assert len(ours.point_grids) == len(official.point_grids) == 3
    for our_grid, official_grid in zip(ours.point_grids, official.point_grids):
        np.testing.assert_array_equal(our_grid, official_grid)
    for name in ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh",
                 "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
                 "min_mask_region_area", "output_mode"):
        assert getattr(ours, name) == getattr(official, name), name
    assert AutomaticMaskGenerator.preset("sa1b", our_model, output_mode="coco_rle").output_mode == "coco_rle"
    with pytest.raises(ValueError, match="sa1b"):
        AutomaticMaskGenerator.preset("sa2", our_model)


def test_preset_masks_match_the_official_generator(models, monkeypatch):
    # Random-weight masks spread over the whole crop, so the inner-crop-edge filter would drop
    # every crop's masks; switched off in BOTH generators, all 21 crops take part: their batched
    # encoding, un-cropping, NMS across crops and the small-region clean-up are compared.
    # A 16x16 grid (8x8 and 4x4 in the crops) keeps the official run short.
    import segment_anything.automatic_mask_generator as official_module
    from segment_anything import SamAutomaticMaskGenerator

    import sam_core.amg.generator as our_module
    from sam_core import AutomaticMaskGenerator
    from tests.sam_factory import real_photos

    def never_near(boxes, *args, **kwargs):
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)

    monkeypatch.setattr(official_module, "is_box_near_crop_edge", never_near)
    monkeypatch.setattr(our_module, "is_box_near_crop_edge", never_near)
    ref_model, our_model = models
    image = real_photos()[2]
    ref = SamAutomaticMaskGenerator(ref_model, **dict(PAPER_SA1B, points_per_side=16)).generate(image)
    ours = AutomaticMaskGenerator.preset("sa1b", our_model, points_per_side=16, encoder_batch_size=8).generate(image)
    assert len({tuple(r["crop_box"]) for r in ref}) >= 15  # most of the 21 crops keep a mask
    assert len(ours) == len(ref)
    assert matched_fraction(ref, ours) >= 0.98
