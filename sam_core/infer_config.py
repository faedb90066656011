"""Infer a ``SamConfig`` from the tensor shapes of an official (Meta-named) SAM state dict.

What the shapes tell (B = ``image_encoder.blocks.{i}``):
- ``patch_embed.proj.weight`` (D, channels, P, P): width D, patch size P;
- ``pos_embed`` (1, G, G, D): image size G * P (absent: abs pos off, G from a global rel-pos table);
- ``B.attn.rel_pos_h`` (L, D / heads): heads; L = 2G - 1 marks a global layer, else L = 2 * window - 1;
- ``B.mlp.lin1.weight`` (mlp_dim, D); ``neck.0.weight`` (C, D, 1, 1): output channels;
- decoder depth, MLP width, attention downsample rate, IoU head width/depth and mask-token count.
What they cannot tell: head counts without rel-pos tables, and the decoder's head count. Those take
the published values (encoder: by width; decoder: 8).
"""
from __future__ import annotations

import re
from typing import Mapping

from sam_core.config import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

PUBLISHED_DECODER_HEADS = 8
# Encoder heads of the published models, keyed by width; only used without rel-pos tables.
_PUBLISHED_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}


class ShapeInferenceError(ValueError):
    """The state dict lacks a tensor needed to read the architecture, or its shapes disagree."""


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ShapeInferenceError(f"missing key {key!r}")
    return tuple(sd[key].shape)


def _count_indexed(sd: Mapping, prefix: str) -> int:
    """Number of ``prefix{i}.`` children, i = 0, 1, ... (e.g. encoder blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexes = {int(m.group(1)) for key in sd for m in [pattern.match(key)] if m}
    if indexes != set(range(len(indexes))):
        raise ShapeInferenceError(f"{prefix}* indexes are not contiguous: {sorted(indexes)}")
    return len(indexes)


def _vision_config(sd: Mapping) -> SamVisionConfig:
    width, channels, patch, _ = _shape(sd, "image_encoder.patch_embed.proj.weight")
    depth = _count_indexed(sd, "image_encoder.blocks.")
    if depth == 0:
        raise ShapeInferenceError("no image_encoder.blocks.* tensors")
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in sd
    use_abs_pos = "image_encoder.pos_embed" in sd

    rel_lengths = []
    if use_rel_pos:
        rel_lengths = [_shape(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] for i in range(depth)]
        head_dim = _shape(sd, "image_encoder.blocks.0.attn.rel_pos_h")[1]
        if width % head_dim:
            raise ShapeInferenceError(f"rel_pos head dim {head_dim} does not divide width {width}")
        heads = width // head_dim
    elif width in _PUBLISHED_ENCODER_HEADS:
        heads = _PUBLISHED_ENCODER_HEADS[width]
    else:
        raise ShapeInferenceError(f"cannot infer encoder heads for width {width} without rel-pos tables")

    if use_abs_pos:
        grid = _shape(sd, "image_encoder.pos_embed")[1]
    elif rel_lengths:
        grid = (max(rel_lengths) + 1) // 2
    else:
        grid = 1024 // patch
    global_length = 2 * grid - 1
    global_layers = tuple(i for i, n in enumerate(rel_lengths) if n == global_length)
    window_lengths = {n for n in rel_lengths if n != global_length}
    if len(window_lengths) > 1:
        raise ShapeInferenceError(
            f"windowed blocks disagree on the window size: rel_pos lengths {sorted(window_lengths)}"
        )
    window = (window_lengths.pop() + 1) // 2 if window_lengths else 0

    mlp_dims = {_shape(sd, f"image_encoder.blocks.{i}.mlp.lin1.weight")[0] for i in range(depth)}
    if len(mlp_dims) > 1:
        raise ShapeInferenceError(f"encoder blocks have different MLP widths {sorted(mlp_dims)}")
    mlp_dim = mlp_dims.pop()
    output_channels = _shape(sd, "image_encoder.neck.0.weight")[0]
    return SamVisionConfig(
        hidden_size=width,
        output_channels=output_channels,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
        use_abs_pos=use_abs_pos,
        use_rel_pos=use_rel_pos,
        window_size=window,
        global_attn_indexes=global_layers,
        num_pos_feats=output_channels // 2,
        mlp_dim=None if mlp_dim == 4 * width else mlp_dim,
    )


def _prompt_encoder_config(sd: Mapping, vision: SamVisionConfig) -> SamPromptEncoderConfig:
    hidden = _shape(sd, "prompt_encoder.no_mask_embed.weight")[1]
    return SamPromptEncoderConfig(
        hidden_size=hidden,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        mask_input_channels=_shape(sd, "prompt_encoder.mask_downscaling.3.weight")[0],
        num_point_embeddings=_count_indexed(sd, "prompt_encoder.point_embeddings."),
    )


def _mask_decoder_config(sd: Mapping) -> SamMaskDecoderConfig:
    hidden = _shape(sd, "mask_decoder.iou_token.weight")[1]
    inner = _shape(sd, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight")[0]
    if hidden % inner:
        raise ShapeInferenceError(f"decoder attention width {inner} does not divide {hidden}")
    iou_hidden = _shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight")[0]
    return SamMaskDecoderConfig(
        hidden_size=hidden,
        mlp_dim=_shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_hidden_layers=_count_indexed(sd, "mask_decoder.transformer.layers."),
        num_attention_heads=PUBLISHED_DECODER_HEADS,
        attention_downsample_rate=hidden // inner,
        num_multimask_outputs=_shape(sd, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count_indexed(sd, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=iou_hidden,
    )


def config_from_official_state_dict(sd: Mapping) -> SamConfig:
    """The architecture of an official SAM state dict, read from its tensor shapes.

    Raises ``ShapeInferenceError`` naming the first missing or inconsistent tensor.
    """
    try:
        vision = _vision_config(sd)
        return SamConfig(
            vision_config=vision,
            prompt_encoder_config=_prompt_encoder_config(sd, vision),
            mask_decoder_config=_mask_decoder_config(sd),
        )
    except ShapeInferenceError:
        raise
    except (ValueError, IndexError) as error:  # config validation of impossible sizes
        raise ShapeInferenceError(str(error)) from None
