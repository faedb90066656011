"""Prompted mode: turn boxes and points from an upstream table into masks (the Grounded-SAM path).

Per image the encoder runs once (``predictor.set_image``); all of the image's prompts are then
decoded in batches of ``prompts_per_batch`` through ``SamPredictor.predict_torch``. Prompts of one
batch must share a shape, so they are grouped by (has box, number of clicks, multimask) first; the
output keeps the table's prompt order, one mask per prompt.

``multimask`` chooses how many masks SAM proposes per prompt, as segment-anything advises:
- ``"auto"`` (default): three masks for an ambiguous single click (no box), keeping the one with the
  best predicted IoU; one mask for boxes and multi-click prompts;
- ``"always"`` / ``"never"``: three (best kept) or one mask for every prompt.

Output rows follow ``pipeline.schema`` exactly, with these nullable fields added to each mask struct
(``PROMPTED_OUTPUT_SCHEMA``) so that every mask names its source:

| field                 | type                 | notes                                    |
|-----------------------|----------------------|------------------------------------------|
| `prompt_index`        | int32                | position of the prompt in the image's prompt list |
| `prompt_box`          | list<float64>        | XYXY box prompt, null for point prompts   |
| `prompt_points`       | list<list<float64>>  | clicks [x, y], null for box-only prompts  |
| `prompt_point_labels` | list<int32>          | 1 foreground / 0 background per click     |
| `prompt_label`        | string               | from the table's `labels`, else null      |
| `prompt_score`        | float64              | from the table's `scores`, else null      |

The contract's ``point_coords`` holds the prompt's clicks (empty for boxes), ``crop_box`` the whole
image, ``stability_score`` the same score AMG computes, on this mask's logits.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from pipeline import schema
from pipeline.prompts import ImagePrompts, Prompt, check_prompts_fit
from sam_core.amg.filters import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score

MULTIMASK_MODES = ("auto", "always", "never")
PROMPTS_COLUMN = "prompts_json"  # carried from the listing to the annotator next to each uri

PROMPT_MASK_FIELDS = [
    pa.field("prompt_index", pa.int32()),
    pa.field("prompt_box", pa.list_(pa.float64())),
    pa.field("prompt_points", pa.list_(pa.list_(pa.float64()))),
    pa.field("prompt_point_labels", pa.list_(pa.int32())),
    pa.field("prompt_label", pa.string()),
    pa.field("prompt_score", pa.float64()),
]
PROMPTED_OUTPUT_SCHEMA = schema.output_schema(PROMPT_MASK_FIELDS)


def wants_multimask(prompt: Prompt, mode: str = "auto") -> bool:
    """Whether to ask SAM for three masks for ``prompt`` (then the best by predicted IoU is kept)."""
    if mode not in MULTIMASK_MODES:
        raise ValueError(f"multimask must be one of {MULTIMASK_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return prompt.box_xyxy is None and len(prompt.point_coords or ()) == 1


def _batch_shape(prompt: Prompt, mode: str) -> tuple[bool, int, bool]:
    return prompt.box_xyxy is not None, len(prompt.point_coords or ()), wants_multimask(prompt, mode)


@torch.no_grad()
def segment_prompts(predictor, prompts: list[Prompt], prompts_per_batch: int = 64, multimask: str = "auto",
                    stability_score_offset: float = 1.0) -> list[dict]:
    """Decode ``prompts`` against the image already set on ``predictor``.

    Args:
        predictor: a ``SamPredictor`` (official API) after ``set_image``.
        prompts: in original-image pixels, already checked to lie inside the image.
    Returns:
        One generator-style record per prompt, in ``prompts`` order: ``segmentation`` (H, W) bool
        numpy, ``area``, ``bbox`` XYWH, ``predicted_iou``, ``stability_score``, ``point_coords``,
        ``crop_box`` XYWH, and ``prompt`` (the source Prompt).
    """
    groups: dict[tuple, list[Prompt]] = defaultdict(list)
    for prompt in prompts:
        groups[_batch_shape(prompt, multimask)].append(prompt)
    by_index: dict[int, dict] = {}
    for (has_box, n_points, multi), group in groups.items():
        for start in range(0, len(group), prompts_per_batch):
            chunk = group[start: start + prompts_per_batch]
            records = _decode_chunk(predictor, chunk, has_box, n_points, multi, stability_score_offset)
            by_index.update((p.index, r) for p, r in zip(chunk, records))
    return [by_index[p.index] for p in prompts]


def _decode_chunk(predictor, chunk: list[Prompt], has_box: bool, n_points: int, multimask: bool,
                  stability_score_offset: float) -> list[dict]:
    """One ``predict_torch`` call for B prompts of the same shape -> B records."""
    original_size = predictor.original_size
    device = predictor.device
    boxes = coords = labels = None
    # Transform in float64 numpy, as SamPredictor.predict does, so a prompt lands on exactly the
    # same input-frame coordinates as in the reference's one-prompt-at-a-time path.
    if has_box:
        boxes_xyxy = predictor.transform.apply_boxes(np.array([p.box_xyxy for p in chunk]), original_size)
        boxes = torch.as_tensor(boxes_xyxy, dtype=torch.float, device=device)  # (B, 4)
    if n_points:
        clicks = predictor.transform.apply_coords(np.array([p.point_coords for p in chunk]), original_size)
        coords = torch.as_tensor(clicks, dtype=torch.float, device=device)  # (B, K, 2)
        labels = torch.as_tensor([p.point_labels for p in chunk], dtype=torch.int, device=device)  # (B, K)
    logits, iou, _ = predictor.predict_torch(coords, labels, boxes, multimask_output=multimask, return_logits=True)
    # logits (B, C, H, W), iou (B, C) with C = 3 or 1: keep each prompt's best-scored mask
    best = iou.argmax(dim=1)
    rows = torch.arange(len(chunk), device=best.device)
    logits, iou = logits[rows, best], iou[rows, best]  # (B, H, W), (B,)
    mask_threshold = predictor.model.mask_threshold
    masks = logits > mask_threshold

    stability = stability_score(logits, mask_threshold, stability_score_offset).cpu().tolist()
    boxes_xyxy = masks_to_boxes_xyxy(masks).cpu()
    areas = masks.sum(dim=(-2, -1)).cpu().tolist()
    masks = masks.cpu().numpy()
    height, width = original_size
    return [
        {
            "segmentation": masks[k],
            "area": int(areas[k]),
            "bbox": [float(v) for v in box_xyxy_to_xywh(boxes_xyxy[k])],
            "predicted_iou": float(iou[k]),
            "stability_score": 0.0 if math.isnan(stability[k]) else stability[k],  # NaN: empty mask
            "point_coords": [list(c) for c in prompt.point_coords or ()],
            "crop_box": [0.0, 0.0, float(width), float(height)],
            "prompt": prompt,
        }
        for k, prompt in enumerate(chunk)
    ]


def prompt_fields(prompt: Prompt) -> dict:
    """The ``PROMPT_MASK_FIELDS`` values for a mask made from ``prompt``."""
    return {
        "prompt_index": prompt.index,
        "prompt_box": None if prompt.box_xyxy is None else list(prompt.box_xyxy),
        "prompt_points": None if prompt.point_coords is None else [list(c) for c in prompt.point_coords],
        "prompt_point_labels": None if prompt.point_labels is None else list(prompt.point_labels),
        "prompt_label": prompt.label,
        "prompt_score": prompt.score,
    }


def prompted_row(predictor, uri: str, image: np.ndarray, image_prompts: ImagePrompts,
                 image_sha256: Optional[str] = None, timings: Optional[dict] = None,
                 prompts_per_batch: int = 64, multimask: str = "auto",
                 stability_score_offset: float = 1.0) -> dict:
    """One output row for one decoded image (H, W, 3 uint8 RGB) and its prompts.

    Bad prompts (malformed in the table, or outside this image) make an error row; an image with no
    prompts gets an ok row with no masks and is not encoded.
    """
    height, width = image.shape[:2]
    problem = image_prompts.error or check_prompts_fit(image_prompts.prompts, width, height)
    if problem:
        return schema.error_row(uri, problem, width, height, image_sha256, timings)
    records = []
    if image_prompts.prompts:
        predictor.set_image(image)
        records = segment_prompts(predictor, image_prompts.prompts, prompts_per_batch, multimask,
                                  stability_score_offset)
    row = schema.ok_row(uri, width, height, records, image_sha256, timings)
    for mask, record in zip(row["masks"], records):
        mask.update(prompt_fields(record["prompt"]))
    return row


def missing_image_rows(prompts_by_uri: dict[str, ImagePrompts], listed_uris) -> list[dict]:
    """Error rows for prompted URIs that ``--input`` does not list (URIs must match exactly)."""
    listed = set(listed_uris)
    return [
        schema.error_row(uri, f"prompts given for an image that is not in --input ({len(listed)} images "
                              f"listed; URIs must match exactly, scheme included)")
        for uri in prompts_by_uri
        if uri not in listed
    ]


class PromptedAnnotator:
    """Ray Data actor for prompted mode: loads the model once, then turns decoded rows into output rows.

    ``__call__`` takes a batch with ``uri``, ``image`` (H, W, 3 uint8), ``status``, ``error``,
    ``image_sha256``, ``PROMPTS_COLUMN`` (``ImagePrompts.to_json``) and the timing columns, and
    returns a batch of ``PROMPTED_OUTPUT_SCHEMA`` rows.
    """

    def __init__(self, checkpoint: str, model_type: Optional[str] = None, device: Optional[str] = None,
                 prompts_per_batch: int = 64, multimask: str = "auto", stability_score_offset: float = 1.0):
        from sam_core import SamPredictor, load_sam

        if multimask not in MULTIMASK_MODES:
            raise ValueError(f"multimask must be one of {MULTIMASK_MODES}, got {multimask!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.predictor = SamPredictor(load_sam(checkpoint, model_type=model_type, device=device))
        self.prompts_per_batch = prompts_per_batch
        self.multimask = multimask
        self.stability_score_offset = stability_score_offset

    def __call__(self, batch: dict) -> dict:
        rows = []
        for i, uri in enumerate(batch["uri"]):
            start = time.perf_counter()
            timings = {name: batch[name][i] for name in schema.TIMING_COLUMNS if name in batch}
            sha = batch["image_sha256"][i] if "image_sha256" in batch else None
            if batch["status"][i] != schema.STATUS_OK:
                rows.append(schema.error_row(str(uri), batch["error"][i], image_sha256=sha, timings=timings))
                continue
            image_prompts = ImagePrompts.from_json(str(uri), batch[PROMPTS_COLUMN][i])
            row = prompted_row(self.predictor, str(uri), batch["image"][i], image_prompts, sha, timings,
                               self.prompts_per_batch, self.multimask, self.stability_score_offset)
            row["annotate_s"] = time.perf_counter() - start
            rows.append(row)
        return schema.rows_to_table(rows, PROMPTED_OUTPUT_SCHEMA)
