"""Mask decoder: two-way transformer, upscaling, hypernetwork MLPs and the IoU head.

C = hidden_size, G = image embedding side. Outputs masks at 4G x 4G (256 x 256 for SAM).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sam_core.config import SamMaskDecoderConfig
from sam_core.modeling.common import LayerNorm2d
from sam_core.modeling.cpu_linear import linear
from sam_core.modeling.transformer import SharedImageProjections, TwoWayTransformer


class PreparedImage(NamedTuple):
    """Image side of the decoder input: image + dense prompt as tokens (B or 1, h*w, C), their
    positional encoding (1, h*w, C), the sum of the two, the grid (h, w), and for an image
    shared by many prompts the transformer's first-layer projections of it (or None)."""

    tokens: torch.Tensor
    pe: torch.Tensor
    tokens_with_pe: torch.Tensor
    grid: tuple[int, int]
    shared: Optional[SharedImageProjections] = None


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them: (..., in) -> (..., out)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(self, config: SamMaskDecoderConfig):
        super().__init__()
        c = config.hidden_size
        self.num_multimask_outputs = config.num_multimask_outputs
        self.num_mask_tokens = config.num_multimask_outputs + 1  # token 0 is the single-mask output
        self.transformer = TwoWayTransformer(config)
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4, eps=config.layer_norm_eps),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(c, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for B prompts.

        image_embeddings: (1, C, G, G) shared by all prompts, or (B, C, G, G) one per prompt.
        image_pe: (1, C, G, G). sparse: (B, T, C). dense: (B, C, G, G).
        Returns low-res mask logits (B, M, 4G, 4G) and IoU predictions (B, M), M = 3 with
        ``multimask_output`` else 1.

        PerSAM inputs: ``attention_similarity`` broadcasts to (B, heads, T, G*G);
        ``target_embedding`` to (B, T, C). The Hugging Face layout (1, B, ...) with a leading
        image-batch dim of 1 is accepted too.
        """
        if target_embedding is not None and target_embedding.ndim == 4:
            target_embedding = target_embedding.flatten(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            attention_similarity, target_embedding,
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: logits (B, num_mask_tokens, 4G, 4G), IoU (B, num_mask_tokens)."""
        tokens, image_tokens, grid = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            attention_similarity, target_embedding,
        )
        masks = self.masks_from_tokens(tokens, image_tokens, grid, range(self.num_mask_tokens))
        return masks, self.iou_from_tokens(tokens)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The two-way transformer on B prompts (inputs as in ``forward``).

        Returns the output tokens (B, T, C) (IoU token, mask tokens, prompt tokens), the image
        tokens (B, h*w, C) and the grid (h, w). ``iou_from_tokens`` and ``masks_from_tokens``
        finish the prediction; splitting them lets a caller skip the masks it will not keep.
        """
        image = self.prepare_image(
            image_embeddings, image_pe, dense_prompt_embeddings, prompts=sparse_prompt_embeddings.shape[0]
        )
        return self.run_transformer_on(image, sparse_prompt_embeddings, attention_similarity, target_embedding)

    def prepare_image(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        prompts: int = 1,
    ) -> PreparedImage:
        """The image side of the transformer's input (shapes as in ``forward``), channels-last,
        for ``prompts`` prompts in all.

        Batch 1 when the image and dense prompt are shared by all prompts: the transformer's first
        layer then projects the image once for all of them where that pays for ``prompts``
        (``TwoWayTransformer.shared_projection_pays``), and a caller decoding many prompt batches
        on one image prepares it once for all of them.
        """
        if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
            # The no-mask embedding expanded over the batch: one row stands for all.
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        src = image_embeddings + dense_prompt_embeddings
        tokens = src.flatten(2).transpose(1, 2).contiguous()
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        tokens_with_pe = tokens + pe
        shared = None
        if self.transformer.shared_projection_pays(prompts, tokens, tokens_with_pe):
            shared = self.transformer.project_shared_image(tokens, tokens_with_pe)
        return PreparedImage(tokens, pe, tokens_with_pe, tuple(src.shape[-2:]), shared)

    def run_transformer_on(
        self,
        image: PreparedImage,
        sparse_prompt_embeddings: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``run_transformer`` on an image from ``prepare_image``."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        tokens, image_tokens = self.transformer(
            image.tokens, image.pe, tokens, attention_similarity, target_embedding,
            image_with_pe=image.tokens_with_pe, shared=image.shared,
        )
        return tokens, image_tokens, image.grid

    def iou_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer output tokens (B, T, C) -> predicted IoU of every mask token (B, num_mask_tokens)."""
        return self.iou_prediction_head(tokens[:, 0, :])

    def masks_from_tokens(
        self, tokens: torch.Tensor, image_tokens: torch.Tensor, grid: tuple[int, int], mask_indices: Sequence[int]
    ) -> torch.Tensor:
        """Mask logits from the transformer's outputs.

        tokens (B, T, C) and image_tokens (B, h*w, C) as ``run_transformer`` returns them, grid
        (h, w); ``mask_indices``: which of the num_mask_tokens masks, M of them -> logits
        (B, M, 4h, 4w).

        Same as ``output_upscaling`` on the (B, C, h, w) map followed by the hypernetwork product,
        computed channels-last: a 2x2 stride-2 transposed convolution sends each input pixel to
        its own 2x2 output block, so it is a Linear C -> (2, 2, C') per pixel. That keeps the
        layer norm and GELU passes over contiguous channels and skips the transposes.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        batch = image_tokens.shape[0]
        x = _activate(act1, norm.channels_last(_pixelwise(up1, image_tokens)))  # (B, h*w, 2*2, C/4)
        if act2.approximate == "none":  # exact GELU: inside the product where oneDNN runs it
            x = _pixelwise(up2, x, gelu=True)
        else:
            x = _activate(act2, _pixelwise(up2, x))
        # x: (B, h*w, 2*2, 2*2, C/8): blocks (ki, kj) then (li, lj)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](tokens[:, 1 + i, :]) for i in mask_indices], dim=1
        )  # (B, M, C/8)
        masks = hyper_in @ x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)  # (B, M, h*w*16)
        return _blocks_to_raster(masks, grid)


def _blocks_to_raster(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, M, h*w*16) logits ordered (i, j, ki, kj, li, lj) -> (B, M, 4h, 4w) with output row
    4i + 2ki + li and column 4j + 2kj + lj.

    The last index (lj) stays innermost, so each pair of neighbouring values moves as one
    integer twice their width: a plain 8-d permute of 2-byte values measured ~9x slower. The
    integer view has no gradient, so a tensor that needs one takes the plain permute.
    """
    batch, count = masks.shape[:2]
    h, w = grid
    pair = {2: torch.int32, 4: torch.int64}.get(masks.element_size())
    if pair is None or masks.requires_grad:
        blocks = masks.view(batch, count, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return blocks.reshape(batch, count, 4 * h, 4 * w)
    pairs = masks.view(pair).view(batch, count, h, w, 2, 2, 2)  # (..., ki, kj, li), lj folded in
    raster = pairs.permute(0, 1, 2, 4, 6, 3, 5).reshape(batch, count, 4 * h, 2 * w)
    return raster.view(masks.dtype)


def _activate(act: nn.GELU, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``, in place when no gradient is needed: a fresh buffer of this size costs more in
    page faults than the GELU itself (measured ~3x on CPU)."""
    if x.requires_grad:
        return act(x)
    return F.gelu(x, approximate=act.approximate, out=x)


def _pixelwise(conv: nn.ConvTranspose2d, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """A kernel-2 stride-2 ``ConvTranspose2d`` on channels-last input: (..., C_in) -> (..., 2*2, C_out),
    the new dim being the output block's (row, column) offsets; then an exact GELU when ``gelu``."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)
    out = linear(x, weight, conv.bias.repeat(4), gelu=gelu)
    return out.view(*x.shape[:-1], 4, c_out)
