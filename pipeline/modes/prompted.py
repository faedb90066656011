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

import functools
import json
import logging
import math
import posixpath
import time
from collections import defaultdict
from typing import Callable, List, Optional, Set, Tuple

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import MULTIMASK_MODES, AnnotateConfig
from pipeline.inputs.read import ItemSelector, plan_input_uris
from pipeline.inputs.units import KIND_PROMPT_ORPHANS, Plan, Unit, committed_ranges, units_of_source
from pipeline.modes.base import Mode
from pipeline.modes.prompt_index import (SortedTable, build_orphans, build_sorted_prompts, fingerprint,
                                         image_key, open_sorted_table, prompt_table_files, table_exists,
                                         table_schema)
from pipeline.modes.prompts import TABLE_ROW, ImagePrompts, Prompt, add_prompt_row, check_prompts_fit
from pipeline.modes.stage import (CONSUMED_COLUMNS, answered_row, failure_reason, image_sha256, load_model,
                                  pick_device, timings, with_passthrough)
from pipeline.output import schema
from pipeline.output.sink import PROMPTS_DIR
from pipeline.redact import redact_text
from sam_core.amg.filters import box_xyxy_to_xywh, masks_to_boxes_xyxy, stability_score
from sam_core.amg.rle import masks_to_rle_arrays, rle_to_coco

log = logging.getLogger(__name__)

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


# --- wiring into pipeline.run (through pipeline.modes.PromptedMode) ----------------------------

def select_prompted(index_uri: str, orphans_uri: Optional[str], storage_options_json: str,
                    uris: List[str]) -> List[Tuple[bool, dict]]:
    """The read stage's selector, for a block of items: only prompted images get a row, and their
    prompts travel with them.

    Images in ``--input`` without prompts are not read or annotated, nor those that the orphans
    table holds (they have their "not in --input" error row, final as error rows are). Both tables
    are the sorted ones of ``prompt_index``, looked up once per block.
    """
    keys = [image_key(uri) for uri in uris]
    found = open_sorted_table(index_uri, storage_options_json).lookup(keys)
    answered = open_sorted_table(orphans_uri, storage_options_json).lookup(keys) if orphans_uri else {}
    selected = []
    for uri, key in zip(uris, keys):
        if key not in found or key in answered:
            selected.append((False, {}))
            continue
        image = ImagePrompts(uri)
        for row in found[key]:
            add_prompt_row(image, row, row[TABLE_ROW])
        selected.append((True, {PROMPTS_COLUMN: image.to_json()}))
    return selected


class PromptedMode(Mode):
    """Masks from the boxes and points of a prompts table (the Grounded-SAM recipe).

    The table is sorted by image into the output once (``prompt_index``), and the read stage looks
    each block of items up in it: neither the driver nor a worker holds the whole table.
    """

    name = "prompted"
    row_schema = PROMPTED_OUTPUT_SCHEMA

    def __init__(self):
        self.index_uri: Optional[str] = None
        self.orphans_uri: Optional[str] = None

    def prepare(self, config: AnnotateConfig) -> None:
        """A missing table, or a file of it without a uri column, stops the run here (footers only)."""
        table_schema(*prompt_table_files(config.prompts, config.storage_options))

    def selector(self, config: AnnotateConfig) -> Optional[ItemSelector]:
        if self.index_uri is None:
            raise RuntimeError("PromptedMode.extra_units builds the prompts index before the plan is run")
        return functools.partial(select_prompted, self.index_uri, self.orphans_uri,
                                 json.dumps(config.storage_options or {}, sort_keys=True))

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        """``config.multimask`` (``--multimask``: "auto", "always", "never") picks the multimask choice."""
        return PromptedAnnotator, {"config": config.to_dict(), "multimask": config.multimask}

    def extra_units(self, config: AnnotateConfig, plan: Plan, committed: Set[str], output) -> List[Unit]:
        """Sort the table into the output (once per version of it), and find the prompted images
        that ``--input`` does not hold: they get one error row each, in units of their own.

        Orphans are looked for once per table, and not under ``--limit`` (a truncated listing
        cannot tell a missing image from one past the limit) nor with shard inputs (finding a
        shard's images means reading it whole).
        """
        options = config.storage_options or {}
        version = fingerprint(config.prompts, options)
        folder = output.path(posixpath.join(PROMPTS_DIR, version))
        self.index_uri = output.fs.unstrip_protocol(posixpath.join(folder, "table"))
        log.info("prompts table sorted by image into %s: %d rows", redact_text(self.index_uri),
                 build_sorted_prompts(config.prompts, options, self.index_uri))
        orphans_folder = posixpath.join(folder, "orphans")
        if not table_exists(output.fs, orphans_folder):
            if config.limit is not None or plan.shards:
                return []
            build_orphans(SortedTable(self.index_uri, options), plan_input_uris(plan, options), output.fs,
                          orphans_folder)
        self.orphans_uri = output.fs.unstrip_protocol(orphans_folder)
        orphans = SortedTable(self.orphans_uri, options)
        ranges = committed_ranges(committed)
        return [unit for file_uri, rows in orphans.file_rows()
                for unit in units_of_source(KIND_PROMPT_ORPHANS, file_uri,
                                            f"orphans:{version}/{posixpath.basename(file_uri)}", rows,
                                            config.unit_size, ranges, exact_size=True)]


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
