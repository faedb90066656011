"""AutomaticMaskGenerator: segment-anything's automatic mask generation, same masks, less work.

Orchestration only; the steps live in their own modules (grid, decoding, filters, nms, rle,
cleanup). Differences from the official generator that do not change its output:
- the encoder runs once per batch of images/crops (``generate_batch``), not once per crop;
- only masks that pass the predicted-IoU filter are upsampled to full resolution, in chunks
  whose size bounds memory;
- run-length encoding is vectorised over a batch of masks;
- on a CPU, glibc is asked to keep freed heap memory (``heap.keep_freed_heap_memory``,
  process-wide): the decoder's large temporaries otherwise page-fault afresh on every call.
``fast=True`` additionally runs the encoder under bfloat16 autocast and the prompt encoder and
mask decoder as bfloat16 copies: masks then differ slightly from the fp32 ones.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import torch

from sam_core.amg.candidates import MaskCandidates
from sam_core.amg.cleanup import clean_small_regions
from sam_core.amg.decoding import bfloat16_decoder, decode_points, uncrop_masks, upscale_logits_as_matmul
from sam_core.amg.filters import (
    box_area,
    box_xyxy_to_xywh,
    is_box_near_crop_edge,
    masks_to_boxes_xyxy,
    stability_score,
    uncrop_boxes_xyxy,
)
from sam_core.amg.grid import build_all_layer_point_grids, generate_crop_boxes
from sam_core.amg.heap import keep_freed_heap_memory
from sam_core.amg.nms import box_nms
from sam_core.amg.presets import preset_parameters
from sam_core.amg.tuning import bfloat16_pays, decoder_batch_size, resize_block_size, upscale_chunk_size
from sam_core.amg.rle import rle_area, rle_to_coco, rle_to_mask, transposed_masks_to_rle_arrays, with_list_counts

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class AutomaticMaskGenerator:
    """Generate masks for a whole image from a grid of point prompts.

    Parameters, defaults and outputs are those of segment-anything's ``SamAutomaticMaskGenerator``
    (see its documentation); extras, keyword-only:
        fast: encoder under bfloat16 autocast, decoder with bfloat16 weights (faster, near-identical
            masks), where bfloat16 is faster than float32 on this device (``tuning.bfloat16_pays``:
            measured on a CPU); elsewhere ``fast`` changes nothing. ``uses_bfloat16`` tells which.
        encoder_batch_size: how many images/crops the encoder takes at once in ``generate_batch``.
        decoder_batch_size: prompts per decoder call within each ``points_per_batch`` batch
            (default: ``points_per_batch`` on accelerators, on a CPU the count measured fastest
            there, ``tuning.decoder_batch_size``).
    """

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[list[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        fast: bool = False,
        encoder_batch_size: int = 4,
        decoder_batch_size: Optional[int] = None,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {output_mode!r}; expected one of {OUTPUT_MODES}.")
        if point_grids is None:
            point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(f"point_grids needs one grid per crop layer: {crop_n_layers + 1}, got {len(point_grids)}.")
        from sam_core.predictor import SamPredictor

        self.predictor = SamPredictor(model)
        self.point_grids = [np.asarray(grid) for grid in point_grids]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.fast = fast
        self.encoder_batch_size = max(1, int(encoder_batch_size))
        self.decoder_batch_size = decoder_batch_size
        self._fast_decoder = None  # bfloat16 copy of the prompt encoder and decoder, made on first use
        if self.predictor.device.type == "cpu":
            keep_freed_heap_memory()

    @classmethod
    def preset(cls, name: str, model, **overrides) -> "AutomaticMaskGenerator":
        """A generator with the settings of a named preset (``sam_core.amg.presets``; ``"sa1b"``:
        the recipe that generated SA-1B), ``overrides`` taking precedence."""
        return cls(model, **{**preset_parameters(name), **overrides})

    @property
    def model(self):
        return self.predictor.model

    @property
    def uses_bfloat16(self) -> bool:
        """Whether this generator computes in bfloat16: ``fast`` was asked for and bf16 is faster
        than float32 on the model's device (measured once per process on a CPU)."""
        return self.fast and bfloat16_pays(self.predictor.device.type, torch.get_num_threads())

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for one HxWx3 uint8 RGB image, as records (see ``generate_batch``)."""
        return self.generate_batch([image])[0]

    @torch.no_grad()
    def generate_batch(self, images: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Masks for several HxWx3 uint8 RGB images; the encoder sees them (and their crops) in batches.

        Each record has ``segmentation`` (HxW bool array, or RLE dict per ``output_mode``),
        ``area`` (int), ``bbox`` (XYWH), ``predicted_iou``, ``point_coords`` ([[x, y]]),
        ``stability_score`` and ``crop_box`` (XYWH).
        """
        jobs = []  # (image index, crop box, layer) for every crop of every image
        for index, image in enumerate(images):
            boxes, layers = generate_crop_boxes(image.shape[:2], self.crop_n_layers, self.crop_overlap_ratio)
            jobs.extend((index, box, layer) for box, layer in zip(boxes, layers))

        per_image: list[list[MaskCandidates]] = [[] for _ in images]
        for start in range(0, len(jobs), self.encoder_batch_size):
            batch = jobs[start : start + self.encoder_batch_size]
            crops = [images[i][box[1] : box[3], box[0] : box[2], :] for i, box, _ in batch]
            with self._autocast():
                embeddings = self.predictor.set_images(crops)
            for (index, box, layer), embedding in zip(batch, embeddings):
                per_image[index].append(self._process_crop(embedding, box, layer, images[index].shape[:2]))
            del embeddings
        self.predictor.reset_image()
        return [self._finish(parts, len(parts)) for parts in per_image]

    def _bf16_decoder(self):
        if self._fast_decoder is None:
            self._fast_decoder = bfloat16_decoder(self.model)
        return self._fast_decoder

    def _autocast(self):
        if not self.uses_bfloat16:
            return nullcontext()
        return torch.autocast(self.predictor.device.type, dtype=torch.bfloat16)

    def _finish(self, crops: list[MaskCandidates], n_crops: int) -> list[dict[str, Any]]:
        """Merge the crops of one image, clean up, and write records."""
        data = MaskCandidates.concat(crops)
        if n_crops > 1:
            # Prefer masks from smaller crops.
            scores = 1 / box_area(data.crop_boxes)
            data = data.select(box_nms(data.boxes.float(), scores, self.crop_nms_thresh))
        if self.min_mask_region_area > 0:
            data = clean_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        return self._records(data)

    def _records(self, data: MaskCandidates) -> list[dict[str, Any]]:
        if self.output_mode == "coco_rle":
            segmentations = [rle_to_coco(rle) for rle in data.rles]
        elif self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in data.rles]
        else:
            segmentations = [with_list_counts(rle) for rle in data.rles]
        return [
            {
                "segmentation": segmentation,
                "area": rle_area(rle),
                "bbox": box_xyxy_to_xywh(box),
                "predicted_iou": iou,
                "point_coords": [point],
                "stability_score": stability,
                "crop_box": box_xyxy_to_xywh(crop_box),
            }
            for segmentation, rle, box, iou, point, stability, crop_box in zip(
                segmentations,
                data.rles,
                data.boxes.tolist(),
                data.iou_preds.tolist(),
                data.points.tolist(),
                data.stability_scores.tolist(),
                data.crop_boxes.tolist(),
            )
        ]

    def _process_crop(self, embedding, crop_box: list[int], layer: int, image_size: tuple[int, int]) -> MaskCandidates:
        crop_h, crop_w = embedding.original_size
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]])
        parts = [
            self._process_batch(embedding, points[start : start + self.points_per_batch], crop_box, image_size)
            for start in range(0, len(points), self.points_per_batch)
        ]
        data = MaskCandidates.concat(parts)
        # Remove duplicates within this crop, then move to image coordinates.
        data = data.select(box_nms(data.boxes.float(), data.iou_preds, self.box_nms_thresh))
        data.boxes = uncrop_boxes_xyxy(data.boxes, crop_box)
        data.points = data.points + np.array([crop_box[:2]])
        data.crop_boxes = torch.tensor([crop_box] * len(data), dtype=torch.int64).reshape(-1, 4)
        return data

    def _process_batch(
        self, embedding, points: np.ndarray, crop_box: list[int], image_size: tuple[int, int]
    ) -> MaskCandidates:
        """Candidates from one batch of prompts (points in crop pixels), boxes still in crop coordinates."""
        crop_size = tuple(embedding.original_size)
        coords = torch.as_tensor(
            self.predictor.transform.apply_coords(points, crop_size), device=self.predictor.device
        )
        decoder, features = self.model, embedding.features
        if self.uses_bfloat16:
            decoder, features = self._bf16_decoder(), features.to(torch.bfloat16)
        step = self.decoder_batch_size or decoder_batch_size(
            decoder, coords.device, self.points_per_batch, dtype=features.dtype
        )
        # The predicted-IoU filter is applied inside decode_points, before masks are upscaled.
        low_res, iou_preds, keep = decode_points(
            decoder, features, coords, self.pred_iou_thresh, step, logits_dtype=features.dtype
        )
        iou_preds = iou_preds[keep]
        points = np.repeat(points, 3, axis=0)[keep.cpu().numpy()]  # three masks per prompt

        chunk = upscale_chunk_size(self.model.image_encoder.img_size, image_size)
        parts = []
        for start in range(0, len(low_res), chunk):
            rows = slice(start, start + chunk)
            parts.append(
                self._full_res_candidates(
                    low_res[rows], iou_preds[rows], points[rows], embedding.input_size, crop_size, crop_box, image_size
                )
            )
        return MaskCandidates.concat(parts)

    def _full_res_candidates(self, low_res, iou_preds, points, input_size, crop_size, crop_box, image_size):
        """Upsample, score stability, binarise, box, drop crop-edge masks, encode: one chunk.

        The masks are handled transposed, (N, W, H): RLE runs down the columns, and the
        matrix-product resize yields that layout directly.
        """
        threshold = self.model.mask_threshold
        block = resize_block_size(
            low_res.device, low_res.dtype, low_res.shape[-1], self.model.image_encoder.img_size, torch.get_num_threads()
        )
        # In the decoder's dtype: bf16 products on the fast path, fp32 (within rounding of the
        # official two interpolations) otherwise.
        logits_t = upscale_logits_as_matmul(self.model, low_res, input_size, crop_size, transposed=True, block=block)
        stability = stability_score(logits_t, threshold, self.stability_score_offset)
        keep = torch.ones_like(stability, dtype=torch.bool)
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
        masks_t = (logits_t if bool(keep.all()) else logits_t[keep]) > threshold  # no copy when all are kept
        del logits_t
        boxes = masks_to_boxes_xyxy(masks_t)[:, [1, 0, 3, 2]]  # back from transposed (y, x) order
        height, width = image_size
        not_cut = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
        keep_index = keep.nonzero(as_tuple=True)[0][not_cut]
        masks_t, boxes = masks_t[not_cut], boxes[not_cut]
        return MaskCandidates(
            iou_preds=iou_preds[keep_index].cpu(),
            stability_scores=stability[keep_index].cpu(),
            points=points[keep_index.cpu().numpy()],
            boxes=boxes.cpu(),
            crop_boxes=torch.zeros(len(boxes), 4, dtype=torch.int64),
            rles=transposed_masks_to_rle_arrays(uncrop_masks(masks_t, crop_box, image_size, transposed=True)),
        )
