"""Our model loaded from a Hugging Face checkpoint vs ``transformers.SamModel`` + ``SamProcessor``.

The HF repositories here are written by transformers itself (``SamModel.save_pretrained`` of a
random model with every parameter perturbed), so ``load_sam`` is tested on the real file layout,
not on our own writer's. Prompts are given in original-image pixels to both sides: our
``SamPredictor`` and HF's processor each transform them, and masks are post-processed to the
photo's size by each side (``SamProcessor.post_process_masks`` on HF's).

Pre-processing: HF's PIL-backend ``SamImageProcessorPil`` is Meta's (PIL bilinear on uint8), and we
match it to float rounding; HF's default torchvision ``SamImageProcessor`` differs by at most one
uint8 level on a small fraction of pixels (asserted below). The model comparisons therefore feed
HF the PIL processor's pixels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_core import SamPredictor, build_sam, load_sam
from sam_core.hf_format import config_from_hf_dict, config_to_hf_dict, hf_to_official_state_dict, save_hf_pretrained
from tests.sam_factory import make_official_sam, perturb_parameters, real_photos, tiny_config

pytestmark = pytest.mark.oracle

LOGIT_TOL = 1e-3  # issue 2: fp32 logits agree within 1e-3


def _slimsam_config():
    """A SlimSAM-shaped tiny config: pruned width 24 (3 heads of 8) and MLP 60 != 4 x 24."""
    d = config_to_hf_dict(tiny_config())
    d["vision_config"].update(hidden_size=24, num_attention_heads=3, mlp_dim=60, mlp_ratio=4.0)
    return config_from_hf_dict(d)


def _transformers_repo(directory, cfg, seed):
    """A perturbed random ``transformers.SamModel`` saved by transformers' own save_pretrained."""
    from transformers import SamConfig as HFSamConfig, SamModel

    torch.manual_seed(seed)
    model = SamModel(HFSamConfig(**config_to_hf_dict(cfg)))
    perturb_parameters(model, seed=seed, std=0.2)  # larger than init: decisive, non-flat logits
    model.save_pretrained(directory)
    return model.eval()


def _processor(image_size: int, pil: bool = True):
    from transformers import SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
    from transformers.models.sam.image_processing_sam import SamImageProcessor

    kind = SamImageProcessorPil if pil else SamImageProcessor
    sizes = dict(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size})
    return SamProcessor(image_processor=kind(**sizes))


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "sam-tiny"
    return directory, _transformers_repo(directory, tiny_config(), seed=21)


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["directory", "safetensors_file", "file_url"])
def test_load_sam_reads_a_transformers_repository(tiny_repo, form):
    directory, hf = tiny_repo
    source = {
        "directory": str(directory),
        "safetensors_file": str(directory / "model.safetensors"),
        "file_url": f"file://{directory}",
    }[form]
    ours = load_sam(source)
    expected = hf_to_official_state_dict(hf.state_dict())
    got = ours.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert ours.config.vision_config.image_size == 256 and not ours.training


def test_our_hf_writer_round_trips_through_load_sam(tmp_path):
    official = make_official_sam(seed=4)
    save_hf_pretrained(official, tiny_config(), tmp_path / "repo")
    ours = load_sam(tmp_path / "repo")
    expected = official.state_dict()
    assert sorted(ours.state_dict()) == sorted(expected)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.s3
def test_hf_repository_on_s3_loads_by_url(s3):
    """Written to real S3 (SeaweedFS) by our writer, read back by load_sam from the bucket URL."""
    official = make_official_sam(seed=6)
    url = "s3://models/hf-parity/sam-tiny"
    save_hf_pretrained(official, tiny_config(), url, storage_options=s3.storage_options)
    expected = official.state_dict()
    for source in (url, f"{url}/model.safetensors"):
        got = load_sam(source, storage_options=s3.storage_options).state_dict()
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], v) for k, v in expected.items())
    s3.filesystem().rm("models/hf-parity", recursive=True)


# --- pre-processing ------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [256, 1024])
def test_preprocessing_matches_the_pil_processor_and_bounds_the_torchvision_one(image_size):
    ours = build_sam(tiny_config(image_size=image_size, window_size=14))
    predictor = SamPredictor(ours)
    pil, tv = _processor(image_size, pil=True), _processor(image_size, pil=False)
    differing = total = 0
    for photo in real_photos():
        x = ours.preprocess(predictor._to_model_input(photo, "RGB"))[0]
        hf_pil = pil(images=photo.copy(), return_tensors="pt")
        assert tuple(hf_pil["reshaped_input_sizes"][0].tolist()) == predictor.transform.get_preprocess_shape(
            *photo.shape[:2], image_size
        )
        assert (hf_pil["pixel_values"][0] - x).abs().max().item() < 1e-5
        # The torchvision resize rounds differently: at most one uint8 level (1/std in normalised units).
        diff_levels = (tv(images=photo.copy(), return_tensors="pt")["pixel_values"][0] - x).abs() * ours.pixel_std
        assert diff_levels.max().item() <= 1.0 + 1e-3
        differing += int((diff_levels > 0.5).sum())
        total += diff_levels.numel()
    assert differing / total < 0.01


# --- model outputs on real photos ----------------------------------------------------------------


def _prompts(photo):
    """Prompts in original-image pixels (x, y), scaled to the photo: every kind the issue lists."""
    h, w = photo.shape[:2]
    pts = np.array([[0.35 * w, 0.45 * h], [0.7 * w, 0.25 * h], [0.2 * w, 0.8 * h]])
    box = np.array([0.1 * w, 0.15 * h, 0.65 * w, 0.9 * h])
    return {
        "one_point": dict(point_coords=pts[:1], point_labels=np.array([1])),
        "negative_points": dict(point_coords=pts, point_labels=np.array([1, 0, 0])),
        "box": dict(box=box),
        "box_and_points": dict(point_coords=pts[:2], point_labels=np.array([1, 0]), box=box),
    }


def _hf_predict(hf, processor, photo, embedding, prompt, multimask, mask_input=None, **persam):
    """HF's own pipeline: processor-transformed prompts, SamModel, post_process_masks (logits)."""
    kwargs = {}
    if "point_coords" in prompt:
        kwargs["input_points"] = [[prompt["point_coords"].tolist()]]
        kwargs["input_labels"] = [[prompt["point_labels"].tolist()]]
    if "box" in prompt:
        kwargs["input_boxes"] = [[prompt["box"].tolist()]]
    inputs = processor(images=photo.copy(), return_tensors="pt", **kwargs)
    model_kwargs = {k: inputs[k] for k in ("input_points", "input_labels", "input_boxes") if k in inputs}
    if mask_input is not None:
        model_kwargs["input_masks"] = torch.as_tensor(mask_input)[None]
    with torch.no_grad():
        out = hf(image_embeddings=embedding, multimask_output=multimask, **model_kwargs, **persam)
    upscaled = processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0][0]
    return upscaled, out.iou_scores[0, 0], out.pred_masks[0, 0]


def _assert_close(actual, expected, what, tol=LOGIT_TOL):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol}"


def _assert_masks_agree(ours_bool, hf_logits, what):
    """Binary masks equal wherever HF's logit is not within LOGIT_TOL of the threshold."""
    decided = hf_logits.abs() > LOGIT_TOL
    mismatch = (torch.as_tensor(ours_bool) != (hf_logits > 0)) & decided
    assert not mismatch.any(), f"{what}: {int(mismatch.sum())} decided pixels differ"
    assert (hf_logits > 0).any() and (hf_logits <= 0).any(), f"{what}: degenerate all-one/all-zero mask"


def _check_photo(ours, hf, processor, photo, prompts, multimasks=(True, False)):
    predictor = SamPredictor(ours)
    predictor.set_image(photo)
    pixel_values = processor(images=photo.copy(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hf_embedding = hf.get_image_embeddings(pixel_values)
    _assert_close(predictor.get_image_embedding(), hf_embedding, "image embedding", tol=1e-4)
    for name, prompt in prompts.items():
        for multimask in multimasks:
            what = f"{name} multimask={multimask} photo {photo.shape[:2]}"
            logits, iou, low_res = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
            masks, _, _ = predictor.predict(**prompt, multimask_output=multimask)
            hf_up, hf_iou, hf_low = _hf_predict(hf, processor, photo, hf_embedding, prompt, multimask)
            _assert_close(low_res, hf_low, f"{what}: low-res logits")
            _assert_close(iou, hf_iou, f"{what}: iou")
            _assert_close(logits, hf_up, f"{what}: upscaled logits")
            for m in range(masks.shape[0]):
                _assert_masks_agree(masks[m], hf_up[m], f"{what}: mask {m}")
    return predictor, hf_embedding


def test_predictions_match_transformers_on_real_photos(tiny_repo):
    directory, hf = tiny_repo
    ours = load_sam(directory)
    processor = _processor(256)
    for photo in real_photos():
        predictor, hf_embedding = _check_photo(ours, hf, processor, photo, _prompts(photo))
        # mask-input chaining: feed the best low-res mask back with a new point
        prompt = _prompts(photo)["one_point"]
        _, iou, low_res = predictor.predict(**prompt, multimask_output=True)
        chained = low_res[int(np.argmax(iou))][None]
        logits, iou2, low2 = predictor.predict(**prompt, mask_input=chained, multimask_output=False,
                                               return_logits=True)
        hf_up, hf_iou, hf_low = _hf_predict(hf, processor, photo, hf_embedding, prompt, False, mask_input=chained)
        _assert_close(low2, hf_low, "chained low-res logits")
        _assert_close(iou2, hf_iou, "chained iou")
        _assert_close(logits, hf_up, "chained upscaled logits")


def test_slimsam_shaped_model_matches_transformers(tmp_path):
    hf = _transformers_repo(tmp_path / "slimsam", _slimsam_config(), seed=22)
    ours = load_sam(tmp_path / "slimsam")
    assert ours.image_encoder.blocks[0].mlp.lin1.out_features == 60
    photo = real_photos()[0]
    _check_photo(ours, hf, _processor(256), photo, _prompts(photo))


def test_full_1024_input_matches_transformers(tmp_path):
    cfg = tiny_config(image_size=1024, window_size=14)
    hf = _transformers_repo(tmp_path / "tiny1024", cfg, seed=23)
    ours = load_sam(tmp_path / "tiny1024")
    photo = real_photos()[1]
    prompts = _prompts(photo)
    _check_photo(ours, hf, _processor(1024), photo, {k: prompts[k] for k in ("negative_points", "box")},
                 multimasks=(True,))


def test_persam_inputs_match_transformers(tiny_repo):
    """PerSAM's target-guided attention and target-semantic prompting, as SamModel takes them."""
    directory, hf = tiny_repo
    ours = load_sam(directory)
    processor = _processor(256)
    photo = real_photos()[2]
    predictor = SamPredictor(ours)
    predictor.set_image(photo)
    hf_embedding = predictor.get_image_embedding()
    g = torch.Generator().manual_seed(31)
    grid = hf_embedding.shape[-1]
    channels = hf_embedding.shape[1]
    # PerSAM: a sigmoid similarity over image tokens, and a mean target feature added to the tokens.
    attention_similarity = torch.rand(1, 1, 1, grid * grid, generator=g) * 2
    target_embedding = torch.randn(1, 1, channels, generator=g)
    prompt = _prompts(photo)["negative_points"]
    coords = torch.as_tensor(predictor.transform.apply_coords(prompt["point_coords"], photo.shape[:2]),
                             dtype=torch.float)[None]
    labels = torch.as_tensor(prompt["point_labels"])[None]
    for multimask in (True, False):
        logits, iou, low_res = predictor.predict_torch(
            coords, labels, multimask_output=multimask, return_logits=True,
            attention_similarity=attention_similarity, target_embedding=target_embedding,
        )
        plain_low_res = predictor.predict_torch(coords, labels, multimask_output=multimask)[2]
        hf_up, hf_iou, hf_low = _hf_predict(
            hf, processor, photo, hf_embedding, prompt, multimask,
            attention_similarity=attention_similarity, target_embedding=target_embedding[None],
        )
        _assert_close(low_res[0], hf_low, f"PerSAM low-res logits multimask={multimask}")
        _assert_close(iou[0], hf_iou, f"PerSAM iou multimask={multimask}")
        _assert_close(logits[0], hf_up, f"PerSAM upscaled logits multimask={multimask}")
        # the PerSAM inputs must actually change the result, or this test proves nothing
        assert (low_res - plain_low_res).abs().max().item() > 10 * LOGIT_TOL
