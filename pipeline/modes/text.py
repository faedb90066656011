"""Text mode (``--text "car. person." --detector URI``): labelled masks, the Grounded-SAM recipe in one actor.

Per batch of decoded images, ``TextAnnotator``:

1. runs the zero-shot detector (``sam_core.detector.ZeroShotDetector``: Grounding DINO, OWLv2,
   OWL-ViT) over all of them in one call, one forward per processed shape;
2. keeps the boxes over ``--box-threshold`` (and, with ``--label-nms``, the best of each
   same-label cluster), clipped to the image;
3. encodes every image that has a box in ONE SAM encoder batch (``SamPredictor.set_images``; with
   ``--fast``, under bfloat16 autocast where bf16 is faster on the device);
4. decodes each image's boxes as box prompts in decoder batches of ``--points-per-batch``
   (``prompted.segment_prompts``), one mask per box (``--multimask auto``: SAM's advice for boxes).

An image with no detection gets an ok row with 0 masks and is not encoded. Should the batch fail
(one bad image, out of memory), its images are redone one by one, so only the failing ones become
error rows.

Rows follow ``pipeline.output.schema``, with these fields added to each mask struct
(``TEXT_OUTPUT_SCHEMA``):

| field             | type          | notes                                                         |
|-------------------|---------------|---------------------------------------------------------------|
| `prompt_index`    | int32         | the box's rank in the image, best detector score first          |
| `prompt_box`      | list<float64> | XYXY box given to SAM: the detector's, clipped to the image     |
| `label`           | string        | the class of ``--text`` the box is for; null when the detector's phrase names none |
| `detector_score`  | float64       | the detector's box score                                        |
| `detector_phrase` | string        | the detector's own label (Grounding DINO: the prompt words over ``--text-threshold``) |
"""
from __future__ import annotations

import importlib.util
import logging
import time
from typing import Callable, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from pipeline.config import AnnotateConfig
from pipeline.modes.base import Mode
from pipeline.modes.prompted import segment_prompts
from pipeline.modes.prompts import Prompt
from pipeline.modes.stage import (CONSUMED_COLUMNS, answered_row, as_rgb, failure_reason, image_sha256, input_uris,
                                  load_model, pick_device, timings, with_passthrough)
from pipeline.output import schema
from sam_core.detector import (TEXT_EXTRA_HINT, DetectorError, Detections, check_detector, class_for_phrase,
                               parse_text_prompt, per_label_nms_indices)

log = logging.getLogger(__name__)

TEXT_MASK_FIELDS = [
    pa.field("prompt_index", pa.int32()),
    pa.field("prompt_box", pa.list_(pa.float64())),
    pa.field("label", pa.string()),
    pa.field("detector_score", pa.float64()),
    pa.field("detector_phrase", pa.string()),
]
TEXT_OUTPUT_SCHEMA = schema.output_schema(TEXT_MASK_FIELDS)


class TextMode(Mode):
    """Boxes from a zero-shot detector for the classes of ``--text``, then SAM on those boxes."""

    name = "text"
    row_schema = TEXT_OUTPUT_SCHEMA

    def prepare(self, config: AnnotateConfig) -> None:
        """Before Ray starts: the detector directory is one, and transformers is installed."""
        check_detector(config.detector, config.storage_options)
        if importlib.util.find_spec("transformers") is None:
            raise DetectorError(f"--text needs transformers, which is not installed: {TEXT_EXTRA_HINT}")

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        return TextAnnotator, {"config": config.to_dict()}


def load_detector(config: AnnotateConfig, device: str):
    """The production detector: ``--detector`` loaded on ``device`` (a remote one copied once per node)."""
    from sam_core.detector import ZeroShotDetector

    return ZeroShotDetector.load(config.detector, device=device, storage_options=config.storage_options)


def kept_detections(detections: Detections, classes: List[str], width: int, height: int,
                    label_nms: Optional[float] = None) -> Tuple[Detections, List[Optional[str]]]:
    """The boxes that become prompts, best score first, clipped to the image, and each one's class.

    With ``label_nms`` an IoU threshold, boxes of one class (by ``class_for_phrase``) suppress each
    other as in ``per_label_nms``; boxes that name no class form a group of their own.
    """
    classes_of = [class_for_phrase(phrase, classes) for phrase in detections.labels]
    if label_nms is not None:
        order = per_label_nms_indices(detections, label_nms, labels=[c or "" for c in classes_of])
    else:
        order = np.argsort(-detections.scores, kind="stable")
    kept = detections.select(order)
    kept.boxes_xyxy = np.clip(kept.boxes_xyxy, 0.0, [width, height, width, height])
    return kept, [classes_of[i] for i in order]


def box_prompts(kept: Detections, classes_of: List[Optional[str]]) -> List[Prompt]:
    return [Prompt(index=k, box_xyxy=tuple(float(v) for v in box), label=label, score=float(score))
            for k, (box, score, label) in enumerate(zip(kept.boxes_xyxy, kept.scores, classes_of))]


class TextAnnotator:
    """Ray Data actor for text mode: one detector and one SAM on the same device, loaded once.

    Input batch: the rows of ``pipeline.inputs.decode.decode_batch`` (``uri``, ``image`` HxWx3 uint8,
    ``status``, ``error``, ``image_sha256``, optional ``read_s``/``decode_s``). Output: a
    ``TEXT_OUTPUT_SCHEMA`` table, one row per input row, then the input's own columns.
    ``config`` is ``AnnotateConfig.to_dict()``; ``predictor_factory(config)`` and
    ``detector_factory(config)`` replace the loaders (tests, benchmarks).
    """

    def __init__(self, config: dict, predictor_factory: Optional[Callable] = None,
                 detector_factory: Optional[Callable] = None):
        self.config = AnnotateConfig.from_dict(config)
        self.classes = parse_text_prompt(self.config.text)
        device = pick_device()
        if predictor_factory is None:
            from sam_core import SamPredictor

            self.predictor = SamPredictor(load_model(self.config, device))
        else:
            self.predictor = predictor_factory(self.config)
        self.detector = (detector_factory or (lambda c: load_detector(c, device)))(self.config)

    def __call__(self, batch: dict) -> pa.Table:
        uris = input_uris(batch)
        rows: List[Optional[dict]] = [answered_row(batch, i, uri) for i, uri in enumerate(uris)]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            images = [as_rgb(batch["image"][i]) for i in todo]
            start = time.perf_counter()
            results = self._annotate(images)
            per_image_s = (time.perf_counter() - start) / len(todo)
            for i, image, result in zip(todo, images, results):
                row_timings = {**timings(batch, i), "annotate_s": per_image_s}
                height, width = image.shape[:2]
                if isinstance(result, Exception):
                    rows[i] = schema.error_row(uris[i], failure_reason(result), width, height,
                                               image_sha256(batch, i), row_timings)
                else:
                    rows[i] = text_row(uris[i], width, height, result, image_sha256(batch, i), row_timings)
        return with_passthrough(schema.rows_to_table(rows, TEXT_OUTPUT_SCHEMA), batch, CONSUMED_COLUMNS)

    def _annotate(self, images: List[np.ndarray]) -> list:
        """Per image, its ``(records, detector phrases)``; the whole batch at once, else one by one."""
        try:
            return self._annotate_batch(images)
        except Exception:
            log.warning("batched text annotation failed; retrying the %d images one by one", len(images),
                        exc_info=True)
        results: list = []
        for image in images:
            try:
                results.extend(self._annotate_batch([image]))
            except Exception as exc:  # one image's failure must not cost the others their rows
                results.append(exc)
        return results

    def _annotate_batch(self, images: List[np.ndarray]) -> list:
        config = self.config
        found = self.detector.detect(images, self.classes, box_threshold=config.box_threshold,
                                     text_threshold=config.text_threshold)
        kept = [kept_detections(d, self.classes, image.shape[1], image.shape[0], config.label_nms)
                for d, image in zip(found, images)]
        with_boxes = [i for i, (detections, _) in enumerate(kept) if len(detections)]
        embeddings = self._encode([images[i] for i in with_boxes])  # one encoder batch
        results: list = [([], []) for _ in images]
        for i, embedding in zip(with_boxes, embeddings):
            detections, classes_of = kept[i]
            self.predictor.use_embedding(embedding)
            records = segment_prompts(self.predictor, box_prompts(detections, classes_of), config.points_per_batch,
                                      config.multimask, config.stability_score_offset)
            results[i] = (records, detections.labels)
        return results


    def _encode(self, images: List[np.ndarray]) -> list:
        """SAM's encoder over ``images`` at once; with ``--fast``, under bfloat16 autocast where bf16
        measures faster here (``sam_core.amg.tuning.bfloat16_pays``). The features return to fp32,
        so the boxes still decode in fp32."""
        import torch

        from sam_core.amg.tuning import bfloat16_pays
        from sam_core.predictor import ImageEmbedding

        device = self.predictor.device
        fast = self.config.fast and bfloat16_pays(device.type, torch.get_num_threads())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            embeddings = self.predictor.set_images(images)
        return [ImageEmbedding(e.features.float(), e.original_size, e.input_size) for e in embeddings]


def text_row(uri: str, width: int, height: int, result: tuple, sha: Optional[str], row_timings: dict) -> dict:
    """An ok row whose masks carry their box, class, detector score and detector phrase."""
    records, phrases = result
    row = schema.ok_row(uri, width, height, records, sha, row_timings)
    for mask, record, phrase in zip(row["masks"], records, phrases):
        prompt = record["prompt"]
        mask.update(prompt_index=prompt.index, prompt_box=list(prompt.box_xyxy), label=prompt.label,
                    detector_score=prompt.score, detector_phrase=phrase)
    return row
