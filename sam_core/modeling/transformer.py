"""Two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other.

Shapes: tokens (B, T, C), image (B, C, h, w) flattened internally to (B, h*w, C).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sam_core.config import SamMaskDecoderConfig
from sam_core.modeling.common import MLPBlock, activation_class


class Attention(nn.Module):
    """Multi-head attention whose inner width may be downsampled: C -> C / downsample_rate.

    ``attention_bias`` (optional) is added to the attention logits; it must broadcast to
    (B, heads, Nq, Nk). That is how PerSAM's ``attention_similarity`` enters.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the attention width {self.internal_dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C). Any of them may have batch 1 and is then
        projected once and shared by the whole batch."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        batch = max(q.shape[0], k.shape[0], v.shape[0])
        q, k, v = (t.expand(batch, -1, -1, -1) for t in (q, k, v))
        if attention_bias is not None:
            attention_bias = attention_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(self, config: SamMaskDecoderConfig, skip_first_layer_pe: bool):
        super().__init__()
        dim, heads, rate = config.hidden_size, config.num_attention_heads, config.attention_downsample_rate
        self.self_attn = Attention(dim, heads)
        # The published decoder uses nn.LayerNorm's default eps (1e-5) in its transformer.
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample_rate=rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, config.mlp_dim, activation_class(config.hidden_act))
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample_rate=rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, T, C), keys (B, HW, C) and their positional encodings -> updated pair."""
        if self.skip_first_layer_pe:
            # The first layer replaces (not adds to) its input: the tokens already are their own PE.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys, attention_similarity))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of ``TwoWayAttentionBlock`` plus a final token->image attention."""

    def __init__(self, config: SamMaskDecoderConfig):
        super().__init__()
        dim = config.hidden_size
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(config, skip_first_layer_pe=(i == 0)) for i in range(config.num_hidden_layers)
        )
        self.final_attn_token_to_image = Attention(
            dim, config.num_attention_heads, downsample_rate=config.attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding and image_pe (B or 1, C, h, w), point_embedding (B, T, C)
        -> (tokens (B, T, C), image tokens (B, h*w, C)).

        An image batch of 1 is shared by all B prompts until the first image update, so the
        first layer projects the image tokens once instead of B times (same result).

        PerSAM inputs, as the Hugging Face model takes them: ``attention_similarity`` is added to
        the token->image logits of every layer; ``target_embedding`` (broadcast to (B, T, C)) is
        added to the tokens before every layer, and, as there, also to the token positional
        encoding (the reference adds it in place to the tensor that doubles as the PE).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        query_pe = point_embedding
        if target_embedding is not None:
            query_pe = point_embedding + target_embedding
        queries = query_pe
        for i, layer in enumerate(self.layers):
            if target_embedding is not None and i > 0:
                queries = queries + target_embedding
            queries, keys = layer(queries, keys, query_pe, key_pe, attention_similarity)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys.expand(queries.shape[0], -1, -1)
