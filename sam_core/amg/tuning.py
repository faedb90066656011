"""The automatic mask generator's per-machine choices, measured where it runs.

Which settings are fastest depends on the processor (vector units, caches, bf16 support, which
library has kernels for it), so none is a constant found on one CPU:

- ``decoder_batch_size``: prompts per mask-decoder call on a CPU. The decoder's time goes to
  passes over (prompts, h*w, C) tensors; too few prompts per call leaves the matrix products
  short, too many spills the caches. Timed on the model's own decoder with synthetic inputs,
  once per process for each decoder shape, dtype and thread count (~0.5-1 s for SAM's decoder
  on 2 CPU cores). Accelerators take the whole ``points_per_batch``.
- ``bfloat16_pays``: whether ``fast=True`` (bfloat16) is faster than float32 here. On CPUs
  without bf16 arithmetic bf16 is emulated and slower, so ``fast`` there stays in float32.
- ``resize_block_size``: output positions per banded product of the low-res -> image resize
  (``decoding.upscale_logits_as_matmul``), timed once per process, device and dtype (~0.1 s).
- ``upscale_chunk_size``: masks upsampled at once, derived from the image size so that the
  float32 intermediates stay within a memory budget.

Sub-batch sizes change only the float rounding of the decoder's outputs, not what it computes;
pass ``decoder_batch_size=`` to the generator to pin one (e.g. for bit-for-bit repeatable runs
across processes).
"""
from __future__ import annotations

import functools

import torch

from sam_core.timing import best_times

# Prompts per decoder call tried on a CPU: doubling from 1 while the largest one is the fastest.
_FIRST_CANDIDATES = (1, 2, 4, 8)
_measured_batch_sizes: dict[tuple, int] = {}


def decoder_batch_size(model, device: torch.device, requested: int, dtype: torch.dtype = torch.float32) -> int:
    """Prompts per decoder call for ``model`` (a Sam, or its bf16 decoder copy) computing in
    ``dtype``: ``requested`` on accelerators, on a CPU the count measured fastest per prompt here
    (at most ``requested``)."""
    if device.type != "cpu":
        return requested
    key = (_decoder_signature(model), dtype, torch.get_num_threads(), requested)
    if key not in _measured_batch_sizes:
        _measured_batch_sizes[key] = _fastest_batch_size(model, dtype, requested)
    return _measured_batch_sizes[key]


def _decoder_signature(model) -> tuple:
    """What the decoder's speed depends on: its parameters' shapes and the image grid."""
    shapes = tuple(tuple(p.shape) for p in model.mask_decoder.parameters())
    return shapes, tuple(model.prompt_encoder.image_embedding_size)


@torch.no_grad()
def _fastest_batch_size(model, dtype: torch.dtype, requested: int) -> int:
    from sam_core.amg.decoding import decode_prepared

    decoder, prompt_encoder = model.mask_decoder, model.prompt_encoder
    generator = torch.Generator().manual_seed(0)
    channels = decoder.iou_token.weight.shape[1]
    features = torch.randn(1, channels, *prompt_encoder.image_embedding_size, generator=generator).to(dtype)
    most = max(c for c in (*_FIRST_CANDIDATES, requested) if c <= max(requested, 1))
    coords = torch.rand(4 * most, 2, generator=generator) * prompt_encoder.input_image_size[0]
    image, sparse = _prepare(model, features, coords)

    per_prompt: dict[int, float] = {}
    candidates = [c for c in _FIRST_CANDIDATES if c <= requested] or [requested]
    while True:
        times = best_times(
            {c: functools.partial(decode_prepared, decoder, image, sparse[:c], 0.0, dtype) for c in candidates},
            rounds=2,
        )
        per_prompt.update({c: t / c for c, t in times.items()})
        best = min(per_prompt, key=per_prompt.__getitem__)
        larger = 2 * best
        if best != max(per_prompt) or larger > requested or larger > len(sparse):
            return best
        candidates = [larger]  # the largest size tried was the fastest: try the next one up


def _prepare(model, features: torch.Tensor, coords: torch.Tensor):
    labels = torch.ones(len(coords), 1, dtype=torch.int)
    sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
    image = model.mask_decoder.prepare_image(
        features, model.prompt_encoder.get_dense_pe(), dense[:1], prompts=len(coords)
    )
    return image, sparse


@functools.lru_cache(maxsize=None)
def bfloat16_pays(device_type: str, threads: int) -> bool:
    """Whether bfloat16 matrix products beat float32 ones on this device (``fast=True`` uses bf16
    only where they do). CUDA: where the GPU supports bf16. CPU: a linear of the decoder's
    per-pixel size timed in both dtypes through ``cpu_linear.linear`` (~50 ms, once)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return True  # other accelerators: autocast decides what runs in bf16
    from sam_core.modeling.cpu_linear import linear

    generator = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(4096, 256, generator=generator), torch.randn(256, 256, generator=generator)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    with torch.no_grad():
        times = best_times({"fp32": lambda: linear(x32, w32), "bf16": lambda: linear(x16, w16)})
    return times["bf16"] < times["fp32"]


_RESIZE_BLOCKS = (None, 16, 32, 64, 128)  # None: one dense product per axis


@functools.lru_cache(maxsize=None)
def resize_block_size(device: torch.device, dtype: torch.dtype, low_side: int, input_side: int, threads: int):
    """The fastest ``block`` of ``upscale_logits_as_matmul`` here, timed on 8 random low-res
    masks of ``low_side`` resized through a padded ``input_side`` square to half that side (a
    typical photo's size)."""
    from types import SimpleNamespace

    from sam_core.amg.decoding import upscale_logits_as_matmul

    geometry = SimpleNamespace(image_encoder=SimpleNamespace(img_size=input_side))
    generator = torch.Generator().manual_seed(0)
    low_res = torch.randn(8, low_side, low_side, generator=generator).to(device=device, dtype=dtype)
    size = (input_side, input_side)
    out = (input_side // 2, input_side // 2)
    times = best_times({
        block: functools.partial(upscale_logits_as_matmul, geometry, low_res, size, out, True, block)
        for block in _RESIZE_BLOCKS
    })
    return min(times, key=times.__getitem__)


def upscale_chunk_size(input_side: int, image_size: tuple[int, int], budget_bytes: int = 256 << 20) -> int:
    """How many masks to upsample at once so the float32 intermediates stay within ``budget_bytes``.

    Each mask needs the padded input square (input_side**2) and the image-size result.
    """
    per_mask = 4 * (input_side * input_side + 2 * image_size[0] * image_size[1])
    return max(1, budget_bytes // per_mask)
