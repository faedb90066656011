"""Read stage: a unit of work -> its items, each with the object's bytes or why they are missing.

Runs on CPU workers via ``Dataset.map_batches(read_units, batch_format="numpy")``: each call gets
unit rows (``pipeline.units.Unit.to_row``) and yields blocks of item rows as it reads, so a
unit's images stream on without the whole unit in memory. Manifests are read here, on the
workers, never on the driver: a ``txt`` unit reads only its byte range, a ``pq``/``ls`` unit only
its rows.

One bad object (deleted since listing, no permission) never fails the batch: it becomes a
``read_error`` that ``pipeline.decode.decode_batch`` turns into the row's error. Transient store
errors are retried with exponential backoff (``pipeline.retry``, on top of s3fs's own retries); a
missing object is not. Objects of one block are fetched by a few threads at once: reads are
latency-bound, and one task per unit should keep several GPUs fed.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline.redact import redact_text
from pipeline.retry import RetriesExhausted, with_retries
from pipeline.units import KIND_LISTING, KIND_PARQUET, KIND_PROMPT_ORPHANS, KIND_TEXT, Unit, is_manifest_entry

RETRIES = 3
FIRST_BACKOFF_S = 0.5
ITEMS_PER_BLOCK = 16
READ_THREADS = 8

# Per item, what the read stage needs from a mode (prompted mode: the item's prompts, or None
# for "no row for this image"); None keeps every item.
ItemSelector = Callable[[str], Tuple[bool, dict]]


def read_units(batch: dict, *, storage_options: Optional[dict] = None,
               select: Optional[ItemSelector] = None, items_per_block: int = ITEMS_PER_BLOCK) -> Iterator[dict]:
    """Ray Data ``map_batches`` function (``batch_format="numpy"``): unit rows -> item rows.

    Yields blocks of at most ``items_per_block`` items, each with ``unit``, ``unit_index``
    (0, 1, ... within the unit), ``unit_last``, ``uri`` (str), ``skip`` (bool: no row for this
    item), ``bytes`` (empty when unreadable or skipped), ``read_error`` (str: "" or why),
    ``read_s`` (float64), and any column ``select`` adds. A unit with no item still yields one
    skipped item, so that the driver sees every unit end.
    """
    options = storage_options or {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for row in _rows(batch):
            unit = Unit.from_row(row)
            for chunk in _chunks(_numbered(unit_uris(unit, options)), items_per_block):
                yield _read_block(unit, chunk, options, select, pool)


def unit_uris(unit: Unit, storage_options: dict) -> Iterator[Optional[str]]:
    """The item URIs of a unit, in order; None for an entry that names no object."""
    if unit.kind == KIND_PROMPT_ORPHANS:
        yield from unit.entries
        return
    fs, path = fsspec.core.url_to_fs(unit.source, **storage_options)
    if unit.kind == KIND_TEXT:
        yield from text_manifest_entries(fs, path, unit.start, unit.stop)
    elif unit.kind in (KIND_PARQUET, KIND_LISTING):
        yield from parquet_uris(fs, path, unit.start, unit.stop)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def text_manifest_entries(fs, path: str, start: int, stop: int) -> Iterator[str]:
    """The URIs on the lines that *start* in bytes [start, stop) (blank and `#` lines skipped).

    The rule that makes byte ranges partition the lines: a line belongs to the range its first
    byte falls in, so a range that opens inside a line leaves that line to the range before.
    """
    with fs.open(path, "rb") as handle:
        position = start
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                position = start + len(handle.readline())
        handle.seek(position)
        while position < stop:
            line = handle.readline()
            if not line:
                return
            position += len(line)
            if is_manifest_entry(line):
                yield line.strip().decode("utf-8", "replace")


def parquet_uris(fs, path: str, start: int, stop: int) -> Iterator[Optional[str]]:
    """Rows [start, stop) of the ``uri`` column, reading only the row groups they fall in."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        first_row = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first_row + rows > start and first_row < stop:
                column = parquet.read_row_group(group, columns=["uri"]).column("uri")
                lo, hi = max(start - first_row, 0), min(stop - first_row, rows)
                yield from (uri or None for uri in column.slice(lo, hi - lo).to_pylist())
            first_row += rows
            if first_row >= stop:
                return


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


def _read_block(unit: Unit, chunk: List[Tuple[int, Optional[str], bool]], storage_options: dict,
                select: Optional[ItemSelector], pool: ThreadPoolExecutor) -> dict:
    n = len(chunk)
    block = {
        "unit": np.full(n, unit.id, dtype=object),
        "unit_index": np.array([index for index, _, _ in chunk], dtype=np.int64),
        "unit_last": np.array([last for _, _, last in chunk], dtype=bool),
        "uri": np.array([uri or "" for _, uri, _ in chunk], dtype=object),
        "skip": np.array([uri is None for _, uri, _ in chunk], dtype=bool),
    }
    if select is not None:
        extra: dict = {}
        for i, (_, uri, _) in enumerate(chunk):
            keep, columns = select(uri) if uri is not None else (False, {})
            block["skip"][i] |= not keep
            for name, value in columns.items():
                extra.setdefault(name, np.full(n, "", dtype=object))[i] = value
        block.update(extra)

    def fetch(i: int) -> Tuple[Optional[bytes], Optional[str], float]:
        started = time.perf_counter()
        if block["skip"][i]:
            data, error = None, None
        elif unit.kind == KIND_PROMPT_ORPHANS:  # prompts for an image the input does not hold
            from pipeline.prompted import ORPHAN_REASON

            data, error = None, ORPHAN_REASON
        else:
            data, error = read_object(block["uri"][i], storage_options)
        return data, error, time.perf_counter() - started

    fetched = list(pool.map(fetch, range(n)))
    # Empty values rather than None: a batch of all-None becomes a null Arrow column that comes
    # back as NaN floats in the next stage.
    block["bytes"] = np.array([data or b"" for data, _, _ in fetched], dtype=object)
    block["read_error"] = np.array([error or "" for _, error, _ in fetched], dtype=object)
    block["read_s"] = np.array([seconds for _, _, seconds in fetched], dtype=np.float64)
    return block


def _numbered(uris: Iterable[Optional[str]]) -> Iterator[Tuple[int, Optional[str], bool]]:
    """(index, uri, is last) for each item; one skipped item when there is none."""
    previous = None
    for index, uri in enumerate(uris):
        if previous is not None:
            yield (*previous, False)
        previous = (index, uri)
    yield (*previous, True) if previous is not None else (0, None, True)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rows(batch: dict) -> Iterator[dict]:
    names = list(batch)
    for i in range(len(batch[names[0]])):
        yield {name: batch[name][i] for name in names}
