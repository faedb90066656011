"""Prompted mode: turn boxes and points from an upstream table into masks (the Grounded-SAM path).

Per image the encoder runs once (``predictor.set_image``); all of the image's prompts are then
decoded in batches of ``prompts_per_batch`` through ``SamPredictor.predict_torch``. Prompts of one
batch must share a shape, so they are grouped by (has box, number of clicks, multimask) first; the
output keeps the table's prompt order, one mask per prompt.

``multimask`` chooses how many masks SAM proposes per prompt, as segment-anything advises:
- ``"auto"`` (default): three masks for an ambiguous single click (no box), keeping the one with the
  best predicted IoU; one mask for boxes and multi-click prompts;
- ``"always"`` / ``"never"``: three (best kept) or one mask for every prompt.

Output rows follow ``pipeline.output.schema`` exactly, with these nullable fields added to each mask struct
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

import json
import math
import time
from collections import defaultdict
from functools import lru_cache
import functools
from typing import Callable, List, Optional, Set, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import torch

from pipeline.config import MULTIMASK_MODES, AnnotateConfig
from pipeline.inputs.read import ItemSelector, plan_input_uris
from pipeline.inputs.units import KIND_PROMPT_ORPHANS, ORPHAN_REASON, Plan, Unit, committed_ranges, source_hash
from pipeline.modes.base import Mode
from pipeline.modes.prompts import ImagePrompts, Prompt, check_prompts_fit, read_prompts
from pipeline.modes.stage import (CONSUMED_COLUMNS, answered_row, failure_reason, image_sha256, load_model,
                                  pick_device, timings, with_passthrough)
from pipeline.output import schema
from sam_core.amg.filters import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score
from sam_core.amg.rle import masks_to_rle_arrays, rle_to_coco

PROMPTS_COLUMN = "prompts_json"  # carried from the listing to the annotator next to each uri
# predict_torch upsamples every proposed mask to the full image: bound that tensor (1 GiB of fp32).
MAX_LOGITS_PER_CHUNK = 2**28

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
        One generator-style record per prompt, in ``prompts`` order: ``segmentation`` COCO RLE
        ``{"size": [H, W], "counts": str}``, ``area``, ``bbox`` XYWH, ``predicted_iou``,
        ``stability_score``, ``point_coords``, ``crop_box`` XYWH, and ``prompt`` (the source Prompt).
    """
    groups: dict[tuple, list[Prompt]] = defaultdict(list)
    for prompt in prompts:
        groups[_batch_shape(prompt, multimask)].append(prompt)
    by_index: dict[int, dict] = {}
    height, width = predictor.original_size
    for (has_box, n_points, multi), group in groups.items():
        step = prompts_per_chunk(prompts_per_batch, 3 if multi else 1, height, width)
        for start in range(0, len(group), step):
            chunk = group[start: start + step]
            records = _decode_chunk(predictor, chunk, has_box, n_points, multi, stability_score_offset)
            by_index.update((p.index, r) for p, r in zip(chunk, records))
    return [by_index[p.index] for p in prompts]


def prompts_per_chunk(prompts_per_batch: int, masks_per_prompt: int, height: int, width: int,
                      max_logits: int = MAX_LOGITS_PER_CHUNK) -> int:
    """How many prompts one ``predict_torch`` call may take: at most ``prompts_per_batch``, and few
    enough that its full-resolution logits (prompts x masks x H x W floats) stay under ``max_logits``."""
    return max(1, min(prompts_per_batch, max_logits // (masks_per_prompt * height * width)))


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
    rles = masks_to_rle_arrays(masks)  # run lengths found on the device; only they cross to the host
    height, width = original_size
    return [
        {
            "segmentation": rle_to_coco(rles[k]),
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


def same_image_key(uri: str) -> str:
    """What two URIs of one image share: the URI itself, except that ``file://`` is optional."""
    return uri[len("file://"):] if uri.startswith("file://") else uri



def missing_image_uris(prompted_uris, listed_uris) -> list[str]:
    """The prompted URIs that ``listed_uris`` (streamed, any length) does not hold (see ``same_image_key``)."""
    waiting = {same_image_key(uri): uri for uri in prompted_uris}
    for uri in listed_uris:
        if uri is not None:
            waiting.pop(same_image_key(uri), None)
    return sorted(waiting.values())


# --- wiring into pipeline.run (through pipeline.modes.PromptedMode) ----------------------------

@lru_cache(maxsize=4)
def _read_prompts_cached(uri: str, storage_options_json: str) -> dict[str, ImagePrompts]:
    return read_prompts(uri, json.loads(storage_options_json))


@lru_cache(maxsize=4)
def _prompts_by_key(uri: str, storage_options_json: str) -> dict[str, ImagePrompts]:
    return {same_image_key(u): p for u, p in _read_prompts_cached(uri, storage_options_json).items()}


def load_prompts(config) -> dict[str, ImagePrompts]:
    """The run's prompts table grouped per image (keyed by the table's URIs); read once per process."""
    return _read_prompts_cached(config.prompts, json.dumps(config.storage_options or {}, sort_keys=True))


def select_prompted(prompts_uri: str, storage_options_json: str, answered: frozenset, uri: str) -> tuple[bool, dict]:
    """The read stage's selector: only prompted images get a row, their prompts travel with them.

    Images in ``--input`` without prompts are not read or annotated, nor those in ``answered``
    (they already have their "not in --input" row). The table is read once per worker process.
    """
    found = _prompts_by_key(prompts_uri, storage_options_json).get(same_image_key(uri))
    if found is None or uri in answered:
        return False, {}
    return True, {PROMPTS_COLUMN: found.to_json()}


def orphan_prompts_unit(config, plan, committed: set):
    """The unit of error rows for prompted images that ``--input`` does not hold, or None.

    None under ``--limit`` (a truncated listing cannot tell a missing image from one past the
    limit, and an error row would stop a later full run from annotating it), and once such a unit
    is committed: its error rows are final, as error rows are.
    """
    if config.limit is not None or plan.shards:  # (finding a shard's images means reading it whole)
        return None
    fs, path = fsspec.core.url_to_fs(config.prompts, **(config.storage_options or {}))
    key = fs.unstrip_protocol(path)
    if (KIND_PROMPT_ORPHANS, source_hash(key)) in committed_ranges(committed):
        return None
    missing = missing_image_uris(load_prompts(config), plan_input_uris(plan, config.storage_options or {}))
    if not missing:
        return None
    return Unit(KIND_PROMPT_ORPHANS, config.prompts, key, 0, len(missing), len(missing), tuple(missing))


class PromptedMode(Mode):
    """Masks from the boxes and points of a prompts table (the Grounded-SAM recipe)."""

    name = "prompted"
    row_schema = PROMPTED_OUTPUT_SCHEMA

    def __init__(self):
        # Prompted images that already have their "not in --input" error row (final, as error
        # rows are): should one turn up in the input later, it gets no second row.
        self.answered: Tuple[str, ...] = ()

    def prepare(self, config: AnnotateConfig) -> None:
        load_prompts(config)  # a missing table, or one without a uri column, stops the run here

    def selector(self, config: AnnotateConfig) -> Optional[ItemSelector]:
        return functools.partial(select_prompted, config.prompts,
                                 json.dumps(config.storage_options or {}, sort_keys=True), frozenset(self.answered))

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        """``config.multimask`` (``--multimask``: "auto", "always", "never") picks the multimask choice."""
        return PromptedAnnotator, {"config": config.to_dict(), "multimask": config.multimask}

    def extra_units(self, config: AnnotateConfig, plan: Plan, committed: Set[str], output) -> List[Unit]:
        self.answered = tuple(output.uris_of_units(KIND_PROMPT_ORPHANS, committed))
        unit = orphan_prompts_unit(config, plan, committed)
        return [] if unit is None else [unit]


class PromptedAnnotator:
    """Ray Data actor for prompted mode: loads the model once, then turns decoded rows into output rows.

    Input batch (numpy format): ``uri``, ``image`` (H, W, 3 uint8), ``status``, ``error``,
    ``image_sha256``, ``PROMPTS_COLUMN`` (``ImagePrompts.to_json``), optional ``read_s``/``decode_s``.
    Output: a ``PROMPTED_OUTPUT_SCHEMA`` table, one row per input row. ``config`` is
    ``AnnotateConfig.to_dict()``; its ``points_per_batch`` is the number of prompts decoded at once.
    """

    def __init__(self, config: dict, multimask: str = "auto", predictor_factory: Optional[Callable] = None):
        if multimask not in MULTIMASK_MODES:
            raise ValueError(f"multimask must be one of {MULTIMASK_MODES}, got {multimask!r}")
        self.config = AnnotateConfig.from_dict(config)
        self.multimask = multimask
        if predictor_factory is None:
            from sam_core import SamPredictor

            self.predictor = SamPredictor(load_model(self.config, pick_device()))
        else:
            self.predictor = predictor_factory(self.config)

    def __call__(self, batch: dict) -> pa.Table:
        table = schema.rows_to_table([self._row(batch, i) for i in range(len(batch["uri"]))],
                                     PROMPTED_OUTPUT_SCHEMA)
        return with_passthrough(table, batch, CONSUMED_COLUMNS | {PROMPTS_COLUMN})

    def _row(self, batch: dict, i: int) -> dict:
        uri, sha = str(batch["uri"][i]), image_sha256(batch, i)
        answered = answered_row(batch, i, uri)
        if answered is not None:
            return answered
        start = time.perf_counter()
        image = batch["image"][i]
        try:
            row = prompted_row(self.predictor, uri, image, ImagePrompts.from_json(uri, batch[PROMPTS_COLUMN][i]),
                               sha, timings(batch, i), self.config.points_per_batch, self.multimask,
                               self.config.stability_score_offset)
        except Exception as exc:  # one image's failure must not cost the others their rows
            row = schema.error_row(uri, failure_reason(exc), image.shape[1], image.shape[0], sha, timings(batch, i))
        row["annotate_s"] = time.perf_counter() - start
        return row
