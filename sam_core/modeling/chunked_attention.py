"""Attention with SAM's decomposed relative-position bias, a block of query rows at a time (CPU).

``F.scaled_dot_product_attention`` with a bias needs the bias materialised whole: for a ViT-B
global block that is heads x N x N = 12 x 4096 x 4096 values, 805 MB per image in fp32, written,
page-faulted and read back on every block. Here the (heads, rows, N) scores of a few query rows
at a time are formed by one product, get their bias added from the two small factors
(``bias_h[i, row_j] + bias_w[i, col_j]``), and are soft-maxed and multiplied by the values while
still in the cache: the same result without the N x N bias. Measured on an AMD EPYC (Zen 4, 2
threads): ~1.9x faster than SDPA in bf16 for a ViT-B global block, about even in fp32.

The rows per block are derived from the processor's last-level cache (half of it for the scores),
so sequences whose whole score matrix fits there (SAM's 14x14 windows) keep SDPA.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch

_FALLBACK_CACHE_BYTES = 32 << 20


def rows_per_block(batch: int, heads: int, n_keys: int, element_size: int) -> Optional[int]:
    """Query rows per block for ``batch`` sequences of ``n_keys`` tokens: None (use SDPA) when one
    sequence's whole (heads, N, N) scores fit in half the last-level cache, else the power of two
    that makes the (batch * heads, rows, N) scores of a block about that size."""
    budget = last_level_cache_bytes() // 2
    if heads * n_keys * n_keys * element_size <= budget:
        return None
    rows = budget // (batch * heads * n_keys * element_size)
    return 1 << max(0, int(rows).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache this process sees (Linux sysfs), else 32 MiB."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=_FALLBACK_CACHE_BYTES)


def rel_pos_attention_by_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor, rows: int
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over a kh x kw key grid, ``rows`` queries at a time.

    q, k, v: (B, heads, N, d) with N = kh * kw; bias_h (B, heads, N, kh) and bias_w (B, heads, N, kw)
    from ``image_encoder.decomposed_rel_pos_factors``: bias[i, j] = bias_h[i, j // kw] + bias_w[i, j % kw].
    Returns (B, heads, N, d). Inference only (in-place updates of the scores).
    """
    b, heads, n, d = q.shape
    kh, kw = bias_h.shape[-1], bias_w.shape[-1]
    q = (q * d**-0.5).reshape(b * heads, n, d)
    keys_t = k.reshape(b * heads, n, d).transpose(1, 2)
    values = v.reshape(b * heads, n, d)
    bias_h = bias_h.reshape(b * heads, n, kh, 1)
    bias_w = bias_w.reshape(b * heads, n, 1, kw)
    out = torch.empty_like(q)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scores = torch.bmm(q[:, start:stop], keys_t)  # (B*heads, rows, N)
        grid = scores.view(b * heads, stop - start, kh, kw)
        grid += bias_h[:, start:stop]
        grid += bias_w[:, start:stop]
        out[:, start:stop] = torch.bmm(scores.softmax(-1), values)
    return out.view(b, heads, n, d)
