"""ViT image encoder: patch embedding, windowed/global attention blocks with decomposed relative
position bias, and a convolutional neck.

Shapes, with S = image_size, P = patch_size, G = S // P (patch grid side), D = hidden_size,
C = output_channels: input (B, 3, S, S) normalised pixels -> output (B, C, G, G).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sam_core.config import SamVisionConfig
from sam_core.modeling.chunked_attention import rel_pos_attention_by_rows, rows_per_block
from sam_core.modeling.common import LayerNorm2d, MLPBlock, activation_class
from sam_core.modeling.cpu_linear import linear


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, D) -> (B * nWindows, window, window, D), zero-padding H and W bottom-right up to a
    multiple of ``window``. Also returns the padded size (Hp, Wp)."""
    b, h, w, d = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, d), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nWindows, window, window, D) -> (B, H, W, D)."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous() if (hp, wp) != (h, w) else x


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Per (query, key) pair along one axis, the embedding of their offset.

    rel_pos: (L, hd) learned table, L = 2 * max(q_size, k_size) - 1 (linearly resampled if not).
    Returns (q_size, k_size, hd).
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None].float(), size=length, mode="linear").to(rel_pos.dtype)[0].t()
    # With unequal sizes, coordinates are scaled to the longer axis so offsets stay comparable.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offsets.long()]


def decomposed_rel_pos_factors(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed relative-position bias, in q's dtype.

    q: (B, heads, qh*qw, hd) unscaled queries. Returns bias_h (B, heads, qh*qw, kh) with
    bias_h[i, r] = q_i . Rh[row_i - r], and bias_w (B, heads, qh*qw, kw) with bias_w[i, c] =
    q_i . Rw[col_i - c]; the bias of key j = (r, c) is their sum.
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    b, heads, _, hd = q.shape
    table_h = relative_position_table(qh, kh, rel_pos_h).to(q.dtype)  # (qh, kh, hd)
    table_w = relative_position_table(qw, kw, rel_pos_w).to(q.dtype)  # (qw, kw, hd)
    grid_q = q.reshape(b, heads, qh, qw, hd)
    # einsum may return permuted strides; the broadcast sum in decomposed_rel_pos_bias would
    # follow them and its reshape would then copy the whole bias once more. The factors are small.
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h).contiguous()  # (B, heads, qh, qw, kh)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w).contiguous()  # (B, heads, qh, qw, kw)
    return bias_h.view(b, heads, qh * qw, kh), bias_w.view(b, heads, qh * qw, kw)


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias from decomposed (height + width) relative positions.

    q: (B, heads, qh*qw, hd) unscaled queries. Returns (B, heads, qh*qw, kh*kw), in q's dtype,
    where bias[i, j] = q_i . Rh[row_i - row_j] + q_i . Rw[col_i - col_j].
    """
    (kh, kw) = k_hw
    b, heads, n, _ = q.shape
    bias_h, bias_w = decomposed_rel_pos_factors(q, rel_pos_h, rel_pos_w, q_hw, k_hw)
    bias = bias_h[..., :, None] + bias_w[..., None, :]
    return bias.reshape(b, heads, n, kh * kw)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, D) grid, with optional decomposed rel-pos bias.

    ``input_size`` is the (H, W) the rel-pos tables are sized for: the window for windowed
    blocks, the whole patch grid for global ones.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        qkv = linear(x, self.qkv.weight, self.qkv.bias).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, hd)
        rows = self._rows_per_block(q)
        if rows is not None:  # a long sequence on a CPU: no (heads, N, N) bias materialised
            bias_h, bias_w = decomposed_rel_pos_factors(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = rel_pos_attention_by_rows(q, k, v, bias_h, bias_w, rows)
        else:
            bias = None
            if self.use_rel_pos:
                bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)).to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # default scale = hd ** -0.5
        out = out.transpose(1, 2).reshape(b, h, w, d)
        return linear(out, self.proj.weight, self.proj.bias)


    def _rows_per_block(self, q: torch.Tensor) -> Optional[int]:
        """Query rows per block for ``rel_pos_attention_by_rows``, or None for SDPA: on a CPU, for
        inference, when the whole rel-pos bias would not fit in the cache."""
        if not self.use_rel_pos or q.device.type != "cpu" or (torch.is_grad_enabled() and q.requires_grad):
            return None
        b, heads, n, _ = q.shape
        return rows_per_block(b, heads, n, q.element_size())


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size == 0`` means global attention."""

    def __init__(self, config: SamVisionConfig, window_size: int):
        super().__init__()
        dim = config.hidden_size
        grid = config.grid_size
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(
            dim,
            config.num_attention_heads,
            config.qkv_bias,
            config.use_rel_pos,
            (window_size, window_size) if window_size else (grid, grid),
        )
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MLPBlock(dim, config.resolved_mlp_dim, activation_class(config.hidden_act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) -> (B, H, W, D)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            h, w = x.shape[1:3]
            windows, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """(B, 3, S, S) -> (B, G, G, D) by a stride-P convolution."""

    def __init__(self, config: SamVisionConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT backbone. Forward: (B, 3, S, S) normalised, padded image -> (B, C, G, G)."""

    def __init__(self, config: SamVisionConfig):
        super().__init__()
        self.config = config
        self.img_size = config.image_size
        self.patch_embed = PatchEmbed(config)
        self.pos_embed: Optional[nn.Parameter] = None
        if config.use_abs_pos:
            grid = config.grid_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.hidden_size))
        global_layers = set(config.global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(config, window_size=0 if i in global_layers else config.window_size)
            for i in range(config.num_hidden_layers)
        )
        out = config.output_channels
        self.neck = nn.Sequential(
            nn.Conv2d(config.hidden_size, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
