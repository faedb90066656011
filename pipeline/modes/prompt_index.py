"""Prompted mode at corpus scale: the prompts table sorted by image once, then joined block by block.

A prompts table of 10^8 boxes fits neither on the driver nor in every worker. So the driver sorts it
by image once, in bounded memory (``sort_spilled``: chunks of ``CHUNK_ROWS`` rows sorted in memory
and spilled to local files, then merged a batch at a time), and writes it into the output under
``_prompts/<fingerprint>/`` (the fingerprint hashes the table's URI and its files' names, sizes and
versions, so a rerun on the same table reuses it)::

    table/part-00000.parquet, ...   the table's rows plus `image_key` and `row` (the row's position in
                                    the table), sorted by image_key; row groups of ROW_GROUP_ROWS rows
    table/index.parquet             file, row group, first and last image_key of every row group; last
    orphans/...                     the same layout: prompted images that --input does not hold

``image_key`` orders URIs as a listing is ordered (path components compared one by one), so the
images of a listing unit, of a shard or of a sorted manifest fall in a few consecutive row groups.
The read stage looks each block of items up (``SortedTable.lookup``) and keeps a few row groups
cached: a worker holds the row-group index (about 25,000 entries at 10^8 prompts) and those few row
groups, never the table. A manifest in random order still works, at about a row group read per image.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import posixpath
import tempfile
from collections import OrderedDict
from functools import lru_cache
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.inputs.read import chunks
from pipeline.modes.prompts import PROMPT_COLUMNS, TABLE_ROW, PromptError
IMAGE_KEY = "image_key"
INDEX_FILE = "index.parquet"
# Sorted in memory at once on the driver (~200 bytes a row with one box: tens of MiB).
CHUNK_ROWS = 131_072
# Rows a merge reads from each spilled run at a time; and most runs merged at once.
MERGE_BATCH_ROWS = 1024
MAX_FAN_IN = 64
ROW_GROUP_ROWS = 4096  # what one look-up reads
FILE_ROWS = 1_048_576
CACHED_ROW_GROUPS = 8
# Sorts below every character of a URI: "a/b" before "a.b/c", as a listing compares components.
SEPARATOR = "\x01"

INDEX_SCHEMA = pa.schema([pa.field("file", pa.string()), pa.field("row_group", pa.int32()),
                          pa.field("first_key", pa.string()), pa.field("last_key", pa.string()),
                          pa.field("rows", pa.int64())])


def same_image_key(uri: str) -> str:
    """What two URIs of one image share: the URI itself, except that ``file://`` is optional."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def image_key(uri: str) -> str:
    """The sort and join key of an image URI (``same_image_key``, ordered as a listing)."""
    return same_image_key(uri).replace("/", SEPARATOR)


def image_keys(uris: pa.Array) -> pa.Array:
    """``image_key`` of every URI, vectorised."""
    stripped = pc.replace_substring_regex(uris, pattern="^file://", replacement="")
    return pc.replace_substring(stripped, pattern="/", replacement=SEPARATOR)


# --- The table as it is given --------------------------------------------------------------------

def prompt_table_files(uri: str, storage_options: Optional[dict] = None) -> Tuple[object, List[str]]:
    """(filesystem, paths) of the prompts table: one Parquet file, or every .parquet under a folder."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    files = [path] if fs.isfile(path) else sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no prompts table at {uri}")
    return fs, files


def table_schema(fs, files: Sequence[str]) -> pa.Schema:
    """The prompt columns the table's files hold, unified, plus ``image_key`` and ``row``.

    Reads only the files' footers. Raises ``PromptError`` for a file without a ``uri`` column or
    files whose columns disagree in type.
    """
    schemas = []
    for file in files:
        with fs.open(file, "rb") as handle:
            schema = pq.read_schema(handle)
        if "uri" not in schema.names:
            raise PromptError(f"prompts table {file} has no 'uri' column (columns: {schema.names})")
        schemas.append(pa.schema([schema.field(c) for c in PROMPT_COLUMNS if c in schema.names]))
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise PromptError(f"the prompts table's files disagree on column types: {exc}") from None
    return unified.append(pa.field(IMAGE_KEY, pa.string())).append(pa.field(TABLE_ROW, pa.int64()))


def fingerprint(uri: str, storage_options: Optional[dict] = None) -> str:
    """A name for this version of the table: its canonical URI and its files' names, sizes and versions."""
    fs, files = prompt_table_files(uri, storage_options)
    parts: list = [fs.unstrip_protocol(files[0])]
    for file in files:
        info = fs.info(file)
        version = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(k)), None)
        parts.append([file, info.get("size"), str(version)])
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:16]


def iter_table(fs, files: Sequence[str], schema: pa.Schema, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """The table's rows in order, in batches conformed to ``schema``, with ``image_key`` and ``row``."""
    row = 0
    for file in files:
        with fs.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle, pre_buffer=False)  # a row group at a time, not the file
            columns = [c for c in PROMPT_COLUMNS if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                uris = batch.column(batch.schema.get_field_index("uri"))
                bad = pc.or_kleene(pc.is_null(uris), pc.equal(uris, ""))
                if pc.any(bad).as_py():
                    raise PromptError(f"prompts table row {row + pc.index(bad, True).as_py()} has no uri")
                values = {name: batch.column(batch.schema.get_field_index(name)) for name in columns}
                values[IMAGE_KEY] = image_keys(uris)
                values[TABLE_ROW] = pa.array(np.arange(row, row + batch.num_rows, dtype=np.int64))
                row += batch.num_rows
                yield _conform(values, batch.num_rows, schema)


def _conform(values: Dict[str, pa.Array], rows: int, schema: pa.Schema) -> pa.Table:
    arrays = [values[f.name].cast(f.type) if f.name in values else pa.nulls(rows, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# --- Sorting in bounded memory --------------------------------------------------------------------

def _sorted(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(IMAGE_KEY, "ascending"), (TABLE_ROW, "ascending")]))


def sort_spilled(tables: Iterable[pa.Table], work_dir: str, chunk_rows: int = CHUNK_ROWS,
                 merge_batch_rows: int = MERGE_BATCH_ROWS, max_fan_in: int = MAX_FAN_IN) -> Iterator[pa.Table]:
    """The rows of ``tables`` in ``image_key`` order, in batches; memory bounded by ``chunk_rows``.

    Chunks are sorted in memory and spilled to ``work_dir``, then merged (in several passes when
    there are more than ``max_fan_in`` of them). Within one key, rows may come in any order.
    """
    runs: List[str] = []
    pending: List[pa.Table] = []
    count = 0

    def spill(table: pa.Table) -> None:
        path = os.path.join(work_dir, f"run-{len(runs):06d}.parquet")
        pq.write_table(table, path, row_group_size=merge_batch_rows)
        runs.append(path)

    for table in tables:
        pending.append(table)
        count += table.num_rows
        if count >= chunk_rows:
            spill(_sorted(pa.concat_tables(pending)))
            pending, count = [], 0
    if not runs:  # it fitted in memory
        if pending:
            yield from _batches(_sorted(pa.concat_tables(pending)), merge_batch_rows)
        return
    if pending:
        spill(_sorted(pa.concat_tables(pending)))
    level = 0
    while len(runs) > max_fan_in:  # merge groups of runs into longer runs first
        merged = []
        for start in range(0, len(runs), max_fan_in):
            path = os.path.join(work_dir, f"merge-{level}-{start:06d}.parquet")
            with pq.ParquetWriter(path, pq.read_schema(runs[start])) as writer:
                for table in _merge(runs[start:start + max_fan_in], merge_batch_rows):
                    writer.write_table(table, row_group_size=merge_batch_rows)
            for done in runs[start:start + max_fan_in]:
                os.unlink(done)
            merged.append(path)
        runs, level = merged, level + 1
    yield from _merge(runs, merge_batch_rows)


def _batches(table: pa.Table, rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def _merge(paths: Sequence[str], batch_rows: int) -> Iterator[pa.Table]:
    """Sorted runs -> one sorted stream. Each step takes, from every run, the rows up to the smallest
    of the runs' last buffered keys: nothing still unread can sort before them."""
    # pre_buffer off: with it, the reader fetches whole runs ahead, and memory grows with the table.
    readers = [pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows) for path in paths]
    buffers: List[Optional[pa.Table]] = [None] * len(readers)

    def refill(i: int) -> None:
        buffers[i] = next((pa.Table.from_batches([b]) for b in readers[i] if b.num_rows), None)

    for i in range(len(readers)):
        refill(i)
    while True:
        live = [i for i, buffer in enumerate(buffers) if buffer is not None]
        if not live:
            return
        bound = min(buffers[i][IMAGE_KEY][-1].as_py() for i in live)
        taken = []
        for i in live:
            n = pc.sum(pc.less_equal(buffers[i][IMAGE_KEY], bound)).as_py() or 0
            if n:
                taken.append(buffers[i].slice(0, n))
                buffers[i] = buffers[i].slice(n)
            if buffers[i].num_rows == 0:
                refill(i)
        yield _sorted(pa.concat_tables(taken))


# --- A sorted table in the output -----------------------------------------------------------------

def write_sorted_table(batches: Iterable[pa.Table], fs, folder: str, schema: pa.Schema) -> int:
    """Write sorted ``batches`` as ``part-NNNNN.parquet`` files under ``folder`` and, last, its index.

    A folder without ``index.parquet`` is an unfinished table (the driver was stopped); the next
    run writes it again. Returns the number of rows.
    """
    index: List[dict] = []
    writer = handle = None
    name, groups_in_file, rows = None, 0, 0

    def close() -> None:
        if writer is not None:
            writer.close()
            handle.close()

    try:
        for group in _row_groups_of(batches, ROW_GROUP_ROWS):
            if writer is None or groups_in_file * ROW_GROUP_ROWS >= FILE_ROWS:
                close()
                name = f"part-{len({e['file'] for e in index}):05d}.parquet"
                fs.makedirs(folder, exist_ok=True)
                handle = fs.open(posixpath.join(folder, name), "wb")
                writer, groups_in_file = pq.ParquetWriter(handle, schema), 0
            writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
            keys = group[IMAGE_KEY]
            index.append({"file": name, "row_group": groups_in_file, "first_key": keys[0].as_py(),
                          "last_key": keys[-1].as_py(), "rows": group.num_rows})
            groups_in_file += 1
            rows += group.num_rows
    finally:
        close()
    fs.makedirs(folder, exist_ok=True)
    with fs.open(posixpath.join(folder, INDEX_FILE), "wb") as out:
        pq.write_table(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), out)
    return rows


def _row_groups_of(batches: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """``batches`` re-cut into tables of exactly ``rows`` rows (the last one shorter)."""
    pending: List[pa.Table] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.concat_tables(pending)
            yield table.slice(0, rows).combine_chunks()
            rest = table.slice(rows)
            pending, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(pending).combine_chunks()


def table_exists(fs, folder: str) -> bool:
    return fs.exists(posixpath.join(folder, INDEX_FILE))


class SortedTable:
    """A table written by ``write_sorted_table``, looked up by image key a block at a time."""

    def __init__(self, uri: str, storage_options: Optional[dict] = None):
        self.fs, self.folder = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        with self.fs.open(posixpath.join(self.folder, INDEX_FILE), "rb") as handle:
            index = pq.read_table(handle)
        self.files = index["file"].to_pylist()
        self.groups = index["row_group"].to_pylist()
        self.first_keys = index["first_key"].to_pylist()
        self.last_keys = index["last_key"].to_pylist()
        self.rows = index["rows"].to_pylist()
        self._parquet: Dict[str, pq.ParquetFile] = {}
        self._cache: "OrderedDict[int, pa.Table]" = OrderedDict()

    def file_rows(self) -> List[Tuple[str, int]]:
        """(file URI, rows) of each of its files, in order."""
        totals: Dict[str, int] = {}
        for file, rows in zip(self.files, self.rows):
            totals[file] = totals.get(file, 0) + rows
        return [(self.fs.unstrip_protocol(posixpath.join(self.folder, f)), n) for f, n in totals.items()]

    def lookup(self, keys: Iterable[str]) -> Dict[str, List[dict]]:
        """The rows of each of ``keys`` that the table holds, in table order (keys it lacks are left out)."""
        wanted = sorted(set(keys))
        groups = set()
        for key in wanted:  # a key's rows may run over several consecutive row groups
            groups.update(range(bisect.bisect_left(self.last_keys, key), bisect.bisect_right(self.first_keys, key)))
        value_set = pa.array(wanted, pa.string())
        found = []
        for g in sorted(groups):
            table = self._row_group(g)
            found.append(table.filter(pc.is_in(table[IMAGE_KEY], value_set=value_set)))
        rows: Dict[str, List[dict]] = {}
        if found:
            for row in _sorted(pa.concat_tables(found)).to_pylist():
                rows.setdefault(row[IMAGE_KEY], []).append(row)
        return rows

    def iter_keys(self) -> Iterator[Tuple[str, str]]:
        """(image_key, first uri) of every image in the table, in key order, a row group at a time."""
        previous = None
        for g in range(len(self.files)):
            table = self._read(g, [IMAGE_KEY, "uri"])
            for key, uri in zip(table[IMAGE_KEY].to_pylist(), table["uri"].to_pylist()):
                if key != previous:
                    previous = key
                    yield key, uri

    def _row_group(self, g: int) -> pa.Table:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        table = self._read(g)
        self._cache[g] = table
        if len(self._cache) > CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return table

    def _read(self, g: int, columns: Optional[List[str]] = None) -> pa.Table:
        name = self.files[g]
        if name not in self._parquet:
            self._parquet[name] = pq.ParquetFile(self.fs.open(posixpath.join(self.folder, name), "rb"))
        return self._parquet[name].read_row_group(self.groups[g], columns=columns)


@lru_cache(maxsize=4)
def open_sorted_table(uri: str, storage_options_json: str) -> SortedTable:
    """One ``SortedTable`` per process and table: its index and row-group cache serve every block."""
    return SortedTable(uri, json.loads(storage_options_json))


# --- Building it, and the prompted images that the input does not hold ----------------------------

def build_sorted_prompts(prompts_uri: str, storage_options: dict, target_uri: str) -> int:
    """Sort the prompts table into ``target_uri`` (a folder) unless it is there already; its rows."""
    fs, folder = fsspec.core.url_to_fs(target_uri, **storage_options)
    if table_exists(fs, folder):
        return sum(SortedTable(target_uri, storage_options).rows)
    table_fs, files = prompt_table_files(prompts_uri, storage_options)
    schema = table_schema(table_fs, files)
    if fs.exists(folder):  # an unfinished one: a driver stopped while writing it
        fs.rm(folder, recursive=True)
    with tempfile.TemporaryDirectory(prefix="sam-annotate-prompts-") as work:
        return write_sorted_table(sort_spilled(iter_table(table_fs, files, schema), work), fs, folder, schema)


ORPHAN_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field(IMAGE_KEY, pa.string()),
                           pa.field(TABLE_ROW, pa.int64())])


def build_orphans(prompts: SortedTable, input_uris: Iterable[Optional[str]], fs, folder: str,
                  batch_rows: int = 65_536) -> int:
    """Write the prompted images that ``input_uris`` (streamed, any order) does not hold; their count.

    The input's keys are sorted the same way as the table (spilled to local files), then the two
    sorted streams are walked side by side: memory stays bounded by a chunk, whatever the sizes.
    """
    with tempfile.TemporaryDirectory(prefix="sam-annotate-inputs-") as work:
        named = (uri for uri in input_uris if uri is not None)
        listed = _sorted_keys(sort_spilled((_key_table(batch) for batch in chunks(named, batch_rows)), work))
        missing = _anti_join(prompts.iter_keys(), listed)
        return write_sorted_table((_orphan_table(batch) for batch in chunks(missing, batch_rows)), fs, folder,
                                  ORPHAN_SCHEMA)


def _key_table(uris: List[str]) -> pa.Table:
    array = pa.array(uris, pa.string())
    return pa.table({IMAGE_KEY: image_keys(array), TABLE_ROW: pa.array(np.zeros(len(uris), dtype=np.int64))})


def _sorted_keys(tables: Iterable[pa.Table]) -> Iterator[str]:
    for table in tables:
        yield from table[IMAGE_KEY].to_pylist()


def _anti_join(prompted: Iterator[Tuple[str, str]], listed: Iterator[str]) -> Iterator[Tuple[str, str]]:
    """The (key, uri) of ``prompted`` whose key ``listed`` lacks; both in key order."""
    current = next(listed, None)
    for key, uri in prompted:
        while current is not None and current < key:
            current = next(listed, None)
        if current != key:
            yield key, uri


def _orphan_table(found: List[Tuple[str, str]]) -> pa.Table:
    return pa.table({"uri": [uri for _, uri in found], IMAGE_KEY: [key for key, _ in found],
                     TABLE_ROW: pa.array(np.zeros(len(found), dtype=np.int64))}, schema=ORPHAN_SCHEMA)
