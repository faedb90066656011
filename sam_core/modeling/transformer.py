"""Two-way transformer of the mask decoder: prompt tokens and image tokens attend to each other.

Shapes: tokens (B, T, C), image (B, C, h, w) flattened internally to (B, h*w, C).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sam_core.config import SamMaskDecoderConfig
from sam_core.modeling.common import MLPBlock, activation_class


class SharedImageProjections(NamedTuple):
    """The first layer's per-head projections of an image shared by every prompt: token->image
    keys (H, d, N) and values (H, N, d), image->token queries (H, d, N); N image tokens, H heads
    of width d (``TwoWayTransformer.project_shared_image``)."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor


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

    def _per_head(self, weight: torch.Tensor) -> torch.Tensor:
        """A projection weight (internal_dim, C) as (heads, head_dim, C)."""
        return weight.view(self.num_heads, -1, weight.shape[-1])

    def tokens_to_image(
        self,
        tokens: torch.Tensor,
        image_keys: torch.Tensor,
        image_values: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
        image_keys_pe: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Same as ``forward(tokens, image_keys + image_keys_pe, image_values, attention_bias)`` for
        few queries.

        tokens (B, T, C); image_keys and image_values (B or 1, N, C) with T << N, image_keys_pe
        (B or 1, N, C) or None -> (B, T, C).

        Low rank: instead of projecting all N image tokens (per prompt), the key projection is
        folded into the T queries and the value projection applied after the weighted sum:
        q_h . (Wk_h x + bk_h) = (Wk_h^T q_h) . x + q_h . bk_h, whose last term is the same for every
        key and so cancels in the softmax; sum_n p_n (Wv_h x_n + bv_h) = Wv_h (sum_n p_n x_n) + bv_h
        because the probabilities sum to 1.
        """
        batch, n_tokens, channels = tokens.shape
        heads = self.num_heads
        q = self._split_heads(self.q_proj(tokens))  # (B, H, T, d)
        q = q * q.shape[-1] ** -0.5
        q_image = (q @ self._per_head(self.k_proj.weight)).reshape(batch, heads * n_tokens, channels)
        scores = _scores_against_image(q_image, image_keys, image_keys_pe)  # (B, H*T, N)
        if attention_bias is not None:
            scores = (scores.view(batch, heads, n_tokens, -1) + attention_bias.to(scores.dtype)).flatten(1, 2)
        probs = scores.softmax(-1)
        if image_values.shape[0] == 1:
            mixed = (probs.reshape(-1, probs.shape[-1]) @ image_values[0]).view(batch, heads, n_tokens, channels)
        else:
            mixed = (probs @ image_values).view(batch, heads, n_tokens, channels)  # (B, H, T, C)
        head_dim = self.internal_dim // heads
        out = mixed @ self._per_head(self.v_proj.weight).transpose(1, 2) + self.v_proj.bias.view(heads, 1, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n_tokens, self.internal_dim))

    def image_to_tokens(
        self,
        image_queries: torch.Tensor,
        tokens_k: torch.Tensor,
        tokens_v: torch.Tensor,
        residual: torch.Tensor,
        image_queries_pe: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``residual + forward(image_queries + image_queries_pe, tokens_k, tokens_v)`` for few keys,
        in low rank.

        image_queries and residual (B or 1, N, C), image_queries_pe (B or 1, N, C) or None; tokens_k
        and tokens_v (B, T, C) -> (B, N, C).

        With T << N the query and output projections of the N image tokens are folded into the
        tokens: logits x . (Wq_h^T k_h) + bq_h . k_h, and out = sum_h P_h (v_h Wo_h^T) + bo, so the
        per-prompt work over the image is two (N, C) x (C, H*T) products. The output bias is split
        over the heads' values (each head's probabilities sum to 1) so that the residual add is
        the accumulate of the last product.
        """
        batch, n_tokens, channels = tokens_k.shape
        heads = self.num_heads
        k = self._split_heads(self.k_proj(tokens_k))  # (B, H, T, d)
        k = k * k.shape[-1] ** -0.5
        v = self._split_heads(self.v_proj(tokens_v))  # (B, H, T, d)
        head_dim = k.shape[-1]
        image_side_k = (k @ self._per_head(self.q_proj.weight)).reshape(batch, heads * n_tokens, channels)
        k_bias = (k @ self.q_proj.bias.view(heads, head_dim, 1)).reshape(batch, heads * n_tokens, 1)
        # Logits laid out (B, H, T, N): the softmax over the T tokens then runs along the long,
        # contiguous N axis (a softmax over a last dim of ~7 is several times slower).
        scores = _scores_against_image(image_side_k, image_queries, image_queries_pe, k_bias)
        probs = scores.view(batch, heads, n_tokens, -1).softmax(2).view(batch, heads * n_tokens, -1)
        out_proj_t = self.out_proj.weight.T.reshape(heads, head_dim, channels)  # (H, d, C)
        values = v @ out_proj_t + self.out_proj.bias / heads  # (B, H, T, C)
        return torch.baddbmm(residual, probs.transpose(1, 2), values.reshape(batch, heads * n_tokens, channels))


    def project_shared_image(
        self, image_keys: torch.Tensor, image_values: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-head projections of an image shared by all prompts, for the ``*_projected_image`` methods.

        image_keys (1, N, C) -> keys (H, d, N), projected by ``k_proj`` when ``image_values`` (1, N, C)
        is given (token->image: then values (H, N, d) by ``v_proj``), else by ``q_proj``
        (image->token: the image tokens are the queries; values None).
        """
        heads, n_image = self.num_heads, image_keys.shape[1]
        if image_values is None:
            return self.q_proj(image_keys[0]).view(n_image, heads, -1).permute(1, 2, 0).contiguous(), None
        keys = self.k_proj(image_keys[0]).view(n_image, heads, -1).permute(1, 2, 0).contiguous()
        values = self.v_proj(image_values[0]).view(n_image, heads, -1).transpose(0, 1).contiguous()
        return keys, values

    def tokens_to_projected_image(
        self,
        tokens: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``forward(tokens, image_keys, image_values, attention_bias)`` for an image shared by every
        prompt, its keys (H, d, N) and values (H, N, d) projected once (``project_shared_image``):
        tokens (B, T, C) -> (B, T, C).

        Per prompt this is (T, d) x (d, N) per head: d = C / (heads * downsample) values per image
        token instead of the C of the low-rank ``tokens_to_image``.
        """
        batch, n_tokens, _ = tokens.shape
        heads, head_dim = self.num_heads, self.internal_dim // self.num_heads
        q = self.q_proj(tokens) * head_dim**-0.5
        q = q.view(batch * n_tokens, heads, head_dim).transpose(0, 1)  # (H, B*T, d)
        scores = torch.bmm(q, keys)  # (H, B*T, N)
        if attention_bias is not None:
            bias = attention_bias.to(scores.dtype).expand(batch, heads, n_tokens, -1).transpose(0, 1)
            scores = (scores.view(heads, batch, n_tokens, -1) + bias).flatten(1, 2)
        mixed = torch.bmm(scores.softmax(-1), values)  # (H, B*T, d)
        return self.out_proj(mixed.transpose(0, 1).reshape(batch, n_tokens, self.internal_dim))

    def projected_image_to_tokens(
        self, queries: torch.Tensor, tokens_k: torch.Tensor, tokens_v: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """``image_to_tokens`` for image queries shared by every prompt, projected once
        (``project_shared_image``: (H, d, N)); tokens_k and tokens_v (B, T, C), residual (B or 1, N, C)
        -> (B, N, C).

        The logits cost (T, d) x (d, N) per head and prompt instead of the low-rank (T, C) x (C, N);
        the output keeps the low-rank form (values folded into the output projection).
        """
        batch, n_tokens, channels = tokens_k.shape
        heads = self.num_heads
        k = self._split_heads(self.k_proj(tokens_k))  # (B, H, T, d)
        k = k * k.shape[-1] ** -0.5
        v = self._split_heads(self.v_proj(tokens_v))
        if torch.is_grad_enabled() and (k.requires_grad or queries.requires_grad):
            logits = torch.stack([torch.bmm(k[b], queries) for b in range(batch)])
        else:  # each prompt's (H, T, N) straight into place: no stacked copy
            logits = k.new_empty(batch, heads, n_tokens, queries.shape[-1])
            for b in range(batch):
                torch.bmm(k[b], queries, out=logits[b])
        probs = logits.softmax(2).view(batch, heads * n_tokens, -1)  # softmax over the T tokens, N contiguous
        head_dim = k.shape[-1]
        out_proj_t = self.out_proj.weight.T.reshape(heads, head_dim, channels)
        values = v @ out_proj_t + self.out_proj.bias / heads  # (B, H, T, C)
        return torch.baddbmm(residual, probs.transpose(1, 2), values.reshape(batch, heads * n_tokens, channels))


def _scores_against_image(
    queries: torch.Tensor,
    image: torch.Tensor,
    image_pe: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """queries (B, Q, C) . (image + image_pe) per image token, plus bias (B, Q, 1) -> (B, Q, N);
    image and image_pe (B or 1, N, C).

    A shared image (batch 1) is one GEMM for all prompts. A per-prompt image is never added to
    a shared PE: queries . pe is one shared GEMM, accumulated into the per-prompt product,
    which reads the (B, N, C) image once instead of writing and re-reading a sum of that size.
    """
    batch, n_queries, channels = queries.shape
    if image_pe is not None and (image.shape[0] == 1 or image_pe.shape[0] > 1):
        image, image_pe = image + image_pe, None
    flat = queries.reshape(-1, channels)
    if image.shape[0] == 1:
        shared, image = image[0], None
    elif image_pe is not None:
        shared = image_pe[0]
    else:
        shared = None
    if shared is not None:
        scores = flat @ shared.T if bias is None else torch.addmm(bias.reshape(-1, 1), flat, shared.T)
        scores = scores.view(batch, n_queries, -1)
        return scores if image is None else torch.baddbmm(scores, queries, image.transpose(1, 2))
    if bias is None:
        return queries @ image.transpose(1, 2)
    return torch.baddbmm(bias, queries, image.transpose(1, 2))


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
        keys_with_pe: Optional[torch.Tensor] = None,
        shared: Optional[SharedImageProjections] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, T, C), keys (B or 1, HW, C) and their positional encodings -> updated pair.
        ``keys_with_pe``: keys + key_pe, when the caller has it already. ``shared``: this layer's
        projections of keys shared by every prompt (``project_shared_image``), used instead of the
        per-prompt low-rank forms."""
        if self.skip_first_layer_pe:
            # The first layer replaces (not adds to) its input: the tokens already are their own PE.
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        if shared is not None:
            attended = self.cross_attn_token_to_image.tokens_to_projected_image(
                queries + query_pe, shared.keys, shared.values, attention_similarity
            )
        else:
            # Both cross-attentions see the image tokens plus their PE: one sum serves both.
            if keys_with_pe is None:
                keys_with_pe = keys + key_pe
            attended = self.cross_attn_token_to_image.tokens_to_image(
                queries + query_pe, keys_with_pe, keys, attention_similarity
            )
        queries = self.norm2(queries + attended)
        queries = self.norm3(queries + self.mlp(queries))

        if shared is not None:
            updated = self.cross_attn_image_to_token.projected_image_to_tokens(
                shared.queries, queries + query_pe, queries, residual=keys
            )
        else:
            updated = self.cross_attn_image_to_token.image_to_tokens(
                keys_with_pe, queries + query_pe, queries, residual=keys
            )
        return queries, self.norm4(updated)

    def project_shared_image(self, keys: torch.Tensor, keys_with_pe: torch.Tensor) -> SharedImageProjections:
        """This layer's projections of image tokens shared by every prompt: keys and keys_with_pe (1, N, C)."""
        image_keys, image_values = self.cross_attn_token_to_image.project_shared_image(keys_with_pe, keys)
        image_queries, _ = self.cross_attn_image_to_token.project_shared_image(keys_with_pe)
        return SharedImageProjections(image_keys, image_values, image_queries)


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
        image_with_pe: Optional[torch.Tensor] = None,
        shared: Optional[SharedImageProjections] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding and image_pe (B or 1, C, h, w), point_embedding (B, T, C)
        -> (tokens (B, T, C), image tokens (B, h*w, C)).

        The image and its PE may also come as tokens (B or 1, h*w, C), with ``image_with_pe``
        their sum, and ``shared`` its ``project_shared_image``: a caller decoding many prompt
        batches on one image prepares them once.

        An image batch of 1 is shared by all B prompts until the first image update, so the
        first layer projects the image tokens once for all prompts (``project_shared_image``)
        when that is fewer operations than its per-prompt low-rank forms (same result).

        PerSAM inputs, as the Hugging Face model takes them: ``attention_similarity`` is added to
        the token->image logits of every layer; ``target_embedding`` (broadcast to (B, T, C)) is
        added to the tokens before every layer, and, as there, also to the token positional
        encoding (the reference adds it in place to the tensor that doubles as the PE).
        """
        keys = image_embedding.flatten(2).transpose(1, 2) if image_embedding.ndim == 4 else image_embedding
        key_pe = image_pe.flatten(2).transpose(1, 2) if image_pe.ndim == 4 else image_pe
        if image_with_pe is None and keys.shape[0] == key_pe.shape[0] == 1:
            image_with_pe = keys + key_pe
        if shared is None and self.shared_projection_pays(point_embedding.shape[0], keys, image_with_pe):
            shared = self.project_shared_image(keys, image_with_pe)
        query_pe = point_embedding
        if target_embedding is not None:
            query_pe = point_embedding + target_embedding
        queries = query_pe
        for i, layer in enumerate(self.layers):
            if target_embedding is not None and i > 0:
                queries = queries + target_embedding
            first = i == 0
            queries, keys = layer(
                queries, keys, query_pe, key_pe, attention_similarity,
                image_with_pe if first else None, shared if first else None,
            )
        attended = self.final_attn_token_to_image.tokens_to_image(queries + query_pe, keys, keys, image_keys_pe=key_pe)
        queries = self.norm_final_attn(queries + attended)
        return queries, keys.expand(queries.shape[0], -1, -1)

    def project_shared_image(self, image_tokens: torch.Tensor, image_with_pe: torch.Tensor) -> SharedImageProjections:
        """The first layer's projections of image tokens and their sum with the PE (1, h*w, C),
        shared by every prompt."""
        return self.layers[0].project_shared_image(image_tokens, image_with_pe)

    def shared_projection_pays(
        self, prompts: int, image_tokens: torch.Tensor, image_with_pe: Optional[torch.Tensor], tokens_per_prompt: int = 7
    ) -> bool:
        """Whether projecting a shared image once (three (N, C) x (C, C / rate) products) costs
        fewer multiply-adds than the per-prompt low-rank forms it replaces for ``prompts`` prompts
        (about three (heads * T, C) x (C, N) products each, T ~ ``tokens_per_prompt``)."""
        if image_with_pe is None or image_tokens.shape[0] != 1 or image_with_pe.shape[0] != 1:
            return False
        attention = self.layers[0].cross_attn_token_to_image
        per_prompt = 3 * attention.num_heads * tokens_per_prompt
        return prompts * per_prompt > 3 * attention.internal_dim
