"""From point prompts to full-resolution candidate masks, for one embedded image (or crop).

Calls the model's prompt encoder and mask decoder as the official predictor does, but keeps the
low-resolution logits and only upsamples the masks that pass the predicted-IoU filter: that
filter does not depend on the mask pixels, so skipping the others changes nothing.
"""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


def decode_points(
    model,
    features: torch.Tensor,
    coords_input: torch.Tensor,
    pred_iou_thresh: float = 0.0,
    step: int = 0,
    logits_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multimask prediction for one foreground point per prompt, masks only where kept.

    Args:
        features: (1, C, G, G) image embedding.
        coords_input: (B, 2) points (x, y) in the resized-input frame.
        pred_iou_thresh: masks whose predicted IoU is not above it are dropped (none when 0).
        step: prompts per decoder call (all at once when 0); the image side is prepared once.
        logits_dtype: dtype of the returned logits (the fast path keeps the bf16 decoder's own).
    Returns:
        low-res logits (K, 4G, 4G) ``logits_dtype`` of the K kept masks, IoU predictions (B * 3,) float32
        of all masks, and ``keep`` (B * 3,) bool; the three masks of a prompt consecutive.

    The predicted IoU comes from the transformer's IoU token, before any mask is upscaled, so
    the upscaling and hypernetwork product (about half the decoder's time) run only for prompts
    with a kept mask: the same logits as the full decoder for the masks kept.
    """
    decoder = model.mask_decoder
    labels = torch.ones(len(coords_input), 1, dtype=torch.int, device=coords_input.device)
    sparse, dense = model.prompt_encoder(points=(coords_input[:, None, :], labels), boxes=None, masks=None)
    # With no mask prompt the dense embedding is the same for every prompt: prepare the image
    # side once, with batch 1, for all prompts.
    image = decoder.prepare_image(features, model.prompt_encoder.get_dense_pe(), dense[:1], prompts=len(coords_input))
    step = step or len(coords_input)
    parts = [
        decode_prepared(decoder, image, sparse[start : start + step], pred_iou_thresh, logits_dtype)
        for start in range(0, len(coords_input), step)
    ]
    return tuple(torch.cat(part) for part in zip(*parts))


def decode_prepared(decoder, image, sparse: torch.Tensor, pred_iou_thresh: float, logits_dtype: torch.dtype):
    """``decode_points`` for one decoder call: ``decoder`` a MaskDecoder, ``image`` from its
    ``prepare_image``, (B, T, C) sparse prompt embeddings."""
    tokens, image_tokens, grid = decoder.run_transformer_on(image, sparse)
    multimask = range(1, decoder.num_mask_tokens)  # token 0 is the single-mask output
    iou = decoder.iou_from_tokens(tokens)[:, 1:].float()  # (B, 3)
    keep = iou > pred_iou_thresh if pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
    prompts = keep.any(1)
    if not bool(prompts.any()):
        side = 4 * grid[0], 4 * grid[1]
        return torch.empty(0, *side, dtype=logits_dtype, device=iou.device), iou.flatten(), keep.flatten()
    if not bool(prompts.all()):
        tokens, image_tokens = tokens[prompts], image_tokens[prompts]
    low_res = decoder.masks_from_tokens(tokens, image_tokens, grid, multimask)  # (B', 3, 4G, 4G)
    kept = keep[prompts]
    low_res = low_res.flatten(0, 1) if bool(kept.all()) else low_res[kept]  # no copy when all are kept
    return low_res.to(logits_dtype), iou.flatten(), keep.flatten()


def bfloat16_decoder(model):
    """The prompt encoder and mask decoder of ``model`` with bfloat16 weights (copies; the model
    itself is left as it is), for ``decode_points``.

    Under autocast only the matmuls run in bfloat16 and the decoder's many element-wise passes
    stay float32; with bfloat16 weights every intermediate is bfloat16, which measured about twice
    as fast as float32 per prompt on a CPU with AMX (autocast: ~1.2x).
    """
    if model.mask_decoder.iou_token.weight.dtype == torch.bfloat16:
        return model
    return SimpleNamespace(
        prompt_encoder=copy.deepcopy(model.prompt_encoder).to(torch.bfloat16),
        mask_decoder=copy.deepcopy(model.mask_decoder).to(torch.bfloat16),
    )


def upscale_logits_as_matmul(
    model,
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    transposed: bool = False,
    block: Optional[int] = None,
) -> torch.Tensor:
    """``Sam.postprocess_masks`` (upscale to the padded input square, crop the padding, resize to
    the image) as matrix products, in ``low_res``'s dtype: (N, 4G, 4G) low-res logits -> (N, H, W),
    or, with ``transposed``, its transpose (N, W, H), contiguous (for RLE).

    Both bilinear resizes (to the padded input square, then, after cropping the padding, to the
    image) are linear and separable, so their composition along each axis is one fixed
    (low side, image side) matrix: logits = Rows^T @ low_res @ Cols, equal to the two
    interpolations within float rounding (not bit-identical). Each output pixel depends on only
    a few low-res ones, so the matrices are banded: with ``block``, each axis is multiplied in
    blocks of ``block`` output positions against just the low-res positions they use (a tenth of
    the dense products' work for a 2x upscale; ``tuning.resize_block_size`` measures the block
    size fastest on a device). None: one dense product per axis.
    """
    side = model.image_encoder.img_size
    low_h, low_w = low_res.shape[-2:]
    rows = _resize_bands(low_h, side, input_size[0], image_size[0], low_res.dtype, low_res.device, block)
    cols = _resize_bands(low_w, side, input_size[1], image_size[1], low_res.dtype, low_res.device, block)
    # Low-res rows/columns that only reach the padding have all-zero weights (trimmed): skip them.
    resized_cols = _banded_product(low_res[:, : rows.used, : cols.used], cols)  # (N, h, W)
    logits_t = _banded_product(resized_cols.transpose(1, 2), rows)  # (N, W, H) = (Rows^T X Cols)^T
    return logits_t if transposed else logits_t.transpose(1, 2)


class _Bands(NamedTuple):
    """A banded (used, out) resize matrix as column blocks: (first row, end row, block matrix)
    for consecutive blocks of output columns; rows outside a block's span are all zero there."""

    used: int
    blocks: tuple[tuple[int, int, torch.Tensor], ...]


def _banded_product(x: torch.Tensor, bands: _Bands) -> torch.Tensor:
    """(N, m, used) @ the banded (used, out) matrix -> (N, m, out), contiguous."""
    if len(bands.blocks) == 1:
        first, end, matrix = bands.blocks[0]
        return x[..., first:end] @ matrix
    return torch.cat([x[..., first:end] @ matrix for first, end, matrix in bands.blocks], dim=-1)


@functools.lru_cache(maxsize=32)
def _resize_bands(
    low: int, side: int, valid: int, out: int, dtype: torch.dtype, device: torch.device, block: Optional[int]
) -> _Bands:
    """``_resize_matrix`` cut into blocks of ``block`` output columns (one block when None)."""
    matrix = _resize_matrix(low, side, valid, out)
    blocks = []
    for start in range(0, out, block or out):
        columns = matrix[:, start : start + (block or out)]
        nonzero = columns.abs().sum(1).nonzero()
        first, end = int(nonzero.min()), int(nonzero.max()) + 1
        blocks.append((first, end, columns[first:end].to(device=device, dtype=dtype).contiguous()))
    return _Bands(len(matrix), tuple(blocks))


def _resize_matrix(low: int, side: int, valid: int, out: int) -> torch.Tensor:
    """One axis of ``Sam.postprocess_masks`` as a (used low-res positions, out) float64 matrix: bilinear
    (align_corners=False) low -> side, keep the first ``valid``, bilinear -> out. Computed by
    resizing the identity (row i = the response to low-res position i), trimmed after the last
    low-res position with a nonzero weight."""
    basis = torch.eye(low, dtype=torch.float64)[None]  # (1, low, low): one basis vector per row
    padded = F.interpolate(basis, side, mode="linear", align_corners=False)[..., :valid]
    matrix = F.interpolate(padded, out, mode="linear", align_corners=False)[0]  # (low, out)
    used = int(matrix.abs().sum(1).nonzero().max()) + 1
    return matrix[:used]


def uncrop_masks(
    masks: torch.Tensor, crop_box: list[int], image_size: tuple[int, int], transposed: bool = False
) -> torch.Tensor:
    """Place (N, h, w) crop masks into (N, H, W) zero masks of the full image; with
    ``transposed``, (N, w, h) masks into (N, W, H)."""
    height, width = image_size
    x0, y0, x1, y1 = crop_box
    if transposed:
        (height, width), (x0, y0, x1, y1) = (width, height), (y0, x0, y1, x1)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return masks
    full = torch.zeros(len(masks), height, width, dtype=torch.bool, device=masks.device)
    full[:, y0:y1, x0:x1] = masks
    return full
