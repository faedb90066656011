"""What every annotate stage shares: loading the model in the actor, and turning a decoded batch into rows.

A mode's actor (``automatic.Annotator``, ``prompted.PromptedAnnotator``, ``text.TextAnnotator``) gets
the rows of ``pipeline.inputs.decode.decode_batch``. Rows the read or decode stage already answered
(``status`` skip or error) become their rows here (``answered_row``); the mode annotates the rest and
returns one row per input row, followed by the input's own columns (``with_passthrough``).

``check_model`` runs once on the driver before any image is read, so that a model that cannot
load stops the job with the loader's own message instead of failing inside every actor.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import pyarrow as pa

from pipeline.config import AnnotateConfig
from pipeline.inputs.decode import text_or_none
from pipeline.output import schema
from pipeline.redact import redact_text

# Columns of a decoded batch that the annotate stage turns into output columns.
CONSUMED_COLUMNS = frozenset({"image", "uri", "width", "height", "status", "error", "image_sha256",
                              "read_s", "decode_s"})


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


def check_model(config: AnnotateConfig) -> str:
    """Load the checkpoint once on the driver; returns its sha256 for the run manifest.

    Raises the loader's ``sam_core.CheckpointError`` (missing, corrupt, wrong format, checksum
    mismatch) before any image is processed.
    """
    return load_model(config, "cpu").checkpoint_sha256  # the model itself is dropped


def input_uris(batch: dict) -> List[str]:
    """Each row's ``uri``: the job's, or ``path`` from ``ray.data.read_images(include_paths=True)``."""
    n = len(batch["image"])
    column = batch.get("uri", batch.get("path"))
    return [""] * n if column is None else [str(value) for value in column]


def statuses(batch: dict) -> np.ndarray:
    """Each row's decode status; a batch without one (``ray.data.read_images``) is all ok."""
    return batch["status"] if "status" in batch else np.full(len(batch["image"]), schema.STATUS_OK, dtype=object)


def image_sha256(batch: dict, i: int) -> Optional[str]:
    return text_or_none(batch["image_sha256"][i]) if "image_sha256" in batch else None


def timings(batch: dict, i: int) -> dict:
    """The read and decode seconds the earlier stages measured for row ``i``."""
    return {name: batch[name][i] for name in ("read_s", "decode_s") if name in batch}


def answered_row(batch: dict, i: int, uri: str) -> Optional[dict]:
    """The row for an input row the read or decode stage already answered (skip, error); None if ok."""
    status = statuses(batch)[i]
    if status == schema.STATUS_OK:
        return None
    if status == schema.STATUS_SKIP:
        return schema.skip_row(uri)
    return schema.error_row(uri, text_or_none(batch["error"][i]) or "decode failed",
                            image_sha256=image_sha256(batch, i), timings=timings(batch, i))


def failure_reason(exc: BaseException) -> str:
    """An annotation failure as a row's ``error``, with any credential in the message redacted."""
    return redact_text(f"annotation failed: {type(exc).__name__}: {exc}")


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
