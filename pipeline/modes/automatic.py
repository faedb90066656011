"""Automatic mode: every image gets SAM's automatic masks, in an actor that loads SAM once.

``Annotator`` is a Ray Data callable class (``map_batches(Annotator, compute=ActorPoolStrategy)``)
and a plain class a test can call without Ray. Each actor loads the model from the checkpoint
URI in its constructor, on CUDA when this actor can see a GPU and on CPU otherwise, and runs
``AutomaticMaskGenerator.generate_batch`` (one encoder batch per call) in ``coco_rle`` mode.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from pipeline.config import AnnotateConfig
from pipeline.modes.base import Mode
from pipeline.modes.stage import (CONSUMED_COLUMNS, answered_row, as_rgb, failure_reason, image_sha256, input_uris,
                                  load_model, pick_device, timings, with_passthrough)
from pipeline.output import schema

log = logging.getLogger(__name__)


def make_generator(config: AnnotateConfig, device: str):
    """The production generator: our SAM with the run's AMG parameters, COCO RLE out."""
    from sam_core import AutomaticMaskGenerator

    return AutomaticMaskGenerator(
        load_model(config, device),
        output_mode="coco_rle",
        fast=config.fast,  # on a CPU the generator uses bf16 only where it measures faster here
        encoder_batch_size=config.batch_size,
        **config.amg_kwargs(),
    )


class AutomaticMode(Mode):
    """Automatic mask generation on every image."""

    name = "automatic"

    def stage(self, config: AnnotateConfig) -> Tuple[type, dict]:
        return Annotator, {"config": config.to_dict()}


class Annotator:
    """Ray Data actor: a batch of decoded images (numpy format) -> a pyarrow table of output rows.

    The job's use (``pipeline.run``) feeds it the rows of ``pipeline.inputs.decode.decode_batch``: ``uri``,
    ``image`` (HxWx3 uint8), ``width``, ``height``, ``status``, ``error``, ``image_sha256``,
    ``decode_s``, optional ``read_s``. Any Dataset of images works too: only ``image`` is required
    (``ray.data.read_images`` output, with its ``path`` used as the ``uri`` when there is no
    ``uri``)::

        ds.map_batches(Annotator, fn_constructor_kwargs={"checkpoint": "s3://b/sam_vit_h_4b8939.pth"},
                       compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=4)

    Output: the ``schema.OUTPUT_SCHEMA`` columns, one row per input row, followed by every input
    column it does not consume (the job's unit columns, a user's own ids). ``config`` is an
    ``AnnotateConfig.to_dict()``; without it, keyword ``settings`` name AnnotateConfig fields
    (``checkpoint`` at least).
    """

    def __init__(self, config: Optional[dict] = None, generator_factory: Optional[Callable] = None, **settings):
        self.config = AnnotateConfig.from_dict(config) if config is not None else AnnotateConfig.for_stage(**settings)
        self.device = pick_device()
        factory = generator_factory or make_generator
        self.generator = factory(self.config, self.device)

    def __call__(self, batch: dict) -> pa.Table:
        uris = input_uris(batch)
        rows: List[Optional[dict]] = [answered_row(batch, i, uri) for i, uri in enumerate(uris)]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            images = [as_rgb(batch["image"][i]) for i in todo]
            start = time.perf_counter()
            results = self._generate(images)
            per_image_s = (time.perf_counter() - start) / len(todo)
            for i, image, result in zip(todo, images, results):
                row_timings = {**timings(batch, i), "annotate_s": per_image_s}
                height, width = image.shape[:2]
                if isinstance(result, Exception):
                    rows[i] = schema.error_row(uris[i], failure_reason(result), width, height,
                                               image_sha256(batch, i), row_timings)
                else:
                    rows[i] = schema.ok_row(uris[i], width, height, result, image_sha256(batch, i), row_timings)
        consumed = CONSUMED_COLUMNS | ({"path"} if "uri" not in batch else set())
        return with_passthrough(schema.rows_to_table(rows), batch, consumed)

    def _generate(self, images: List[np.ndarray]) -> list:
        """Records per image; one encoder batch, or image by image if the batch fails."""
        try:
            return self.generator.generate_batch(images)
        except Exception:
            log.warning("batched generation failed; retrying the %d images one by one", len(images), exc_info=True)
        results: list = []
        for image in images:
            try:
                results.append(self.generator.generate(image))
            except Exception as exc:  # one image's failure must not cost the others their rows
                results.append(exc)
        return results
