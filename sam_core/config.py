"""Model configuration: three dataclasses plus the whole-model ``SamConfig``.

Field names are exactly the Hugging Face ``transformers`` ones (``SamVisionConfig``,
``SamPromptEncoderConfig``, ``SamMaskDecoderConfig``), so a ``config.json`` from the Hub maps onto
them field by field, and people who know either library recognise every knob.

One width must agree across the three parts: the vision neck's ``output_channels`` is the prompt
encoder's and the mask decoder's ``hidden_size`` (256 in every published SAM).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

# Per-preset encoder shapes, as published with segment-anything.
_ENCODER_PRESETS = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
PRESET_NAMES = tuple(_ENCODER_PRESETS)


class _DictMixin:
    """``to_dict`` / ``from_dict`` for flat dataclasses; tuples become lists in JSON form."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = True):
        """Build from a dict. ``strict=False`` ignores keys we do not know (e.g. ``model_type``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if strict and unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SamVisionConfig(_DictMixin):
    """ViT image encoder. ``mlp_dim=None`` means ``int(hidden_size * mlp_ratio)`` (pruned
    models such as SlimSAM set ``mlp_dim`` explicitly). ``num_pos_feats`` is half the width of
    the prompt encoder's random-Fourier positional encoding (``output_channels // 2``)."""

    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    num_pos_feats: int = 128
    mlp_dim: Optional[int] = None

    def __post_init__(self):
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside 0..{self.num_hidden_layers - 1}")

    @property
    def resolved_mlp_dim(self) -> int:
        """Width of each block's MLP hidden layer."""
        return int(self.hidden_size * self.mlp_ratio) if self.mlp_dim is None else int(self.mlp_dim)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid (= image embedding side), e.g. 64 for 1024/16."""
        return self.image_size // self.patch_size


@dataclass
class SamPromptEncoderConfig(_DictMixin):
    """Prompt encoder: points, boxes and a low-res mask into sparse/dense embeddings."""

    hidden_size: int = 256
    image_size: int = 1024
    patch_size: int = 16
    mask_input_channels: int = 16
    num_point_embeddings: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class SamMaskDecoderConfig(_DictMixin):
    """Two-way transformer mask decoder with its IoU head."""

    hidden_size: int = 256
    hidden_act: str = "relu"
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    layer_norm_eps: float = 1e-6


@dataclass
class SamConfig:
    """The whole model. Sub-configs may be given as dataclasses or as dicts."""

    vision_config: SamVisionConfig = field(default_factory=SamVisionConfig)
    prompt_encoder_config: SamPromptEncoderConfig = field(default_factory=SamPromptEncoderConfig)
    mask_decoder_config: SamMaskDecoderConfig = field(default_factory=SamMaskDecoderConfig)

    def __post_init__(self):
        if self.vision_config is None:
            self.vision_config = SamVisionConfig()
        if self.prompt_encoder_config is None:
            self.prompt_encoder_config = SamPromptEncoderConfig()
        if self.mask_decoder_config is None:
            self.mask_decoder_config = SamMaskDecoderConfig()
        if isinstance(self.vision_config, dict):
            self.vision_config = SamVisionConfig.from_dict(self.vision_config)
        if isinstance(self.prompt_encoder_config, dict):
            self.prompt_encoder_config = SamPromptEncoderConfig.from_dict(self.prompt_encoder_config)
        if isinstance(self.mask_decoder_config, dict):
            self.mask_decoder_config = SamMaskDecoderConfig.from_dict(self.mask_decoder_config)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` when the three parts disagree on a shared size."""
        v, p, m = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
        if not v.output_channels == p.hidden_size == m.hidden_size:
            raise ValueError(
                "vision output_channels, prompt encoder hidden_size and mask decoder hidden_size must be equal, "
                f"got {v.output_channels}, {p.hidden_size}, {m.hidden_size}"
            )
        if 2 * v.num_pos_feats != p.hidden_size:
            raise ValueError(f"vision num_pos_feats ({v.num_pos_feats}) must be half of {p.hidden_size}")
        if (v.image_size, v.patch_size) != (p.image_size, p.patch_size):
            raise ValueError(
                f"vision image/patch size {v.image_size}/{v.patch_size} differs from the prompt encoder's "
                f"{p.image_size}/{p.patch_size}"
            )
        if m.hidden_size % m.num_attention_heads:
            raise ValueError("mask decoder hidden_size must be divisible by its num_attention_heads")

    @classmethod
    def preset(cls, name: str) -> "SamConfig":
        """The published SAM sizes: ``"vit_b"``, ``"vit_l"`` or ``"vit_h"``."""
        if name not in _ENCODER_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")
        return cls(vision_config=SamVisionConfig(**_ENCODER_PRESETS[name]))

    def to_dict(self) -> dict:
        return {
            "vision_config": self.vision_config.to_dict(),
            "prompt_encoder_config": self.prompt_encoder_config.to_dict(),
            "mask_decoder_config": self.mask_decoder_config.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True) -> "SamConfig":
        """Inverse of ``to_dict``. ``strict=False`` ignores unknown keys at both levels."""
        top = {"vision_config", "prompt_encoder_config", "mask_decoder_config"}
        unknown = sorted(set(d) - top)
        if strict and unknown:
            raise ValueError(f"SamConfig: unknown field(s) {unknown}; known: {sorted(top)}")
        return cls(
            vision_config=SamVisionConfig.from_dict(d.get("vision_config", {}), strict=strict),
            prompt_encoder_config=SamPromptEncoderConfig.from_dict(d.get("prompt_encoder_config", {}), strict=strict),
            mask_decoder_config=SamMaskDecoderConfig.from_dict(d.get("mask_decoder_config", {}), strict=strict),
        )
