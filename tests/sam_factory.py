"""Tiny random-weight SAM models and real photos for tests.

``make_official_sam`` builds Meta's ``segment_anything`` model (the oracle) at a tiny size and
perturbs EVERY parameter, so that zero-initialised tensors (abs/rel position embeddings, biases)
cannot hide a bug in our port. ``tiny_config`` returns the matching ``sam_core.SamConfig``.

Usage in any test::

    from tests.sam_factory import make_official_sam, save_official_checkpoint, real_photos
    ref = make_official_sam(seed=0)
    ckpt = save_official_checkpoint(ref, tmp_path / "tiny.pth")
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

# Small enough for a CPU test, but every code path is live: the 16x16 patch grid does not divide
# into 6x6 windows (window padding), layer 1 is global (rel-pos tables of two sizes), and the
# decoder has a downsampled cross-attention.
TINY_SIZES = dict(
    embed_dim=32,
    depth=2,
    num_heads=2,
    global_attn_indexes=(1,),
    window_size=6,
    image_size=256,
    patch_size=16,
    mlp_ratio=4.0,
    prompt_embed_dim=32,
    mask_in_chans=8,
    decoder_depth=2,
    decoder_heads=8,  # the published value; shapes cannot tell head counts, so load_sam assumes it
    decoder_mlp_dim=64,
    iou_head_hidden_dim=32,
)

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def _sizes(overrides: dict) -> dict:
    unknown = set(overrides) - set(TINY_SIZES)
    if unknown:
        raise TypeError(f"unknown size(s) {sorted(unknown)}; known: {sorted(TINY_SIZES)}")
    return {**TINY_SIZES, **overrides}


def perturb_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add N(0, std) noise to every parameter in place (deterministic per seed); returns model."""
    generator = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)
    return model


def make_official_sam(seed: int = 0, **sizes):
    """A tiny ``segment_anything.modeling.Sam`` in eval mode with every parameter perturbed.

    ``sizes`` override keys of ``TINY_SIZES``.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    s = _sizes(sizes)
    grid = s["image_size"] // s["patch_size"]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=s["depth"],
                embed_dim=s["embed_dim"],
                img_size=s["image_size"],
                mlp_ratio=s["mlp_ratio"],
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=s["num_heads"],
                patch_size=s["patch_size"],
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=tuple(s["global_attn_indexes"]),
                window_size=s["window_size"],
                out_chans=s["prompt_embed_dim"],
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=s["prompt_embed_dim"],
                image_embedding_size=(grid, grid),
                input_image_size=(s["image_size"], s["image_size"]),
                mask_in_chans=s["mask_in_chans"],
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=s["decoder_depth"],
                    embedding_dim=s["prompt_embed_dim"],
                    mlp_dim=s["decoder_mlp_dim"],
                    num_heads=s["decoder_heads"],
                ),
                transformer_dim=s["prompt_embed_dim"],
                iou_head_depth=3,
                iou_head_hidden_dim=s["iou_head_hidden_dim"],
            ),
            pixel_mean=PIXEL_MEAN,
            pixel_std=PIXEL_STD,
        )
    perturb_parameters(sam, seed)
    return sam.eval()


def tiny_config(**sizes):
    """Our ``SamConfig`` describing ``make_official_sam(**sizes)``."""
    from sam_core.config import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    s = _sizes(sizes)
    return SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=s["embed_dim"],
            output_channels=s["prompt_embed_dim"],
            num_hidden_layers=s["depth"],
            num_attention_heads=s["num_heads"],
            image_size=s["image_size"],
            patch_size=s["patch_size"],
            mlp_ratio=s["mlp_ratio"],
            window_size=s["window_size"],
            global_attn_indexes=tuple(s["global_attn_indexes"]),
            num_pos_feats=s["prompt_embed_dim"] // 2,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=s["prompt_embed_dim"],
            image_size=s["image_size"],
            patch_size=s["patch_size"],
            mask_input_channels=s["mask_in_chans"],
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=s["prompt_embed_dim"],
            mlp_dim=s["decoder_mlp_dim"],
            num_hidden_layers=s["decoder_depth"],
            num_attention_heads=s["decoder_heads"],
            iou_head_hidden_dim=s["iou_head_hidden_dim"],
        ),
    )


def save_official_checkpoint(model: torch.nn.Module, path) -> Path:
    """Write ``model.state_dict()`` as a ``.pth`` exactly as segment-anything publishes them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def real_photos() -> list[np.ndarray]:
    """Three real, non-square RGB uint8 photos (HxWx3) from scikit-image's bundled data.

    Sizes (200x300 landscape, 230x135 portrait, 90x135 small landscape) cover both downscaling
    and upscaling to a 256 model input, and both orientations.
    """
    import skimage.data

    coffee = _resize(skimage.data.coffee(), 200, 300)
    astronaut_portrait = _resize(np.ascontiguousarray(skimage.data.astronaut()[:, 100:400]), 230, 135)
    chelsea = _resize(skimage.data.chelsea(), 90, 135)
    return [coffee, astronaut_portrait, chelsea]
