"""decode_points skips the upscaling of masks that fail the predicted-IoU filter: the masks it
keeps must be exactly those of the full mask decoder."""
import pytest
import torch

from sam_core.amg.decoding import decode_points
from tests.sam_core.amg.amg_parity import amg_model_pair


@pytest.fixture(scope="module")
def model():
    return amg_model_pair(seed=1)[1]


def full_decoder(model, features, coords):
    """Reference: the plain multimask forward of the mask decoder, every mask upscaled."""
    labels = torch.ones(len(coords), 1, dtype=torch.int)
    sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
    low_res, iou = model.mask_decoder(features, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    return low_res.flatten(0, 1), iou.flatten()


@torch.no_grad()
def test_kept_masks_equal_the_full_decoder_and_the_rest_are_skipped(model):
    torch.manual_seed(0)
    side = model.prompt_encoder.image_embedding_size
    features = torch.randn(1, model.mask_decoder.iou_token.weight.shape[1], *side)
    coords = torch.rand(12, 2) * model.image_encoder.img_size
    want_logits, want_iou = full_decoder(model, features, coords)
    # A positive threshold (0 means no filter) between the two middle positive IoUs: it keeps some
    # masks of some prompts and no mask of others, and no IoU sits on it (where float rounding of
    # a differently batched decoder could move a mask across).
    positive = want_iou[want_iou > 0].sort().values
    threshold = positive[len(positive) // 2 - 1 : len(positive) // 2 + 1].mean().item()
    logits, iou, keep = decode_points(model, features, coords, threshold)
    torch.testing.assert_close(iou, want_iou, rtol=1e-5, atol=1e-6)
    assert torch.equal(keep, want_iou > threshold)
    assert 0 < int(keep.sum()) < len(keep)
    assert not keep.view(-1, 3).any(1).all()
    torch.testing.assert_close(logits, want_logits[keep], rtol=1e-4, atol=1e-5)
    # Decoder calls of 5 prompts (the last one shorter) on the once-prepared image: same result.
    for got, want in zip(decode_points(model, features, coords, threshold, step=5), (logits, iou, keep)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_no_mask_kept_gives_no_logits(model):
    side = model.prompt_encoder.image_embedding_size
    features = torch.randn(1, model.mask_decoder.iou_token.weight.shape[1], *side)
    logits, iou, keep = decode_points(model, features, torch.rand(3, 2) * 100, pred_iou_thresh=1e9)
    assert logits.shape == (0, 4 * side[0], 4 * side[1])
    assert iou.shape == (9,) and not keep.any()
