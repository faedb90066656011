"""The output directory: Parquet shards, the run manifest and the completion marker.

Layout of an output root:

    part-0001-000000.parquet   shards of run 1 (run index, then shard sequence number)
    part-0002-000000.parquet   shards of run 2 (a resumed or extended run)
    _runs/0001.json            manifest of each run
    _run.json                  manifest of the latest run (a copy of its _runs entry)
    _SUCCESS                   written last, only when a run completed

Shard names are deterministic (run index = 1 + the highest index already present, then a
sequence number), never come from input names, and a shard is never written over an existing
object: a name clash means a concurrent run on the same output, and stops this one. Local
shards are written to a hidden temporary name and renamed, object-store puts are atomic, so a
killed run leaves only complete shards behind.
"""
from __future__ import annotations

import json
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Set, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retry import with_retries

SHARD_PATTERN = re.compile(r"^part-(\d{4,})-(\d{6,})\.parquet$")
TEMPORARY_PATTERN = re.compile(r"^\.part-\d{4,}-\d{6,}\.parquet\.[0-9a-f]+\.tmp$")
RUN_MANIFEST = "_run.json"
RUN_HISTORY_DIR = "_runs"
COMPLETION_MARKER = "_SUCCESS"


class OutputExistsError(RuntimeError):
    """A shard name is already taken: another run is writing to the same output."""


class Output:
    """An output root on any fsspec filesystem."""

    def __init__(self, uri: str, storage_options: Optional[dict] = None):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def shard_paths(self) -> List[str]:
        """Paths of every shard under the root, sorted by (run, sequence)."""
        self.fs.invalidate_cache(self.root)  # object-store listings are cached per process
        if not self.fs.exists(self.root):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)]
        return sorted(self.path(name) for name in names if SHARD_PATTERN.match(name))

    def next_run_index(self) -> int:
        indexes = [int(SHARD_PATTERN.match(posixpath.basename(p)).group(1)) for p in self.shard_paths()]
        history = self.path(RUN_HISTORY_DIR)
        if self.fs.exists(history):
            for name in self.fs.ls(history, detail=False):
                stem = posixpath.splitext(posixpath.basename(name))[0]
                if stem.isdigit():
                    indexes.append(int(stem))
        return max(indexes, default=0) + 1

    def written_uris(self) -> Set[str]:
        """URIs that already have a row; reads only the `uri` column of each shard."""
        def read_uris(shard: str) -> List[str]:
            with self.fs.open(shard, "rb") as handle:
                return pq.read_table(handle, columns=["uri"]).column("uri").to_pylist()

        uris: Set[str] = set()
        # Object-store reads are latency-bound: a rerun over thousands of shards reads them in parallel.
        with ThreadPoolExecutor(max_workers=16) as pool:
            for shard_uris in pool.map(read_uris, self.shard_paths()):
                uris.update(shard_uris)
        return uris

    def clear(self) -> None:
        """Remove what our runs wrote (shards, manifests, marker) and nothing else (--overwrite)."""
        for shard in self.shard_paths() + self._stale_temporaries():
            self.fs.rm(shard)
        for name in (RUN_MANIFEST, COMPLETION_MARKER):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name))
        if self.fs.exists(self.path(RUN_HISTORY_DIR)):
            self.fs.rm(self.path(RUN_HISTORY_DIR), recursive=True)

    def _stale_temporaries(self) -> List[str]:
        """Hidden half-written local shards of a killed run (readers skip them; --overwrite removes them)."""
        if not self.fs.exists(self.root):
            return []
        names = [posixpath.basename(p) for p in self.fs.ls(self.root, detail=False)]
        return [self.path(name) for name in names if TEMPORARY_PATTERN.match(name)]

    def read_manifest(self) -> Optional[dict]:
        if not self.fs.exists(self.path(RUN_MANIFEST)):
            return None
        with self.fs.open(self.path(RUN_MANIFEST), "rt") as handle:
            return json.load(handle)

    def write_manifest(self, manifest: dict) -> None:
        """Write `_runs/<index>.json` and `_run.json` (the latest run)."""
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        self.fs.makedirs(self.path(RUN_HISTORY_DIR), exist_ok=True)
        self._put_text(posixpath.join(RUN_HISTORY_DIR, f"{manifest['run_index']:04d}.json"), text)
        self._put_text(RUN_MANIFEST, text)

    def mark_incomplete(self) -> None:
        if self.fs.exists(self.path(COMPLETION_MARKER)):
            self.fs.rm(self.path(COMPLETION_MARKER))

    def mark_complete(self, manifest: dict) -> None:
        """The completion marker: written last, after every shard and the manifest."""
        summary = {key: manifest.get(key) for key in ("run_index", "end_time", "totals")}
        self._put_text(COMPLETION_MARKER, json.dumps(summary, sort_keys=True, default=str))

    def is_complete(self) -> bool:
        return self.fs.exists(self.path(COMPLETION_MARKER))

    def write_shard(self, table: pa.Table, name: str) -> str:
        """Write one shard atomically; refuse to replace an existing object."""
        target = self.path(name)
        # Every store call is retried: the first call after an S3 restart is as likely to fail as the put.
        if with_retries(lambda: self.fs.exists(target), what=f"checking {target}"):
            raise OutputExistsError(f"{target} already exists: is another run writing to this output?")
        with_retries(lambda: self.fs.makedirs(self.root, exist_ok=True), what=f"creating {self.root}")
        if _is_local(self.fs):
            temporary = self.path(f".{name}.{uuid.uuid4().hex}.tmp")
            self._put_table(table, temporary)
            self.fs.mv(temporary, target)
        else:
            self._put_table(table, target)
        return target

    def _put_table(self, table: pa.Table, path: str) -> None:
        def put() -> None:
            with self.fs.open(path, "wb") as handle:
                pq.write_table(table, handle)

        with_retries(put, what=f"writing {path}")  # a store restarting must not cost the run

    def _put_text(self, name: str, text: str) -> None:
        def put() -> None:
            with self.fs.open(self.path(name), "wt") as handle:
                handle.write(text)

        with_retries(put, what=f"writing {self.path(name)}")


class ShardWriter:
    """Buffers row tables and writes a shard every `rows_per_shard` rows.

    Shards are named `part-<run index>-<sequence>.parquet` from our own counters only.
    """

    def __init__(self, output: Output, run_index: int, schema: pa.Schema, rows_per_shard: int = 256):
        self.output = output
        self.run_index = run_index
        self.schema = schema
        self.rows_per_shard = max(1, int(rows_per_shard))
        self.shards_written: List[str] = []
        self.rows_written = 0
        self._pending: List[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.rows_per_shard:
            head, rest = _split(pa.concat_tables(self._pending), self.rows_per_shard)
            self._flush_table(head)
            self._pending = [rest] if rest.num_rows else []
            self._pending_rows = rest.num_rows

    def close(self) -> None:
        if self._pending_rows:
            self._flush_table(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def _flush_table(self, table: pa.Table) -> None:
        name = f"part-{self.run_index:04d}-{len(self.shards_written):06d}.parquet"
        self.shards_written.append(self.output.write_shard(table, name))
        self.rows_written += table.num_rows


def _split(table: pa.Table, rows: int) -> Tuple[pa.Table, pa.Table]:
    return table.slice(0, rows), table.slice(rows)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
