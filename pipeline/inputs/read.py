"""Read stage: a unit of work -> its items, each with the image's bytes or why they are missing.

Runs on CPU workers via ``Dataset.map_batches(read_units, batch_format="numpy")``: each call gets
unit rows (``pipeline.inputs.units.Unit.to_row``) and yields blocks of item rows as it reads, so a
unit's images stream on without the whole unit in memory. Manifests and shards are read here,
on the workers, never on the driver:
- a ``txt`` unit reads only its byte range of the manifest, a ``pq``/``ls`` unit only its rows,
  and each URI's object is then fetched by a few threads at once (reads are latency-bound);
- a ``tar`` unit reads its shard once, front to back, as a stream: no per-member request, and
  memory bounded by one sample (a key's members), not by the shard;
- an ``img`` unit reads a Parquet file of image bytes a row group at a time.

One bad object (deleted since listing, no permission, a broken tar member) never fails the
batch: it becomes a ``read_error`` that ``pipeline.inputs.decode.decode_batch`` turns into the row's
error. A shard that breaks off gives the rows read before the damage and one error row saying
where. Transient store errors are retried with exponential backoff (``pipeline.retry``, on top
of s3fs's own retries); a missing object is not.
"""
from __future__ import annotations

import re
import tarfile
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipeline.redact import redact_text
from pipeline.retry import RetriesExhausted, with_retries
from pipeline.output.schema import SIDECAR_PREFIX
from pipeline.inputs.sources import is_image_name
from pipeline.inputs.units import (FLUSH_UNIT, KIND_LISTING, KIND_PARQUET, KIND_PARQUET_IMAGES, KIND_PROMPT_ORPHANS,
                                   KIND_TAR, KIND_TEXT, ORPHAN_REASON, Plan, Unit, find_image_column, is_manifest_entry)

RETRIES = 3
FIRST_BACKOFF_S = 0.5
ITEMS_PER_BLOCK = 16
READ_THREADS = 8

# Per block of item URIs, what the read stage needs from a mode: for each, whether it gets a row and
# the columns to carry (prompted mode: whether the image has prompts, and its prompts). One call a
# block, so that a mode can look a block up at once. None keeps every item and carries nothing.
ItemSelector = Callable[[List[str]], List[Tuple[bool, dict]]]


class Item(NamedTuple):
    """One input of a unit: a URI to fetch, or bytes already read from a shard, or why neither."""

    uri: Optional[str]                 # None: an entry that names nothing (no row)
    data: Optional[bytes] = None       # bytes read from a shard; None: fetch ``uri``
    error: Optional[str] = None        # why there are no bytes
    key: str = ""                      # the WebDataset key / Parquet id of a shard member
    sidecars: Optional[Dict[str, str]] = None  # requested sidecar members, by extension


def read_units(batch: dict, *, storage_options: Optional[dict] = None, select: Optional[ItemSelector] = None,
               sidecars: Sequence[str] = (), image_column: Optional[str] = None, id_column: Optional[str] = None,
               items_per_block: int = ITEMS_PER_BLOCK, flush_rows: int = 0) -> Iterator[dict]:
    """Ray Data ``map_batches`` function (``batch_format="numpy"``): unit rows -> item rows.

    Yields blocks of at most ``items_per_block`` items, each with ``unit``, ``unit_index``
    (0, 1, ... within the unit), ``unit_last``, ``uri`` (str), ``key`` (str, "" for loose
    objects), ``skip`` (bool: no row for this item), ``bytes`` (empty when unreadable or
    skipped), ``read_error`` (str: "" or why), ``read_s`` (float64), one ``sidecar_<ext>`` column
    per requested sidecar, and any column ``select`` adds. A unit with no item still yields one
    skipped item, so that the driver sees every unit end.

    After the items of a ``Unit.flush`` unit (a ramp unit) come ``flush_rows`` flush rows:
    skipped, of no unit (``unit`` is ``FLUSH_UNIT``), so that the write stage, which waits for
    ``rows_per_file`` rows before it writes, writes that unit's rows at once (see
    ``pipeline.run.build_dataset``). ``pipeline.output.sink.write_parts`` drops them.
    """
    options = storage_options or {}
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for row in _rows(batch):
            unit = Unit.from_row(row)
            items = unit_items(unit, options, sidecars=sidecars, image_column=image_column, id_column=id_column)
            # A unit of the mode's own error rows (po) is not the input: every item of it gets its row.
            unit_select = None if unit.kind == KIND_PROMPT_ORPHANS else select
            for chunk in chunks(_numbered(items), items_per_block):
                yield _read_block(unit, chunk, options, unit_select, sidecars, pool)
            if unit.flush and flush_rows > 0:
                yield _flush_block(unit, flush_rows, options, sidecars, pool)


def _flush_block(unit: Unit, rows: int, storage_options: dict, sidecars: Sequence[str],
                 pool: ThreadPoolExecutor) -> dict:
    """``rows`` skipped rows of no unit, with the columns of an item block (no I/O: nothing to fetch)."""
    block = _read_block(unit, [(index, Item(None), False) for index in range(rows)], storage_options,
                        None, sidecars, pool)
    block["unit"] = np.full(rows, FLUSH_UNIT, dtype=object)
    return block


def unit_items(unit: Unit, storage_options: dict, *, sidecars: Sequence[str] = (),
               image_column: Optional[str] = None, id_column: Optional[str] = None) -> Iterator[Item]:
    """The items of a unit, in order."""
    if unit.kind == KIND_TAR:
        yield from tar_items(unit.source, unit.start, unit.stop, storage_options, sidecars)
    elif unit.kind == KIND_PARQUET_IMAGES:
        yield from parquet_image_items(unit.source, unit.start, unit.stop, storage_options, image_column, id_column)
    elif unit.kind == KIND_PROMPT_ORPHANS:
        yield from (Item(uri, error=ORPHAN_REASON) for uri in unit_uris(unit, storage_options))
    else:
        yield from (Item(uri) for uri in unit_uris(unit, storage_options))


def plan_input_uris(plan: Plan, storage_options: dict) -> Iterator[Optional[str]]:
    """Every item URI of the planned input, streamed (the staged snapshot is read where it is staged)."""
    for whole in plan.extent:
        staged = whole.source == plan.snapshot_local_path
        yield from unit_uris(whole, {} if staged else storage_options)


def unit_uris(unit: Unit, storage_options: dict) -> Iterator[Optional[str]]:
    """The item URIs of a manifest, listing or orphans unit, in order; None for an entry that names no object."""
    fs, path = fsspec.core.url_to_fs(unit.source, **storage_options)
    if unit.kind == KIND_TEXT:
        yield from text_manifest_entries(fs, path, unit.start, unit.stop)
    elif unit.kind in (KIND_PARQUET, KIND_LISTING, KIND_PROMPT_ORPHANS):
        yield from parquet_uris(fs, path, unit.start, unit.stop)
    else:
        raise ValueError(f"a {unit.kind!r} unit has no URI list")


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
    for table, first_row, lo, hi in _row_groups(fs, path, start, stop, ["uri"]):
        yield from (uri or None for uri in table.column("uri").slice(lo, hi - lo).to_pylist())


# --- Shards ------------------------------------------------------------------------------------

def webdataset_key(member: str) -> Tuple[str, str]:
    """(key, extension) as WebDataset splits a member name: ``dir/sa_1.jpg`` -> (``dir/sa_1``, ``jpg``)."""
    match = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", member)
    return (match.group(1), match.group(2)) if match else (member, "")


def member_uri(member: str, shard_uri: str) -> str:
    """The fsspec chained URL that opens exactly this member: ``fsspec.open(uri).read()`` gives its bytes."""
    return f"tar://{member}::{shard_uri}"


def tar_items(shard_uri: str, start: int, stop: int, storage_options: dict,
              sidecars: Sequence[str] = ()) -> Iterator[Item]:
    """Image members [start, stop) of a tar shard, read once as a stream, with their sidecars.

    Members of one key are consecutive in a WebDataset or SA-1B shard, so a sample (``sa_1.jpg``
    and ``sa_1.json``) is held until the key changes, then its images are given out. Members
    that are not images (``.json``, ``.txt``, ``.cls``, ...) get no row; those named in
    ``sidecars`` travel with their sample's images. A shard that breaks off gives the images
    read before the damage and then one error item naming the shard and where it broke.
    """
    wanted = set(sidecars)
    position = 0  # images met so far in the shard
    members = 0
    last_member = None

    def give_out(sample: List[Tuple[str, str, bytes]]) -> Iterator[Item]:
        nonlocal position
        extras = {ext: data.decode("utf-8", "replace") for _, ext, data in sample if ext in wanted}
        for name, ext, data in sample:
            if is_image_name(name):
                if start <= position < stop:
                    yield Item(member_uri(name, shard_uri), data=data, key=webdataset_key(name)[0], sidecars=extras)
                position += 1

    # A shard-wide error belongs to the unit whose range holds the position it happened at, so
    # that a shard cut into [0, N) by --limit and [N, end) later reports it once.
    try:
        fs, path = fsspec.core.url_to_fs(shard_uri, **storage_options)
        handle = with_retries(lambda: fs.open(path, "rb"), what=f"opening {shard_uri}")
    except FileNotFoundError:
        if start == 0:
            yield Item(shard_uri, error="tar shard not found (deleted or moved since it was listed)")
        return
    except Exception as exc:
        if start == 0:
            yield Item(shard_uri, error=redact_text(f"tar shard could not be opened: {type(exc).__name__}: {exc}"))
        return
    sample: List[Tuple[str, str, bytes]] = []
    sample_key = None
    with handle:
        try:
            with tarfile.open(fileobj=handle, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, ext = webdataset_key(member.name)
                    if key != sample_key:
                        yield from give_out(sample)
                        if position >= stop:
                            return
                        sample, sample_key = [], key
                    keep = is_image_name(member.name) or ext in wanted
                    data = archive.extractfile(member).read() if keep else b""
                    sample.append((member.name, ext, data))
                    members, last_member = members + 1, member.name
            yield from give_out(sample)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            yield from give_out(sample)  # the members of the broken sample read whole before the damage
            if position < start:
                return  # the damage lies in an earlier unit's range, which reported it
            where = f"after member {members} ({last_member})" if last_member else "before its first member"
            yield Item(shard_uri, error=redact_text(
                f"tar shard is damaged {where}, near byte {_tell(handle)}: {type(exc).__name__}: {exc}"))


def parquet_image_items(file_uri: str, start: int, stop: int, storage_options: dict,
                        image_column: Optional[str] = None, id_column: Optional[str] = None) -> Iterator[Item]:
    """Rows [start, stop) of a Parquet file of image bytes (HF datasets, or a binary column).

    Each row's URI is ``<file>#row=<index in the file>``, or ``<file>#<id column>=<id>`` with
    ``id_column``; ``fetch_bytes`` reads the image back from it. The key is the id.
    """
    fs, path = fsspec.core.url_to_fs(file_uri, **storage_options)
    with fs.open(path, "rb") as handle:
        schema = pq.read_schema(handle)
    column = find_image_column(schema, image_column)
    if column is None or (id_column and id_column not in schema.names):
        missing = f"no column {id_column!r} (--id-column)" if column else "no image column (--image-column)"
        if start == 0:  # a file-wide error, reported once (see tar_items)
            yield Item(file_uri, error=f"Parquet file has {missing}; columns: {schema.names}")
        return
    suffix = "" if image_column is None else f"&image={urllib.parse.quote(image_column)}"
    columns = [column] + ([id_column] if id_column and id_column != column else [])
    for table, first_row, lo, hi in _row_groups(fs, path, start, stop, columns):
        cells = table.column(column).slice(lo, hi - lo).to_pylist()
        ids = table.column(id_column).slice(lo, hi - lo).to_pylist() if id_column else None
        for offset, cell in enumerate(cells):
            index = first_row + lo + offset
            ident = str(index) if ids is None else str(ids[offset])
            name = "row" if ids is None else id_column
            uri = f"{file_uri}#{urllib.parse.quote(name)}={urllib.parse.quote(ident)}{suffix}"
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            yield Item(uri, data=data or None, key=ident,
                       error=None if data else f"no image bytes in this row (column {column!r} is empty)")


def fetch_bytes(uri: str, storage_options: Optional[dict] = None) -> bytes:
    """The bytes of an output row's image, from its ``uri``: an object, a tar member, a Parquet row."""
    options = storage_options or {}
    base, _, fragment = uri.partition("#")
    if fragment and base.lower().endswith(".parquet"):
        found = dict(urllib.parse.parse_qsl(fragment, keep_blank_values=True))
        image_column = found.pop("image", None)
        (name, wanted), = found.items()
        fs, path = fsspec.core.url_to_fs(base, **options)
        with fs.open(path, "rb") as handle:
            column = find_image_column(pq.read_schema(handle), image_column)
        for table, first_row, lo, hi in _row_groups(fs, path, 0, 2**62, [column] + ([] if name == "row" else [name])):
            for offset in range(lo, hi):
                if (str(first_row + offset) if name == "row" else str(table.column(name)[offset].as_py())) == wanted:
                    cell = table.column(column)[offset].as_py()
                    return cell["bytes"] if isinstance(cell, dict) else cell
        raise FileNotFoundError(f"no row {name}={wanted} in {base}")
    if uri.startswith("tar://") and "::" in uri:
        # Streamed to the member rather than fsspec's tar://, which indexes every header first and
        # so cannot open any member of a shard that breaks off later.
        member, shard = uri[len("tar://"):].split("::", 1)
        fs, path = fsspec.core.url_to_fs(shard, **options)
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for found in archive:
                if found.name == member and found.isfile():
                    return archive.extractfile(found).read()
        raise FileNotFoundError(f"no member {member} in {shard}")
    with fsspec.open(uri, "rb", **options) as handle:
        return handle.read()


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


def _row_groups(fs, path: str, start: int, stop: int, columns: List[str]):
    """(row group table, its first row, lo, hi) for each row group overlapping rows [start, stop)."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        first_row = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if first_row + rows > start and first_row < stop:
                table = parquet.read_row_group(group, columns=columns)
                yield table, first_row, max(start - first_row, 0), min(stop - first_row, rows)
            first_row += rows
            if first_row >= stop:
                return


def _read_block(unit: Unit, chunk: List[Tuple[int, Item, bool]], storage_options: dict,
                select: Optional[ItemSelector], sidecars: Sequence[str], pool: ThreadPoolExecutor) -> dict:
    n = len(chunk)
    block = {
        "unit": np.full(n, unit.id, dtype=object),
        "unit_index": np.array([index for index, _, _ in chunk], dtype=np.int64),
        "unit_last": np.array([last for _, _, last in chunk], dtype=bool),
        "uri": np.array([item.uri or "" for _, item, _ in chunk], dtype=object),
        "key": np.array([item.key for _, item, _ in chunk], dtype=object),
        "skip": np.array([item.uri is None for _, item, _ in chunk], dtype=bool),
    }
    for ext in sidecars:
        block[SIDECAR_PREFIX + ext] = np.array([(item.sidecars or {}).get(ext, "") for _, item, _ in chunk],
                                               dtype=object)
    if select is not None:
        extra: dict = {}
        named = [i for i, (_, item, _) in enumerate(chunk) if item.uri is not None]
        chosen = dict(zip(named, select([chunk[i][1].uri for i in named]))) if named else {}
        for i in range(n):
            keep, columns = chosen.get(i, (False, {}))
            block["skip"][i] |= not keep
            for name, value in columns.items():
                extra.setdefault(name, np.full(n, "", dtype=object))[i] = value
        block.update(extra)

    def fetch(i: int) -> Tuple[Optional[bytes], Optional[str], float]:
        started = time.perf_counter()
        item = chunk[i][1]
        if block["skip"][i]:
            data, error = None, None
        elif item.data is not None or item.error is not None:
            data, error = item.data, item.error
        else:
            data, error = read_object(item.uri, storage_options)
        return data, error, time.perf_counter() - started

    fetched = list(pool.map(fetch, range(n)))
    # Empty values rather than None: a batch of all-None becomes a null Arrow column that comes
    # back as NaN floats in the next stage.
    block["bytes"] = np.array([data or b"" for data, _, _ in fetched], dtype=object)
    block["read_error"] = np.array([error or "" for _, error, _ in fetched], dtype=object)
    block["read_s"] = np.array([seconds for _, _, seconds in fetched], dtype=np.float64)
    return block


def _tell(handle) -> str:
    try:
        return str(handle.tell())
    except Exception:
        return "?"


def _numbered(items: Iterable[Item]) -> Iterator[Tuple[int, Item, bool]]:
    """(index, item, is last) for each item; one skipped item when there is none."""
    previous = None
    for index, item in enumerate(items):
        if previous is not None:
            yield (*previous, False)
        previous = (index, item)
    yield (*previous, True) if previous is not None else (0, Item(None), True)


def chunks(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter), streamed."""
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
