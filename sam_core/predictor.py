"""SamPredictor: encode an image once, then prompt it many times (segment-anything's API).

Extra over the official predictor: ``set_images`` encodes several images in ONE encoder batch and
returns an ``ImageEmbedding`` per image; ``use_embedding`` makes one of them the current image.
Outputs are fp32 whatever the model's compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from sam_core.modeling.sam import Sam
from sam_core.transforms import ResizeLongestSide


@dataclass
class ImageEmbedding:
    """One encoded image: ``features`` (1, C, G, G); ``original_size`` (H, W) of the image as given;
    ``input_size`` (h, w) after resizing its longest side to the model's image size."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class SamPredictor:
    def __init__(self, sam_model: Sam):
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: Optional[torch.Tensor] = None
        self.original_size: Optional[tuple[int, int]] = None
        self.input_size: Optional[tuple[int, int]] = None

    def _to_model_input(self, image: np.ndarray, image_format: str) -> torch.Tensor:
        """HxWx3 uint8 -> resized (1, 3, h, w) float tensor on the model's device."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(image))
        return torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode one HxWx3 uint8 image (RGB unless ``image_format="BGR"``)."""
        self.set_torch_image(self._to_model_input(image, image_format), image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Encode a (1, 3, h, w) image already resized by ``self.transform`` (longest side = S)."""
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3:
            raise ValueError(f"expected a (1, 3, h, w) tensor, got {tuple(transformed_image.shape)}")
        if max(transformed_image.shape[2:]) != self.model.image_encoder.img_size:
            raise ValueError(f"the longest side must be {self.model.image_encoder.img_size}")
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(int(s) for s in transformed_image.shape[-2:])
        self.features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.is_image_set = True

    @torch.no_grad()
    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> list[ImageEmbedding]:
        """Encode several HxWx3 uint8 images in one encoder batch. The first becomes current."""
        if len(images) == 0:
            return []
        inputs = [self._to_model_input(image, image_format) for image in images]
        batch = torch.cat([self.model.preprocess(x) for x in inputs])
        features = self.model.image_encoder(batch)
        embeddings = [
            ImageEmbedding(features[i : i + 1], tuple(image.shape[:2]), tuple(x.shape[-2:]))
            for i, (image, x) in enumerate(zip(images, inputs))
        ]
        self.use_embedding(embeddings[0])
        return embeddings

    def use_embedding(self, embedding: ImageEmbedding) -> None:
        """Make ``embedding`` the current image; ``predict`` then works as after ``set_image``."""
        self.features = embedding.features
        self.original_size = tuple(embedding.original_size)
        self.input_size = tuple(embedding.input_size)
        self.is_image_set = True

    def current_embedding(self) -> ImageEmbedding:
        """The current image as an ``ImageEmbedding`` (to cache and restore with ``use_embedding``)."""
        self._require_image()
        return ImageEmbedding(self.features, self.original_size, self.input_size)

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt on the current image, in original-image pixels.

        point_coords (N, 2) XY with point_labels (N,) (1 fg, 0 bg); box (4,) XYXY; mask_input
        (1, 4G, 4G) low-res logits from a previous call. Returns masks (M, H, W) bool (float logits
        with ``return_logits``), iou_predictions (M,), low_res_logits (M, 4G, 4G); M = 3 or 1.
        """
        self._require_image()
        coords_torch = labels_torch = box_torch = mask_torch = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied with point_coords")
            coords = self.transform.apply_coords(point_coords, self.original_size)
            coords_torch = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            boxes = self.transform.apply_boxes(box, self.original_size)
            if boxes.shape[0] != 1:
                raise ValueError(f"predict takes one box, got {boxes.shape[0]}; use predict_torch for many")
            box_torch = torch.as_tensor(boxes, dtype=torch.float, device=self.device)
        if mask_input is not None:
            mask_torch = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_torch, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low_res[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts at once, coordinates already in the resized frame (``transform.apply_coords_torch``).

        point_coords (B, N, 2), point_labels (B, N), boxes (B, 4) XYXY, mask_input (B, 1, 4G, 4G).
        Returns masks (B, M, H, W), iou_predictions (B, M), low_res_logits (B, M, 4G, 4G), fp32.
        ``attention_similarity`` / ``target_embedding`` are the PerSAM decoder inputs.
        """
        self._require_image()
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
        )
        low_res, iou = low_res.float(), iou.float()
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding (1, C, G, G)."""
        self._require_image()
        return self.features
