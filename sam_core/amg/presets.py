"""Named settings for ``AutomaticMaskGenerator`` (``AutomaticMaskGenerator.preset(name, model)``).

``sa1b``: the fully automatic stage that generated the SA-1B masks (Kirillov et al., "Segment
Anything", 2023, appendix B): a 32x32 point grid on the whole image and on 20 zoomed-in crops
(2x2 and 4x4 overlapping windows, with 16x16 and 8x8 grids), masks kept at predicted IoU 0.88 and
stability 0.95, NMS at 0.7 within each crop and across crops, and spurious regions and holes
under 100 pixels removed. The encoder then runs on 21 images per image, which
``AutomaticMaskGenerator`` batches (``encoder_batch_size``).
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "sa1b": dict(
        points_per_side=32,
        crop_n_layers=2,
        crop_n_points_downscale_factor=2,
        pred_iou_thresh=0.88,
        stability_score_thresh=0.95,
        box_nms_thresh=0.7,
        crop_nms_thresh=0.7,
        min_mask_region_area=100,
    ),
}
PRESET_NAMES = tuple(PRESETS)


def preset_parameters(name: str) -> dict:
    """The generator parameters of preset ``name`` (a copy, segment-anything's names)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESET_NAMES)}") from None
