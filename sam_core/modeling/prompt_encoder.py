"""Prompt encoder: points, boxes and low-res masks -> sparse and dense prompt embeddings.

C = hidden_size (256 for published SAM), G = image embedding side (image_size // patch_size).
Coordinates are pixels of the resized, padded model input (longest side = image_size), XY order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from sam_core.config import SamPromptEncoderConfig
from sam_core.modeling.common import LayerNorm2d, activation_class

POSITIVE, NEGATIVE, PADDING = 1, 0, -1


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding: xy in [0, 1]^2 -> [sin(2pi (2xy-1) G), cos(...)].

    ``positional_encoding_gaussian_matrix`` (2, C/2) is a fixed buffer stored in checkpoints.
    Encodings are computed in fp32 (phases reach tens of radians, too many for bf16) and returned
    in the requested dtype.
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords01: torch.Tensor) -> torch.Tensor:
        """(..., 2) in [0, 1] -> (..., C) fp32."""
        phases = (2 * coords01.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        phases = 2 * math.pi * phases
        return torch.cat([torch.sin(phases), torch.cos(phases)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an (h, w) grid: (C, h, w) fp32."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(..., 2) pixel XY in an image of (h, w) -> (..., C) fp32."""
        h, w = image_size
        scaled = coords_xy.float() / torch.tensor([w, h], dtype=torch.float32, device=coords_xy.device)
        return self._encode(scaled)


class PromptEncoder(nn.Module):
    """Embeds prompts for the mask decoder.

    forward(points=(coords (B, N, 2), labels (B, N)), boxes (B, 4) XYXY, masks (B, 1, 4G, 4G))
    -> sparse (B, N', C) and dense (B, C, G, G) embeddings. Labels: 1 foreground, 0 background,
    -1 padding (ignored).
    """

    def __init__(self, config: SamPromptEncoderConfig):
        super().__init__()
        c = config.hidden_size
        g = config.image_embedding_size
        self.embed_dim = c
        self.image_embedding_size = (g, g)
        self.input_image_size = (config.image_size, config.image_size)
        self.mask_input_size = (4 * g, 4 * g)
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        # 0: background point, 1: foreground point, 2: box top-left corner, 3: box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, c) for _ in range(config.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, c)
        act = activation_class(config.hidden_act)
        hidden = config.mask_input_channels
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, hidden // 4, kernel_size=2, stride=2),
            LayerNorm2d(hidden // 4, eps=config.layer_norm_eps),
            act(),
            nn.Conv2d(hidden // 4, hidden, kernel_size=2, stride=2),
            LayerNorm2d(hidden, eps=config.layer_norm_eps),
            act(),
            nn.Conv2d(hidden, c, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, c)

    @property
    def _dtype(self) -> torch.dtype:
        return self.no_mask_embed.weight.dtype

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, C, G, G)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self._dtype)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2), (B, N) -> (B, N + pad, C)."""
        coords = coords + 0.5  # pixel index -> pixel centre
        if pad:
            # Without a box, the decoder was trained with one extra "not a point" token.
            coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
            labels = torch.cat([labels, torch.full_like(labels[:, :1], PADDING)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size).to(self._dtype)
        is_label = [(labels == value)[..., None] for value in (PADDING, NEGATIVE, POSITIVE)]
        emb = torch.where(is_label[0], self.not_a_point_embed.weight, emb)
        emb = torch.where(is_label[1], emb + self.point_embeddings[NEGATIVE].weight, emb)
        emb = torch.where(is_label[2], emb + self.point_embeddings[POSITIVE].weight, emb)
        return emb

    def _embed_boxes(self, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """(B, 4) -> (B, 2, C): one token per corner."""
        corners = (boxes_xyxy + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self._dtype)
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_type

    def forward(
        self,
        points: Optional[tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch_size(points, boxes, masks)
        device = self.no_mask_embed.weight.device
        sparse = [torch.empty((batch, 0, self.embed_dim), dtype=self._dtype, device=device)]
        if points is not None:
            coords, labels = points
            sparse.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        sparse_embeddings = torch.cat(sparse, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks.to(self._dtype))
        else:
            g_h, g_w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, g_h, g_w)
        return sparse_embeddings, dense

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1
