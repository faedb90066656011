"""bf16 paths stay close to fp32: ``load_sam(dtype=torch.bfloat16)`` and ``torch.autocast``.

Measured on the tiny perturbed model and the real photos (CPU, torch 2.x): image embeddings
within ~1.2% of their largest magnitude, low-res logits within ~0.005 (~2.5% of the largest
logit), IoU within 0.003, >= 99.6% of mask pixels identical. The bounds below leave ~2x margin.
"""
import pytest
import torch

from sam_core import SamPredictor, load_sam
from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint

EMBEDDING_REL_TOL = 0.03  # of max |fp32 embedding|
LOGIT_REL_TOL = 0.05  # of max |fp32 low-res logit|
IOU_TOL = 0.01
MIN_MASK_AGREEMENT = 0.99

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_official_checkpoint(make_official_sam(seed=4), tmp_path_factory.mktemp("ckpt") / "tiny.pth")


def _prompts(predictor, photo):
    h, w = photo.shape[:2]
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(16, 1, 2, generator=generator) * torch.tensor([w, h])
    coords = predictor.transform.apply_coords_torch(coords, (h, w)).to(predictor.device)
    return coords, torch.ones(16, 1, dtype=torch.int, device=predictor.device)


def _assert_close_to_fp32(reference, candidate, photo, context=None):
    reference.set_image(photo)
    coords, labels = _prompts(reference, photo)
    masks, iou, low_res = reference.predict_torch(coords, labels)
    with context or torch.autocast("cpu", enabled=False):
        candidate.set_image(photo)
        c_masks, c_iou, c_low_res = candidate.predict_torch(coords, labels)
    embedding_error = (candidate.features.float() - reference.features).abs().max()
    assert 0 < embedding_error <= EMBEDDING_REL_TOL * reference.features.abs().max()  # > 0: bf16 really ran
    assert c_low_res.dtype == torch.float32 and c_iou.dtype == torch.float32
    assert (c_low_res - low_res).abs().max() <= LOGIT_REL_TOL * low_res.abs().max()
    assert (c_iou - iou).abs().max() <= IOU_TOL
    assert (c_masks == masks).float().mean() >= MIN_MASK_AGREEMENT


@pytest.mark.parametrize("device", DEVICES)
def test_load_sam_bf16_stays_close_to_fp32(checkpoint, device):
    reference = SamPredictor(load_sam(checkpoint, device=device))
    candidate = SamPredictor(load_sam(checkpoint, device=device, dtype=torch.bfloat16))
    assert candidate.model.dtype == torch.bfloat16
    # Fourier phases and pixel statistics stay fp32 (bf16 would round 123.675 to 124).
    assert candidate.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    assert candidate.model.pixel_mean.dtype == torch.float32
    for photo in real_photos():
        _assert_close_to_fp32(reference, candidate, photo)
        assert candidate.features.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16_stays_close_to_fp32(checkpoint, device):
    model = load_sam(checkpoint, device=device)
    reference, candidate = SamPredictor(model), SamPredictor(model)
    for photo in real_photos():
        _assert_close_to_fp32(reference, candidate, photo, torch.autocast(device, dtype=torch.bfloat16))
