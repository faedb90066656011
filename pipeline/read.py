"""Read stage: input URI -> the object's bytes, or the reason it could not be read.

Runs on CPU workers via ``Dataset.map_batches(read_batch, batch_format="numpy")``, before
``pipeline.decode.decode_batch``, which turns a ``read_error`` into the row's error. One bad
object (deleted since listing, no permission) never fails the batch. Transient store errors
are retried with exponential backoff (``pipeline.retry``, on top of s3fs's own retries); a
missing object is not.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import fsspec
import numpy as np

from pipeline.redact import redact_text
from pipeline.retry import RetriesExhausted, with_retries

RETRIES = 3
FIRST_BACKOFF_S = 0.5


def read_batch(batch: dict, *, storage_options: Optional[dict] = None) -> dict:
    """Ray Data ``map_batches`` function (``batch_format="numpy"``).

    Input column ``uri`` (str). Output: every input column, plus
    ``bytes`` (bytes; empty when unreadable), ``read_error`` (str: "" or why), ``read_s`` (float64).
    Empty values rather than None: a batch of all-None becomes a null Arrow column that comes
    back as NaN floats in the next stage.
    """
    uris = batch["uri"]
    n = len(uris)
    data = np.empty(n, dtype=object)
    errors = np.empty(n, dtype=object)
    seconds = np.zeros(n, dtype=np.float64)
    for i, uri in enumerate(uris):
        start = time.perf_counter()
        content, error = read_object(str(uri), storage_options or {})
        data[i], errors[i] = content or b"", error or ""
        seconds[i] = time.perf_counter() - start
    return {**batch, "bytes": data, "read_error": errors, "read_s": seconds}


def read_object(uri: str, storage_options: dict) -> Tuple[Optional[bytes], Optional[str]]:
    """(bytes, None) or (None, reason). Retries transient failures, not missing objects."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        data = with_retries(lambda: fs.cat_file(path), what=f"reading {uri}", attempts=RETRIES + 1,
                            first_backoff_s=FIRST_BACKOFF_S)
        return data, None
    except FileNotFoundError:
        return None, "object not found (deleted or moved since it was listed)"
    except PermissionError as exc:
        return None, redact_text(f"permission denied reading the object: {exc}")
    except RetriesExhausted as exc:
        return None, str(exc)  # already scrubbed of credentials
    except Exception as exc:  # permanent errors other than the above: say what, once
        return None, redact_text(f"read failed: {type(exc).__name__}: {exc}")
