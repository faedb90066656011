"""Our model and generator on every available device (CPU, and CUDA where present) against
segment-anything on the CPU: the CUDA parity checks that bench/gpu_check.py runs on a GPU machine."""
import pytest
import torch

from tests.sam_core.amg.amg_parity import amg_model_pair, matched_fraction
from tests.sam_factory import real_photos

pytestmark = pytest.mark.oracle
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def models():
    return amg_model_pair(seed=2)


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float().cpu() - theirs.float()).abs().max() / theirs.abs().max())


@torch.no_grad()
@pytest.mark.parametrize("device", DEVICES)
def test_encoder_and_decoder_on_device(models, device):
    reference, ours = models
    ours = ours.to(device)
    try:
        from segment_anything import SamPredictor as ReferencePredictor

        from sam_core import SamPredictor

        photo = real_photos()[0]
        theirs_p, ours_p = ReferencePredictor(reference), SamPredictor(ours)
        theirs_p.set_image(photo)
        ours_p.set_image(photo)
        assert ours_p.features.device.type == device
        # Relative to the largest value: on a GPU convolutions may use TF32 (10-bit mantissa).
        assert _relative_error(ours_p.features, theirs_p.features) < 2e-3
        coords = torch.rand(6, 1, 2, generator=torch.Generator().manual_seed(0)) * 200
        labels = torch.ones(6, 1, dtype=torch.int)
        _, iou_ref, low_ref = theirs_p.predict_torch(coords, labels)
        _, iou, low = ours_p.predict_torch(coords.to(device), labels.to(device))
        assert _relative_error(low, low_ref) < 2e-3
        assert (iou.cpu() - iou_ref).abs().max() < 2e-3
    finally:
        ours.to("cpu")


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "fast"])
@pytest.mark.parametrize("device", DEVICES)
def test_generator_on_device(models, device, fast):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_core import AutomaticMaskGenerator

    reference, ours = models
    ours = ours.to(device)
    try:
        kwargs = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
        photo = real_photos()[2]
        ref = SamAutomaticMaskGenerator(reference, **kwargs).generate(photo)
        got = AutomaticMaskGenerator(ours, fast=fast, **kwargs).generate(photo)
        assert len(got) == len(ref) > 0
        if fast:  # bf16 where it pays on this device: near-identical masks
            assert matched_fraction(ref, got, min_iou=0.9, iou_pred_atol=None, stability_atol=None, same_box=False) >= 0.9
        else:
            assert matched_fraction(ref, got) >= 0.98
    finally:
        ours.to("cpu")
