"""Our SAM modules against Meta's segment-anything (the oracle), weights loaded through load_sam.

Every reference model has every parameter perturbed (tests/sam_factory.py), so zero-initialised
tensors (position embeddings, biases) take part. fp32 outputs must agree within 1e-3.
"""
import copy

import numpy as np
import pytest
import torch

from sam_core import load_sam
from sam_core.modeling.image_encoder import relative_position_table, window_partition, window_unpartition
from tests.sam_factory import make_official_sam, perturb_parameters, real_photos, save_official_checkpoint, tiny_config

pytestmark = pytest.mark.oracle
ATOL = 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(reference Sam, our Sam loaded from the reference's saved .pth)."""
    reference = make_official_sam(seed=0)
    path = save_official_checkpoint(reference, tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    return reference, load_sam(str(path))


def _close(ours, theirs, atol=ATOL):
    ours, theirs = torch.as_tensor(ours).float(), torch.as_tensor(theirs).float()
    assert ours.shape == theirs.shape
    if ours.numel() == 0:
        return
    diff = (ours - theirs).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.2e} > {atol}"


def test_shape_inference_recovers_the_architecture(models):
    _, ours = models
    assert ours.config.to_dict() == tiny_config().to_dict()


@torch.no_grad()
def test_image_embeddings_on_real_photos(models):
    reference, ours = models
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(reference.image_encoder.img_size)
    batch = []
    for photo in real_photos():
        resized = torch.as_tensor(transform.apply_image(photo)).permute(2, 0, 1)
        batch.append(reference.preprocess(resized.float()))
    batch = torch.stack(batch)
    expected = reference.image_encoder(batch)
    assert expected.abs().max() > 0.5  # a live signal, not a near-zero tensor that any code matches
    _close(ours.image_encoder(batch), expected)


@torch.no_grad()
def test_preprocess_and_postprocess(models):
    reference, ours = models
    image = torch.randint(0, 256, (3, 256, 171)).float()
    _close(ours.preprocess(image[None]), reference.preprocess(image)[None], atol=1e-6)
    logits = torch.randn(2, 3, 64, 64)
    _close(ours.postprocess_masks(logits, (256, 171), (300, 200)),
           reference.postprocess_masks(logits, (256, 171), (300, 200)), atol=1e-5)


@pytest.mark.parametrize("with_points, with_boxes, with_masks", [
    (True, False, False), (False, True, False), (True, True, False), (True, False, True), (False, False, True),
])
@pytest.mark.parametrize("multimask", [True, False])
@torch.no_grad()
def test_prompt_encoder_and_decoder(models, with_points, with_boxes, with_masks, multimask):
    reference, ours = models
    generator = torch.Generator().manual_seed(3)
    n = 5
    image = torch.randn(1, 32, 16, 16, generator=generator)
    points = (torch.rand(n, 3, 2, generator=generator) * 256, torch.randint(0, 2, (n, 3), generator=generator))
    points[1][0, 2] = -1  # an explicit padding label too
    corners = torch.rand(n, 2, 2, generator=generator).sort(dim=1).values * 256
    kwargs = dict(
        points=points if with_points else None,
        boxes=corners.reshape(n, 4) if with_boxes else None,
        masks=torch.randn(n, 1, 64, 64, generator=generator) * 3 if with_masks else None,
    )
    sparse_ref, dense_ref = reference.prompt_encoder(**kwargs)
    sparse, dense = ours.prompt_encoder(**kwargs)
    _close(sparse, sparse_ref)
    _close(dense, dense_ref)
    _close(ours.prompt_encoder.get_dense_pe(), reference.prompt_encoder.get_dense_pe())

    logits_ref, iou_ref = reference.mask_decoder(image, reference.prompt_encoder.get_dense_pe(), sparse_ref, dense_ref,
                                                 multimask)
    logits, iou = ours.mask_decoder(image, ours.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    assert logits.shape == (n, 3 if multimask else 1, 64, 64)
    _close(logits, logits_ref)
    _close(iou, iou_ref)


@torch.no_grad()
def test_one_image_embedding_per_prompt_equals_shared_embedding(models):
    """Our decoder also takes B image embeddings for B prompts (AMG across images in one batch)."""
    reference, ours = models
    images = torch.randn(3, 32, 16, 16)
    points = (torch.rand(3, 1, 2) * 256, torch.ones(3, 1, dtype=torch.int))
    sparse, dense = ours.prompt_encoder(points, None, None)
    logits, iou = ours.mask_decoder(images, ours.prompt_encoder.get_dense_pe(), sparse, dense, True)
    for i in range(3):
        s, d = reference.prompt_encoder((points[0][i : i + 1], points[1][i : i + 1]), None, None)
        dense_pe = reference.prompt_encoder.get_dense_pe()
        expected_logits, expected_iou = reference.mask_decoder(images[i : i + 1], dense_pe, s, d, True)
        _close(logits[i : i + 1], expected_logits)
        _close(iou[i : i + 1], expected_iou)


@torch.no_grad()
@pytest.mark.parametrize("image_rows", [1, 3])
def test_transformer_with_a_positional_encoding_per_row(models, image_rows):
    """The two-way transformer also takes one PE per prompt (as the reference does), with a
    shared or a per-prompt image."""
    reference, ours = models
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(image_rows, 32, 16, 16, generator=gen)
    pe = torch.randn(3, 32, 16, 16, generator=gen)
    tokens = torch.randn(3, 5, 32, generator=gen)
    expected_tokens, expected_image = reference.mask_decoder.transformer(image.expand(3, -1, -1, -1), pe, tokens)
    got_tokens, got_image = ours.mask_decoder.transformer(image, pe, tokens)
    _close(got_tokens, expected_tokens, atol=1e-4)
    _close(got_image, expected_image, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_gradients_match_reference(models, dtype):
    """Training through our decoder (e.g. fine-tuning its head) sees the reference's gradients."""
    reference, ours = models
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 32, 16, 16, generator=gen)
    points = (torch.rand(2, 1, 2, generator=gen) * 256, torch.ones(2, 1, dtype=torch.int))
    grads = []
    for model in (reference, ours):
        decoder = copy.deepcopy(model.mask_decoder).to(dtype)  # the module-scoped models stay as they are
        with torch.no_grad():
            sparse, dense = model.prompt_encoder(points, None, None)
        logits, _ = decoder(
            image.to(dtype), model.prompt_encoder.get_dense_pe().to(dtype), sparse.to(dtype), dense.to(dtype), True
        )
        logits.float().square().mean().backward()
        grads.append(decoder.output_hypernetworks_mlps[1].layers[0].weight.grad.float())
    assert grads[1].abs().max() > 0  # gradients reach the hypernetwork
    if dtype == torch.float32:
        scale = grads[0].abs().max().item()
        _close(grads[1] / scale, grads[0] / scale, atol=1e-4)
    else:  # bf16 backward rounds coarsely on both sides: same direction, not same digits
        cosine = torch.nn.functional.cosine_similarity(grads[1].flatten(), grads[0].flatten(), dim=0)
        assert cosine > 0.98, cosine


@torch.no_grad()
def test_batched_forward_interface(models):
    reference, ours = models
    from segment_anything.utils.transforms import ResizeLongestSide

    transform = ResizeLongestSide(256)
    batched = []
    for i, photo in enumerate(real_photos()[:2]):
        record = {
            "image": torch.as_tensor(transform.apply_image(photo)).permute(2, 0, 1).float(),
            "original_size": photo.shape[:2],
            "point_coords": transform.apply_coords_torch(torch.tensor([[[20.0, 30.0], [50.0, 60.0]]]), photo.shape[:2]),
            "point_labels": torch.tensor([[1, 0]]),
        }
        if i == 1:
            record["boxes"] = transform.apply_boxes_torch(torch.tensor([[5.0, 5.0, 80.0, 70.0]]), photo.shape[:2])
            record["mask_inputs"] = torch.randn(1, 1, 64, 64)
        batched.append(record)
    expected = reference(batched, multimask_output=True)
    got = ours(batched, multimask_output=True)
    for mine, theirs in zip(got, expected):
        _close(mine["low_res_logits"], theirs["low_res_logits"])
        _close(mine["iou_predictions"], theirs["iou_predictions"])
        assert torch.equal(mine["masks"], theirs["masks"])


@torch.no_grad()
def test_published_1024_geometry_built_by_official_builder(tmp_path):
    """``_build_sam`` (1024 input, 14-px windows, 256-wide decoder) with a tiny encoder."""
    from segment_anything.build_sam import _build_sam
    from segment_anything import SamPredictor as ReferencePredictor

    from sam_core import SamPredictor

    with torch.random.fork_rng():
        torch.manual_seed(7)
        reference = perturb_parameters(_build_sam(32, 2, 2, [1]), seed=7).eval()
    ours = load_sam(str(save_official_checkpoint(reference, tmp_path / "b.pth")))
    v = ours.config.vision_config
    assert (v.image_size, v.window_size, v.global_attn_indexes, ours.config.mask_decoder_config.mlp_dim) == (
        1024, 14, (1,), 2048)
    photo = real_photos()[1]
    theirs, mine = ReferencePredictor(reference), SamPredictor(ours)
    theirs.set_image(photo)
    mine.set_image(photo)
    _close(mine.features, theirs.features)
    prompt = dict(point_coords=np.array([[60, 100], [20, 30]]), point_labels=np.array([1, 0]),
                  box=np.array([10, 20, 120, 200]), return_logits=True)
    for got, expected in zip(mine.predict(**prompt), theirs.predict(**prompt)):
        _close(got, expected)


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 7, 3)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 3 * 2, 4, 4, 3) and padded == (12, 8)
    assert torch.equal(windows[0], x[0, :4, :4])
    assert torch.equal(window_unpartition(windows, 4, padded, (10, 7)), x)


@pytest.mark.parametrize("q_size, k_size, length", [(14, 14, 27), (14, 14, 13), (8, 16, 31), (16, 8, 31)])
def test_relative_position_table_matches_reference(q_size, k_size, length):
    from segment_anything.modeling.image_encoder import get_rel_pos

    table = torch.randn(length, 8)
    _close(relative_position_table(q_size, k_size, table), get_rel_pos(q_size, k_size, table), atol=1e-6)


@torch.no_grad()
def test_persam_inputs_match_transformers(models, tmp_path):
    """attention_similarity / target_embedding as transformers' SamModel takes them."""
    from transformers import SamModel

    from sam_core import SamPredictor
    from sam_core.hf_format import save_hf_pretrained

    reference, ours = models
    save_hf_pretrained(reference, tiny_config(), str(tmp_path / "hf"))
    hf = SamModel.from_pretrained(str(tmp_path / "hf")).eval()

    predictor = SamPredictor(ours)
    predictor.set_image(real_photos()[0])
    generator = torch.Generator().manual_seed(11)
    n = 4
    coords = torch.rand(n, 1, 2, generator=generator) * 200
    labels = torch.ones(n, 1, dtype=torch.int)
    similarity = torch.randn(1, 1, 1, 16 * 16, generator=generator)
    target = torch.randn(1, 1, 1, 32, generator=generator)

    masks, iou, low_res = predictor.predict_torch(
        coords, labels, attention_similarity=similarity, target_embedding=target, return_logits=True
    )
    assert (low_res - predictor.predict_torch(coords, labels)[2]).abs().max() > 1e-2  # the inputs do act

    out = hf(image_embeddings=predictor.features, input_points=coords[None], input_labels=labels[None],
             attention_similarity=similarity, target_embedding=target, multimask_output=True)
    _close(low_res, out.pred_masks[0])
    _close(iou, out.iou_scores[0])
