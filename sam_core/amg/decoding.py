"""From point prompts to full-resolution candidate masks, for one embedded image (or crop).

Calls the model's prompt encoder and mask decoder as the official predictor does, but keeps the
low-resolution logits and only upsamples the masks that pass the predicted-IoU filter: that
filter does not depend on the mask pixels, so skipping the others changes nothing.
"""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

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


def upscale_logits(model, low_res: torch.Tensor, input_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """(N, 4G, 4G) low-res logits -> (N, H, W) float32 logits, bit-identical to
    ``model.postprocess_masks`` (upscale to the padded square input, crop the padding, resize).

    The padding is cropped away anyway, so only the low-res rows and columns that reach the
    unpadded input (plus one for the bilinear neighbour) are upscaled: for a 4:3 photo that is a
    quarter less work. Keeping the integer scale factor keeps every sample position, and so every
    value, identical.
    """
    side = model.image_encoder.img_size
    low_h, low_w = low_res.shape[-2:]
    factor = side // low_h
    if factor * low_h != side or factor * low_w != side:
        return model.postprocess_masks(low_res[:, None], input_size, image_size)[:, 0]
    rows = min(low_h, -(-input_size[0] // factor) + 1)
    cols = min(low_w, -(-input_size[1] // factor) + 1)
    needed = low_res[:, None, :rows, :cols]
    upscaled = F.interpolate(needed, (rows * factor, cols * factor), mode="bilinear", align_corners=False)
    upscaled = upscaled[..., : input_size[0], : input_size[1]]
    return F.interpolate(upscaled, tuple(image_size), mode="bilinear", align_corners=False)[:, 0]


def upscale_logits_as_matmul(
    model, low_res: torch.Tensor, input_size: tuple[int, int], image_size: tuple[int, int], transposed: bool = False
) -> torch.Tensor:
    """``upscale_logits`` as two matrix products, in ``low_res``'s dtype: (N, 4G, 4G) -> (N, H, W),
    or, with ``transposed``, its transpose (N, W, H) at no extra cost (contiguous, for RLE).

    Both bilinear resizes (to the padded input square, then, after cropping the padding, to the
    image) are linear and separable, so their composition along each axis is one fixed
    (low side, image side) matrix: logits = Rows^T @ low_res @ Cols. For the fast (bfloat16) path:
    the products run on the CPU's bf16 matrix units, ~15x faster than the two interpolations for
    ViT-B at 512x384 (equal to them within bf16 rounding, not bit-identical; the fp32 path keeps
    ``upscale_logits``).
    """
    side = model.image_encoder.img_size
    low_h, low_w = low_res.shape[-2:]
    rows = _resize_matrix(low_h, side, input_size[0], image_size[0], low_res.dtype, low_res.device)
    cols = _resize_matrix(low_w, side, input_size[1], image_size[1], low_res.dtype, low_res.device)
    # Low-res rows/columns that only reach the padding have all-zero weights (trimmed): skip them.
    resized_cols = low_res[:, : len(rows), : len(cols)] @ cols
    if transposed:  # (Rows^T X)^T = X^T Rows: the same products, so the same bf16 roundings
        return resized_cols.transpose(1, 2) @ rows
    return rows.T @ resized_cols


@functools.lru_cache(maxsize=16)
def _resize_matrix(
    low: int, side: int, valid: int, out: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One axis of ``upscale_logits`` as a (used low-res positions, out) matrix: bilinear
    (align_corners=False) low -> side, keep the first ``valid``, bilinear -> out. Computed by
    resizing the identity (row i = the response to low-res position i), trimmed after the last
    low-res position with a nonzero weight."""
    basis = torch.eye(low, dtype=torch.float64)[None]  # (1, low, low): one basis vector per row
    padded = F.interpolate(basis, side, mode="linear", align_corners=False)[..., :valid]
    matrix = F.interpolate(padded, out, mode="linear", align_corners=False)[0]  # (low, out)
    used = int(matrix.abs().sum(1).nonzero().max()) + 1
    return matrix[:used].to(device=device, dtype=dtype).contiguous()


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
