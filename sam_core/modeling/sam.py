"""The whole model: image encoder + prompt encoder + mask decoder, with pre/post-processing.

Parameter names equal Meta segment-anything's ``Sam`` state dict, so official ``.pth`` files load
with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sam_core.config import SamConfig
from sam_core.modeling.image_encoder import ImageEncoderViT
from sam_core.modeling.mask_decoder import MaskDecoder
from sam_core.modeling.prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT(config.vision_config)
        self.prompt_encoder = PromptEncoder(config.prompt_encoder_config)
        self.mask_decoder = MaskDecoder(config.mask_decoder_config)
        # Not in the state dict (as in the official model): they are constants, not weights.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the image encoder (fp32, or bf16/fp16 after ``load_sam(dtype=...)``)."""
        return self.image_encoder.patch_embed.proj.weight.dtype

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resized image(s) (B, 3, h, w) or (3, h, w), 0..255 -> normalised, zero-padded
        bottom-right to (B, 3, S, S) in the encoder's dtype. Normalisation runs in fp32."""
        x = (x.float() - self.pixel_mean.float()) / self.pixel_std.float()
        size = self.image_encoder.img_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, size - w, 0, size - h))
        return x.to(self.dtype)

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Low-res logits (B, M, 4G, 4G) -> (B, M, H, W) at the original image size: upscale to
        the padded input, crop the padding, resize to the original."""
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """The official batched interface. Each input dict has ``image`` (3, h, w) already resized
        (longest side = S), ``original_size`` (H, W), and optionally ``point_coords`` (B, N, 2),
        ``point_labels`` (B, N), ``boxes`` (B, 4), ``mask_inputs`` (B, 1, 4G, 4G), all in input
        coordinates. Each output dict has ``masks`` (B, M, H, W) bool, ``iou_predictions``
        (B, M) and ``low_res_logits`` (B, M, 4G, 4G)."""
        images = torch.stack([self.preprocess(record["image"]) for record in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                embedding.unsqueeze(0), self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
            )
            masks = self.postprocess_masks(low_res.float(), record["image"].shape[-2:], record["original_size"])
            outputs.append({
                "masks": masks > self.mask_threshold,
                "iou_predictions": iou.float(),
                "low_res_logits": low_res.float(),
            })
        return outputs


def build_sam(config: Optional[SamConfig] = None) -> Sam:
    """A randomly initialised ``Sam`` for ``config`` (default: ViT-H sizes), in eval mode."""
    return Sam(config if config is not None else SamConfig.preset("vit_h")).eval()
