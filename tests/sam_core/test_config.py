"""SamConfig: HF field names, presets, dict round trip, consistency checks."""
import dataclasses

import pytest

from sam_core.config import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig


@pytest.mark.oracle
@pytest.mark.parametrize(
    "ours, name",
    [(SamVisionConfig, "SamVisionConfig"), (SamPromptEncoderConfig, "SamPromptEncoderConfig"),
     (SamMaskDecoderConfig, "SamMaskDecoderConfig")],
)
def test_fields_and_defaults_match_transformers(ours, name):
    import transformers

    theirs = getattr(transformers, name)()
    for f in dataclasses.fields(ours):
        expected = getattr(theirs, f.name)
        if f.name == "mlp_dim" and ours is SamVisionConfig:
            expected = None  # HF resolves None to mlp_ratio * hidden_size at construction
        got = getattr(ours(), f.name)
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(expected) if isinstance(expected, tuple) else expected
        ), f.name


@pytest.mark.parametrize(
    "name, width, depth, heads, global_layers",
    [("vit_b", 768, 12, 12, (2, 5, 8, 11)), ("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
     ("vit_h", 1280, 32, 16, (7, 15, 23, 31))],
)
def test_presets(name, width, depth, heads, global_layers):
    v = SamConfig.preset(name).vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.global_attn_indexes) == (
        width, depth, heads, global_layers)
    assert v.resolved_mlp_dim == 4 * width and v.grid_size == 64


def test_unknown_preset():
    with pytest.raises(ValueError, match="vit_b"):
        SamConfig.preset("vit_x")


def test_dict_round_trip_and_nested_dicts():
    config = SamConfig(vision_config=SamVisionConfig(hidden_size=168, mlp_dim=696, num_attention_heads=12))
    again = SamConfig.from_dict(config.to_dict())
    assert again == config
    assert again.vision_config.resolved_mlp_dim == 696
    assert SamConfig(vision_config={"hidden_size": 64, "num_attention_heads": 4}).vision_config.hidden_size == 64


def test_from_dict_unknown_keys():
    d = SamConfig().to_dict()
    d["vision_config"]["model_type"] = "sam_vision_model"
    with pytest.raises(ValueError, match="model_type"):
        SamConfig.from_dict(d)
    assert SamConfig.from_dict(d, strict=False) == SamConfig()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vision_config=SamVisionConfig(output_channels=128, num_pos_feats=64)), "must be equal"),
        (dict(vision_config=SamVisionConfig(num_pos_feats=64)), "num_pos_feats"),
        (dict(prompt_encoder_config=SamPromptEncoderConfig(image_size=512)), "image/patch size"),
    ],
)
def test_inconsistent_configs_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamConfig(**kwargs)


def test_vision_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        SamVisionConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="outside"):
        SamVisionConfig(num_hidden_layers=2, global_attn_indexes=(5,))
