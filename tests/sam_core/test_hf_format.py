"""sam_core.hf_format: HF config.json parsing and the SamModel <-> Meta key mapping.

The mapping is proven between the two reference implementations, without our model: a tiny
segment-anything ``Sam`` (every parameter perturbed) is renamed into ``transformers.SamModel`` with a
strict load, and both must then compute the same embeddings, low-res logits and IoU predictions.
Config parsing is checked against ``transformers.SamConfig`` reading the same Hub-shaped dicts.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from sam_core.config import SamConfig
from sam_core.hf_format import (
    HF_CONFIG_NAME,
    HF_POSITIONAL_KEY,
    HF_TIED_POSITIONAL_KEY,
    HF_WEIGHTS_NAME,
    OFFICIAL_POSITIONAL_KEY,
    config_from_hf_dict,
    config_to_hf_dict,
    hf_to_official_state_dict,
    official_to_hf_state_dict,
    save_hf_pretrained,
)
from tests.sam_factory import make_official_sam, tiny_config

# --- Hub-shaped config.json dicts (abridged copies of real repositories' files) -----------------

# facebook/sam-vit-base as re-exported by many repos: every size left to the defaults, plus keys
# transformers ignores. ``intermediate_size`` is a trap: it is not the MLP width.
HUB_VIT_B = {
    "_name_or_path": "facebook/sam-vit-base",
    "architectures": ["SamModel"],
    "initializer_range": 0.02,
    "mask_decoder_config": {"model_type": ""},
    "model_type": "sam",
    "prompt_encoder_config": {"model_type": ""},
    "transformers_version": "4.36.2",
    "vision_config": {
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "intermediate_size": 6144,
        "model_type": "",
        "projection_dim": 512,
    },
}
# facebook/sam-vit-huge style: explicit encoder sizes and mlp_dim.
HUB_VIT_H = {
    **HUB_VIT_B,
    "vision_config": {
        "dropout": 0.0,
        "global_attn_indexes": [7, 15, 23, 31],
        "hidden_size": 1280,
        "initializer_factor": 1.0,
        "intermediate_size": 6144,
        "mlp_dim": 5120,
        "model_type": "",
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "projection_dim": 512,
    },
}
# SlimSAM (nielsr/slimsam-77-uniform): pruned width and MLP, 12 heads of 14 channels.
HUB_SLIMSAM_77 = {
    "architectures": ["SamModel"],
    "initializer_range": 0.02,
    "mask_decoder_config": {"model_type": ""},
    "model_type": "sam",
    "prompt_encoder_config": {"model_type": ""},
    "torch_dtype": "float32",
    "transformers_version": "4.37.0.dev0",
    "vision_config": {"hidden_size": 168, "mlp_dim": 696, "model_type": ""},
}
HUB_SLIMSAM_50 = copy.deepcopy(HUB_SLIMSAM_77)
HUB_SLIMSAM_50["vision_config"].update(hidden_size=384, mlp_dim=1536)
# An old full PretrainedConfig dump (sam-vit-tiny-random style): generation settings everywhere.
_GENERATION_JUNK = {
    "_name_or_path": "",
    "add_cross_attention": False,
    "bad_words_ids": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "num_beams": 1,
    "output_attentions": False,
    "torchscript": False,
}
HUB_FULL_DUMP = {
    "_commit_hash": "a7c34ea5d2b33a3bc34d34dc9a7b2417c0eaa809",
    "architectures": ["SamModel"],
    "initializer_range": 0.02,
    "model_type": "sam",
    "mask_decoder_config": {
        **_GENERATION_JUNK, "attention_downsample_rate": 2, "hidden_act": "relu", "hidden_size": 32,
        "iou_head_depth": 3, "iou_head_hidden_dim": 256, "layer_norm_eps": 1e-06, "mlp_dim": 2048,
        "model_type": "", "num_attention_heads": 8, "num_hidden_layers": 2, "num_multimask_outputs": 3,
    },
    "prompt_encoder_config": {
        **_GENERATION_JUNK, "hidden_act": "gelu", "hidden_size": 32, "image_embedding_size": 64,
        "image_size": 1024, "layer_norm_eps": 1e-06, "mask_input_channels": 16, "model_type": "",
        "num_point_embeddings": 4, "patch_size": 16,
    },
    "vision_config": {
        **_GENERATION_JUNK, "attention_dropout": 0.0, "dropout": 0.0, "global_attn_indexes": [2, 5, 8, 11],
        "hidden_act": "gelu", "hidden_size": 36, "image_size": 1024, "initializer_factor": 1.0,
        "initializer_range": 1e-10, "intermediate_size": 6144, "layer_norm_eps": 1e-06, "mlp_dim": None,
        "mlp_ratio": 4.0, "model_type": "sam_vision_model", "num_attention_heads": 12, "num_channels": 3,
        "num_hidden_layers": 12, "num_pos_feats": 16, "output_channels": 32, "patch_size": 16,
        "projection_dim": 512, "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True, "window_size": 14,
    },
}
HUB_CONFIGS = {
    "vit_b": HUB_VIT_B,
    "vit_h": HUB_VIT_H,
    "slimsam_77": HUB_SLIMSAM_77,
    "slimsam_50": HUB_SLIMSAM_50,
    "full_dump": HUB_FULL_DUMP,
}


def _fields(cfg: SamConfig) -> dict:
    """Every field of our config, with mlp_dim resolved (None and its computed value mean the same)."""
    out = {}
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        sub = getattr(cfg, part)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            out[f"{part}.{f.name}"] = list(value) if isinstance(value, tuple) else value
    out["vision_config.mlp_dim"] = cfg.vision_config.resolved_mlp_dim
    return out


def _hf_fields(hf_cfg) -> dict:
    """The same fields as read by transformers."""
    out = {}
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        sub = getattr(hf_cfg, part)
        for name in dataclasses.fields(getattr(SamConfig(), part)):
            value = getattr(sub, name.name)
            out[f"{part}.{name.name}"] = list(value) if isinstance(value, tuple) else value
    return out


# --- config.json ----------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_configs_read_like_transformers(name):
    from transformers import SamConfig as HFSamConfig

    d = HUB_CONFIGS[name]
    ours = config_from_hf_dict(copy.deepcopy(d))
    theirs = HFSamConfig.from_dict(copy.deepcopy(d))
    assert _fields(ours) == _hf_fields(theirs)


def test_hub_configs_give_the_published_architectures():
    vit_b = config_from_hf_dict(HUB_VIT_B)
    assert _fields(vit_b) == _fields(SamConfig.preset("vit_b"))
    assert vit_b.vision_config.resolved_mlp_dim == 3072  # not intermediate_size 6144

    vit_h = config_from_hf_dict(HUB_VIT_H)
    assert _fields(vit_h) == _fields(SamConfig.preset("vit_h"))

    slim = config_from_hf_dict(HUB_SLIMSAM_77).vision_config
    assert (slim.hidden_size, slim.resolved_mlp_dim, slim.num_attention_heads) == (168, 696, 12)
    assert slim.num_hidden_layers == 12 and slim.global_attn_indexes == (2, 5, 8, 11)


def test_square_list_sizes_and_integral_floats_are_accepted():
    d = {"vision_config": {"image_size": [512, 512], "patch_size": 16.0, "hidden_size": 64.0, "num_attention_heads": 4},
         "prompt_encoder_config": {"image_size": 512}}
    cfg = config_from_hf_dict(d)
    assert cfg.vision_config.image_size == 512 and isinstance(cfg.vision_config.hidden_size, int)
    assert cfg.prompt_encoder_config.image_embedding_size == 32


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1, 2], "JSON object"),
        ({"model_type": "sam2"}, "model_type 'sam2'"),
        ({"model_type": "sam_hq"}, "model_type 'sam_hq'"),
        ({"vision_config": [1, 2]}, "vision_config must be a JSON object"),
        ({"vision_config": {"embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2]}}, "TinyViT"),
        ({"vision_config": {"hidden_size": "768"}}, "vision_config.hidden_size"),
        ({"vision_config": {"hidden_size": -768}}, "vision_config.hidden_size"),
        ({"vision_config": {"num_hidden_layers": True}}, "vision_config.num_hidden_layers"),
        ({"vision_config": {"hidden_size": 768.5}}, "vision_config.hidden_size"),
        ({"vision_config": {"image_size": [1024, 768]}}, "must be square"),
        ({"vision_config": {"global_attn_indexes": "2,5"}}, "global_attn_indexes"),
        ({"vision_config": {"use_rel_pos": "yes"}}, "use_rel_pos"),
        ({"vision_config": {"layer_norm_eps": "tiny"}}, "layer_norm_eps"),
        ({"mask_decoder_config": {"hidden_act": 3}}, "hidden_act"),
        ({"vision_config": {"hidden_size": 100, "num_attention_heads": 12}}, "divisible"),
        ({"vision_config": {"global_attn_indexes": [2, 12]}}, "global_attn_indexes"),
        ({"mask_decoder_config": {"hidden_size": 128}}, "must be equal"),
        ({"vision_config": {"image_size": 512}}, "image/patch size"),
    ],
)
def test_nonsense_configs_raise_a_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf_dict(bad)


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["tiny", "slimsam_77", "vit_h"])
def test_config_to_hf_dict_round_trips_through_transformers(name):
    from transformers import SamConfig as HFSamConfig

    cfg = {"tiny": tiny_config(), "vit_h": SamConfig.preset("vit_h")}.get(name) or config_from_hf_dict(HUB_SLIMSAM_77)
    d = config_to_hf_dict(cfg)
    json.dumps(d)  # must be serialisable as config.json
    hf = HFSamConfig(**copy.deepcopy(d))
    assert _hf_fields(hf) == _fields(cfg)
    assert _fields(config_from_hf_dict(hf.to_dict())) == _fields(cfg)


# --- state dicts between the two oracles ---------------------------------------------------------

SLIM_SIZES = dict(embed_dim=24, num_heads=3, mlp_ratio=2.5)  # pruned-looking: width 24, MLP 60, 8-ch heads


def _slimsam_config():
    """Our config for ``make_official_sam(**SLIM_SIZES)``, written the way SlimSAM's config.json is."""
    d = config_to_hf_dict(tiny_config())
    d["vision_config"].update(hidden_size=24, num_attention_heads=3, mlp_dim=60, mlp_ratio=4.0)
    return config_from_hf_dict(d)


def _hf_twin(official, cfg: SamConfig):
    """``transformers.SamModel`` built from ``cfg`` carrying ``official``'s weights (strict load)."""
    from transformers import SamConfig as HFSamConfig, SamModel

    model = SamModel(HFSamConfig(**config_to_hf_dict(cfg))).eval()
    result = model.load_state_dict(official_to_hf_state_dict(official.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


# Prompts in the model's input frame (0..image_size), covering every prompt kind.
def _prompt_cases(image_size: int):
    s = image_size
    pts = torch.tensor([[[0.3 * s, 0.4 * s], [0.7 * s, 0.2 * s]], [[0.5 * s, 0.5 * s], [0.1 * s, 0.9 * s]]])
    box = torch.tensor([[0.1 * s, 0.2 * s, 0.6 * s, 0.8 * s], [0.3 * s, 0.1 * s, 0.9 * s, 0.5 * s]])
    return {
        "points": dict(points=pts, labels=torch.tensor([[1, 1], [1, 1]])),
        "negative_points": dict(points=pts, labels=torch.tensor([[1, 0], [0, 1]])),
        "box": dict(boxes=box),
        "box_and_points": dict(points=pts, labels=torch.tensor([[1, 0], [1, 1]]), boxes=box),
        "mask_input": dict(points=pts[:1], labels=torch.tensor([[1, 0]]), masks=True),
    }


def _official_decode(official, embedding, prompt, multimask):
    pe = official.prompt_encoder
    masks = None
    if prompt.get("masks"):
        masks = _mask_input(official, prompt["points"].shape[0])
    points = (prompt["points"], prompt["labels"]) if "points" in prompt else None
    sparse, dense = pe(points=points, boxes=prompt.get("boxes"), masks=masks)
    return official.mask_decoder(
        image_embeddings=embedding, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask,
    )


def _hf_decode(hf, embedding, prompt, multimask, official):
    kwargs = {}
    if "points" in prompt:
        kwargs.update(input_points=prompt["points"][None], input_labels=prompt["labels"][None])
    if "boxes" in prompt:
        kwargs["input_boxes"] = prompt["boxes"][None]
    if prompt.get("masks"):
        kwargs["input_masks"] = _mask_input(official, prompt["points"].shape[0])
    out = hf(image_embeddings=embedding, multimask_output=multimask, **kwargs)
    return out.pred_masks[0], out.iou_scores[0]


def _mask_input(official, n):
    """A deterministic low-res logit mask (n x 1 x 4h x 4w), as fed back in mask-input chaining."""
    side = 4 * official.prompt_encoder.image_embedding_size[0]
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 1, side, side, generator=g) * 4


def _assert_close(actual, expected, what):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= 1e-4 * max(1.0, scale), f"{what}: max abs diff {err:.3g} (scale {scale:.3g})"


@pytest.mark.oracle
@pytest.mark.parametrize(
    "sizes",
    [pytest.param({}, id="tiny256"), pytest.param(SLIM_SIZES, id="slimsam_shaped"),
     pytest.param(dict(image_size=1024, window_size=14), id="tiny1024")],
)
def test_official_weights_run_identically_in_transformers(sizes):
    official = make_official_sam(seed=1, **sizes)
    cfg = _slimsam_config() if sizes is SLIM_SIZES else tiny_config(**sizes)
    hf = _hf_twin(official, cfg)
    side = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb_official = official.image_encoder(pixels)
        emb_hf = hf.get_image_embeddings(pixels)
        _assert_close(emb_hf, emb_official, "image embedding")
        for case, prompt in _prompt_cases(side).items():
            for multimask in (True, False):
                low_res, iou = _official_decode(official, emb_official, prompt, multimask)
                hf_low_res, hf_iou = _hf_decode(hf, emb_official, prompt, multimask, official)
                assert hf_low_res.shape == low_res.shape, case
                _assert_close(hf_low_res, low_res, f"{case} low-res logits (multimask={multimask})")
                _assert_close(hf_iou, iou, f"{case} iou (multimask={multimask})")


@pytest.mark.oracle
def test_transformers_weights_run_identically_in_segment_anything():
    """The inverse direction: a perturbed SamModel's own state dict, renamed, drives Meta's Sam."""
    from tests.sam_factory import perturb_parameters

    official = make_official_sam(seed=2)
    hf = _hf_twin(make_official_sam(seed=5), tiny_config())
    perturb_parameters(hf, seed=9)  # weights that never came from the official model
    hf_sd = hf.state_dict()
    assert torch.equal(hf_sd[HF_TIED_POSITIONAL_KEY], hf_sd[HF_POSITIONAL_KEY])  # tied in SamModel
    result = official.load_state_dict(hf_to_official_state_dict(hf_sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    prompt = _prompt_cases(256)["box_and_points"]
    with torch.no_grad():
        emb = official.image_encoder(pixels)
        _assert_close(hf.get_image_embeddings(pixels), emb, "image embedding")
        low_res, iou = _official_decode(official, emb, prompt, True)
        hf_low_res, hf_iou = _hf_decode(hf, emb, prompt, True, official)
    _assert_close(hf_low_res, low_res, "low-res logits")
    _assert_close(hf_iou, iou, "iou")


@pytest.mark.parametrize("sizes", [{}, SLIM_SIZES, dict(depth=3, global_attn_indexes=(0, 2))])
def test_key_mapping_round_trips_exactly(sizes):
    sd = make_official_sam(seed=0, **sizes).state_dict()
    hf_sd = official_to_hf_state_dict(sd)
    assert hf_sd[HF_POSITIONAL_KEY] is sd[OFFICIAL_POSITIONAL_KEY]
    assert hf_sd[HF_TIED_POSITIONAL_KEY] is sd[OFFICIAL_POSITIONAL_KEY]
    assert not [k for k in hf_sd if k.startswith("image_encoder.") or ".norm" in k]
    back = hf_to_official_state_dict(hf_sd)
    assert sorted(back) == sorted(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_mlp_depth_is_read_from_the_keys():
    """Meta's layers.0..d-1 become proj_in / layers.0..d-3 / proj_out for any depth, and back."""
    w = {f"mask_decoder.iou_prediction_head.layers.{j}.weight": torch.full((1,), float(j)) for j in range(5)}
    hf = official_to_hf_state_dict(w)
    assert sorted(hf) == sorted(
        ["mask_decoder.iou_prediction_head.proj_in.weight", "mask_decoder.iou_prediction_head.proj_out.weight"]
        + [f"mask_decoder.iou_prediction_head.layers.{j}.weight" for j in range(3)]
    )
    assert hf["mask_decoder.iou_prediction_head.proj_out.weight"].item() == 4
    assert hf["mask_decoder.iou_prediction_head.layers.2.weight"].item() == 3
    assert {k: v.item() for k, v in hf_to_official_state_dict(hf).items()} == {k: v.item() for k, v in w.items()}


def test_saved_files_with_only_one_positional_copy_load():
    sd = make_official_sam(seed=0).state_dict()
    hf_sd = official_to_hf_state_dict(sd)
    del hf_sd[HF_TIED_POSITIONAL_KEY]
    assert torch.equal(hf_to_official_state_dict(hf_sd)[OFFICIAL_POSITIONAL_KEY], sd[OFFICIAL_POSITIONAL_KEY])


def test_untied_positional_copies_are_refused():
    hf_sd = official_to_hf_state_dict(make_official_sam(seed=0).state_dict())
    hf_sd[HF_TIED_POSITIONAL_KEY] = hf_sd[HF_POSITIONAL_KEY] + 1
    with pytest.raises(ValueError, match="tied"):
        hf_to_official_state_dict(hf_sd)


def test_unknown_keys_pass_through_for_the_strict_load_to_name():
    out = hf_to_official_state_dict({"lm_head.weight": torch.zeros(1), "vision_encoder.pos_embed": torch.zeros(1)})
    assert sorted(out) == ["image_encoder.pos_embed", "lm_head.weight"]


# --- writing an HF repository -------------------------------------------------------------------


@pytest.mark.oracle
def test_save_hf_pretrained_loads_with_transformers_from_pretrained(tmp_path):
    from transformers import SamModel

    official = make_official_sam(seed=3)
    out = save_hf_pretrained(official, tiny_config(), tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [HF_CONFIG_NAME, HF_WEIGHTS_NAME]
    hf, info = SamModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    prompt = _prompt_cases(256)["points"]
    with torch.no_grad():
        emb = official.image_encoder(pixels)
        _assert_close(hf.eval().get_image_embeddings(pixels), emb, "image embedding")
        low_res, iou = _official_decode(official, emb, prompt, True)
        hf_low_res, hf_iou = _hf_decode(hf, emb, prompt, True, official)
    _assert_close(hf_low_res, low_res, "low-res logits")
    _assert_close(hf_iou, iou, "iou")


def test_save_hf_pretrained_writes_through_fsspec_urls(tmp_path):
    import fsspec
    from safetensors.torch import load

    sd = make_official_sam(seed=0).state_dict()
    save_hf_pretrained(sd, tiny_config(), "memory://hf-format-test/repo")
    fs = fsspec.filesystem("memory")
    with fs.open("/hf-format-test/repo/" + HF_WEIGHTS_NAME, "rb") as f:
        tensors = load(f.read())
    with fs.open("/hf-format-test/repo/" + HF_CONFIG_NAME, "r") as f:
        assert _fields(config_from_hf_dict(json.load(f))) == _fields(tiny_config())
    fs.rm("/hf-format-test", recursive=True)
    assert HF_TIED_POSITIONAL_KEY not in tensors  # left out like transformers' save_pretrained does
    back = hf_to_official_state_dict(tensors)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
