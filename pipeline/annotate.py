"""Annotate stage: decoded images -> output rows, in an actor that loads SAM once.

``Annotator`` is a Ray Data callable class (``map_batches(Annotator, compute=ActorPoolStrategy)``)
and a plain class a test can call without Ray. Each actor loads the model from the checkpoint
URI in its constructor, on CUDA when this actor can see a GPU and on CPU otherwise, and runs
``AutomaticMaskGenerator.generate_batch`` (one encoder batch per call) in ``coco_rle`` mode.

``check_model`` runs once on the driver before any image is read, so that a model that cannot
load stops the job with the loader's own message instead of failing inside every actor.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional

import numpy as np
import pyarrow as pa

from pipeline import schema
from pipeline.config import AnnotateConfig
from pipeline.redact import redact_text

log = logging.getLogger(__name__)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(config: AnnotateConfig, device: str = "cpu"):
    """``sam_core.load_sam`` on the configured checkpoint (verifying --checkpoint-sha256 if given)."""
    from sam_core import load_sam

    return load_sam(
        config.checkpoint,
        model_type=config.model_type,
        device=device,
        storage_options=config.storage_options,
        expected_sha256=config.checkpoint_sha256,
    )


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


def check_model(config: AnnotateConfig) -> str:
    """Load the checkpoint once on the driver; returns its sha256 for the run manifest.

    Raises the loader's ``sam_core.CheckpointError`` (missing, corrupt, wrong format, checksum
    mismatch) before any image is processed.
    """
    return load_model(config, "cpu").checkpoint_sha256  # the model itself is dropped


class Annotator:
    """Ray Data actor: a batch of decoded images (numpy format) -> a pyarrow table of output rows.

    The job's use (``pipeline.run``) feeds it the rows of ``pipeline.decode.decode_batch``: ``uri``,
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
        n = len(batch["image"])
        uris = input_uris(batch)
        statuses = batch["status"] if "status" in batch else np.full(n, schema.STATUS_OK, dtype=object)
        rows: List[Optional[dict]] = [None] * n
        todo = []
        for i in range(n):
            if statuses[i] == schema.STATUS_OK:
                todo.append(i)
            elif statuses[i] == schema.STATUS_SKIP:
                rows[i] = schema.skip_row(uris[i])
            else:
                rows[i] = schema.error_row(
                    uris[i],
                    _text(batch["error"][i]) or "decode failed",
                    image_sha256=_text(batch["image_sha256"][i]),
                    timings=_timings(batch, i),
                )
        if todo:
            images = [as_rgb(batch["image"][i]) for i in todo]
            start = time.perf_counter()
            results = self._generate(images)
            per_image_s = (time.perf_counter() - start) / len(todo)
            for i, image, result in zip(todo, images, results):
                timings = {**_timings(batch, i), "annotate_s": per_image_s}
                sha = _text(batch["image_sha256"][i]) if "image_sha256" in batch else None
                height, width = image.shape[:2]
                if isinstance(result, Exception):
                    reason = redact_text(f"annotation failed: {type(result).__name__}: {result}")
                    rows[i] = schema.error_row(uris[i], reason, width, height, sha, timings)
                else:
                    rows[i] = schema.ok_row(uris[i], width, height, result, sha, timings)
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


# Columns of a decoded batch that the annotate stage turns into output columns.
CONSUMED_COLUMNS = frozenset({"image", "uri", "width", "height", "status", "error", "image_sha256",
                              "read_s", "decode_s"})


def input_uris(batch: dict) -> List[str]:
    """Each row's ``uri``: the job's, or ``path`` from ``ray.data.read_images(include_paths=True)``."""
    n = len(batch["image"])
    column = batch.get("uri", batch.get("path"))
    return [""] * n if column is None else [str(value) for value in column]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxW grey, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 (alpha dropped), as the model takes it."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)


def with_passthrough(table: pa.Table, batch: dict, consumed=CONSUMED_COLUMNS) -> pa.Table:
    """``table`` plus every column of ``batch`` not in ``consumed``, in batch order.

    The shard ``key`` the read stage gives ("" for loose objects) fills the rows' ``key`` column.
    """
    if "key" in batch and "key" in table.column_names:
        keys = pa.array([str(value) or None for value in batch["key"]], pa.string())
        table = table.set_column(table.column_names.index("key"), "key", keys)
    for name, values in batch.items():
        if name not in consumed and name not in table.column_names:
            table = table.append_column(name, pa.array(list(values) if values.dtype == object else values))
    return table


def _timings(batch: dict, i: int) -> dict:
    return {name: batch[name][i] for name in ("read_s", "decode_s") if name in batch}


def _text(value) -> Optional[str]:
    """A string cell, or None: an all-null column arrives as NaN floats in numpy batches."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):  # float32 too
        return None
    return str(value)
