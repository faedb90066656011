"""The output: data files written by the workers, commit records written by the driver.

Layout of an output root:

    part-<unit>-<first>-<digest>.parquet   rows of one unit, written by a Ray worker
    _commits/<unit>.json                    the unit's commit record, written by the driver last
    _listings/<run>.parquet                 what a prefix or glob listed (new objects only), per run
    _prompts/<version>/                     prompted mode: its table sorted by image, and the orphans
    _runs/<run>.json                        manifest of each run
    _run.json                               manifest of the latest run (a copy of its _runs entry)
    _SUCCESS                                written last, when a run committed every unit it planned

Readers take the data files: ``pyarrow.dataset`` / ``pq.read_table(root)`` skip every name that
starts with ``_`` or ``.``; DuckDB reads ``root/part-*.parquet``.

How a unit gets written exactly once:
- ``write_parts`` (a Ray Data ``map_batches`` function on the workers) writes the rows it gets of
  each unit to one file whose name comes from the unit id, the first item's position and a
  digest of the positions it holds, so a re-executed task writes the same name again: it
  overwrites, never duplicates. It returns one small result row per file.
- ``Committer`` (on the driver) adds up those results; once every item of a unit is in a file,
  it writes ``_commits/<unit>.json``: small, and last.
- Before a run writes anything, ``Output.remove_uncommitted`` deletes the files of units that
  have no commit record (a killed run's half-done units). Their redo may split them into other
  files, so a reader never sees a stale file beside the new one.
Resume is one listing of ``_commits/``; names come only from our own counters and unit ids.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Iterable, Iterator, List, Optional, Set

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.output import schema
from pipeline.redact import redact_text
from pipeline.retry import with_retries
from pipeline.inputs.units import FLUSH_UNIT, LISTING_DIR, UNIT_ID_PATTERN, Unit, listing_name_ok

log = logging.getLogger(__name__)

DATA_FILE = re.compile(rf"^part-(?P<unit>{UNIT_ID_PATTERN})-(?P<first>\d+)-(?P<digest>[0-9a-f]{{8}})\.parquet$")
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # what Output._put leaves behind when killed
# Shards of sam-annotate before units of work (part-<run>-<sequence>.parquet): no commit records.
LEGACY_SHARD = re.compile(r"^part-\d{4,}-\d{6,}\.parquet$")
COMMITS_DIR = "_commits"
PROMPTS_DIR = "_prompts"  # written by pipeline.modes.prompt_index
LAYOUT = "units-1"  # what `_run.json` says of outputs with units and commit records
RUN_MANIFEST = "_run.json"
RUN_HISTORY_DIR = "_runs"
COMPLETION_MARKER = "_SUCCESS"

WRITE_RESULT_SCHEMA = pa.schema([
    pa.field("unit", pa.string()),
    pa.field("file", pa.string()),             # name under the root; null when every row was a skip
    pa.field("indices", pa.list_(pa.int64())),  # the unit positions this result covers
    pa.field("last_index", pa.int64()),         # the unit's last position if this covers it, else -1
    pa.field("rows", pa.int64()),
    pa.field("ok", pa.int64()),
    pa.field("failed", pa.int64()),
    pa.field("masks", pa.int64()),
])


class OutputError(ValueError):
    """The output cannot be used as given; the message says why and what to do."""


class Output:
    """An output root on any fsspec filesystem."""

    def __init__(self, uri: str, storage_options: Optional[dict] = None):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def check_usable(self, overwrite: bool = False) -> None:
        """Refuse an output that is a file, or that an older sam-annotate wrote (no commit records).

        Its manifest tells, so that no listing of a large output is needed: manifests of this
        layout say ``"layout": LAYOUT``; the older ones, whose shards had no commit records, do not.
        """
        if self.fs.isfile(self.root):
            raise OutputError(f"--output {redact_text(self.uri)} is a file; give a directory or prefix")
        manifest = None if overwrite else self.read_manifest()  # --overwrite clears the old layout too
        if manifest is not None and manifest.get("layout") != LAYOUT:
            raise OutputError(
                f"--output {redact_text(self.uri)} was written by an older sam-annotate (part-NNNN-NNNNNN.parquet "
                "shards without _commits/): use --overwrite to start clean, or another --output")

    def _names(self, folder: str = "") -> List[str]:
        """Names directly under the root (or one of its folders); none when it does not exist."""
        where = self.path(folder) if folder else self.root
        self.fs.invalidate_cache(where)  # object-store listings are cached per process
        try:
            entries = with_retries(lambda: self.fs.ls(where, detail=False), what=f"listing {where}")
        except FileNotFoundError:
            return []
        return [posixpath.basename(p.rstrip("/")) for p in entries]

    # --- commit records -------------------------------------------------------------------

    def committed_units(self) -> Set[str]:
        """Ids of the committed units: one listing of ``_commits/``, no object read."""
        return {name[: -len(".json")] for name in self._names(COMMITS_DIR) if name.endswith(".json")}

    def write_commit(self, record: dict) -> None:
        self._put_text(posixpath.join(COMMITS_DIR, f"{record['unit']}.json"), json.dumps(record, sort_keys=True))

    def data_files(self) -> List[str]:
        return sorted(name for name in self._names() if DATA_FILE.match(name))

    def remove_uncommitted(self, committed: Set[str]) -> int:
        """Delete the data files of units without a commit record, and half-written temporaries.

        Runs before anything is written: a unit that a killed run left half-done is redone from
        scratch, and the redo's files must not sit beside the stale ones.
        """
        stale = [name for name in self._names()
                 if TEMPORARY.match(name) or ((m := DATA_FILE.match(name)) and m["unit"] not in committed)]
        for name in stale:
            with_retries(lambda: self.fs.rm(self.path(name)), what=f"removing {self.path(name)}")
        if stale:
            log.info("removed %d file(s) of units a previous run did not finish", len(stale))
        return len(stale)

    # --- listing snapshots ------------------------------------------------------------------

    def listing_snapshots(self) -> List[str]:
        """Names (``0001``, ...) of the listing snapshots, oldest first."""
        names = [name[: -len(".parquet")] for name in self._names(LISTING_DIR) if name.endswith(".parquet")]
        return sorted(name for name in names if listing_name_ok(name))

    def listing_uri(self, name: str) -> str:
        return self.fs.unstrip_protocol(self.path(f"{LISTING_DIR}/{name}.parquet"))

    def listing_rows(self, name: str) -> int:
        with self.fs.open(self.path(f"{LISTING_DIR}/{name}.parquet"), "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    def iter_listing(self, name: str) -> Iterator[str]:
        """A snapshot's URIs in order, a row group at a time."""
        with self.fs.open(self.path(f"{LISTING_DIR}/{name}.parquet"), "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(columns=["uri"]):
                yield from batch.column(0).to_pylist()

    def publish_listing(self, local_path: str, name: str) -> None:
        """Copy a staged snapshot in; atomic, so a unit never reads half a listing."""
        target = f"{LISTING_DIR}/{name}.parquet"
        with open(local_path, "rb") as handle:
            data = handle.read()
        self._put_bytes(target, data)

    # --- runs -------------------------------------------------------------------------------

    def next_run_index(self) -> int:
        """One more than any run named in ``_runs/`` or ``_listings/``."""
        stems = [posixpath.splitext(name)[0] for name in self._names(RUN_HISTORY_DIR) + self._names(LISTING_DIR)]
        return max((int(stem) for stem in stems if stem.isdigit()), default=0) + 1

    def read_manifest(self) -> Optional[dict]:
        if not self.fs.exists(self.path(RUN_MANIFEST)):
            return None
        with self.fs.open(self.path(RUN_MANIFEST), "rt") as handle:
            return json.load(handle)

    def write_manifest(self, manifest: dict) -> None:
        """Write `_runs/<index>.json` and `_run.json` (the latest run)."""
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        self._put_text(posixpath.join(RUN_HISTORY_DIR, f"{manifest['run_index']:04d}.json"), text)
        self._put_text(RUN_MANIFEST, text)

    def mark_incomplete(self) -> None:
        if self.fs.exists(self.path(COMPLETION_MARKER)):
            self.fs.rm(self.path(COMPLETION_MARKER))

    def mark_complete(self, manifest: dict) -> None:
        """The completion marker: written last, after every commit record and the manifest."""
        summary = {key: manifest.get(key) for key in ("run_index", "end_time", "totals")}
        self._put_text(COMPLETION_MARKER, json.dumps(summary, sort_keys=True, default=str))

    def is_complete(self) -> bool:
        return self.fs.exists(self.path(COMPLETION_MARKER))

    def clear(self) -> None:
        """Remove what our runs wrote and nothing else (--overwrite)."""
        for name in self._names():
            if DATA_FILE.match(name) or LEGACY_SHARD.match(name) or TEMPORARY.match(name) \
                    or name in (RUN_MANIFEST, COMPLETION_MARKER):
                self.fs.rm(self.path(name))
        for folder in (COMMITS_DIR, LISTING_DIR, RUN_HISTORY_DIR, PROMPTS_DIR):
            if self.fs.exists(self.path(folder)):
                self.fs.rm(self.path(folder), recursive=True)

    # --- writing ----------------------------------------------------------------------------

    def write_table(self, table: pa.Table, name: str) -> None:
        """Write one Parquet file atomically; an existing one of that name is replaced."""
        def put(handle) -> None:
            pq.write_table(table, handle)

        self._put(name, put, "wb")

    def _put_text(self, name: str, text: str) -> None:
        self._put(name, lambda handle: handle.write(text.encode("utf-8")), "wb")

    def _put_bytes(self, name: str, data: bytes) -> None:
        self._put(name, lambda handle: handle.write(data), "wb")

    def _put(self, name: str, write, mode: str) -> None:
        """Object-store puts are atomic; local files are written under a hidden name and renamed."""
        target = self.path(name)
        folder = posixpath.dirname(target)
        # Every store call is retried: the first call after an S3 restart is as likely to fail as the put.
        with_retries(lambda: self.fs.makedirs(folder, exist_ok=True), what=f"creating {folder}")
        if _is_local(self.fs):
            temporary = posixpath.join(folder, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
            with_retries(lambda: self._write_to(temporary, write, mode), what=f"writing {target}")
            self.fs.mv(temporary, target)
        else:
            with_retries(lambda: self._write_to(target, write, mode), what=f"writing {target}")

    def _write_to(self, path: str, write, mode: str) -> None:
        with self.fs.open(path, mode) as handle:
            write(handle)


# --- The worker side: a Ray Data map_batches function ------------------------------------------

def write_parts(batch: pa.Table, *, output: str, storage_options: Optional[dict], row_schema: pa.Schema) -> pa.Table:
    """Write the rows of ``batch`` to one file per unit; one ``WRITE_RESULT_SCHEMA`` row per file.

    ``batch`` holds annotated rows (``row_schema`` columns) and the ``schema.UNIT_COLUMNS``.
    Rows of status "skip" are not written, only reported, so that the driver sees their unit end.
    Flush rows (``unit`` is ``FLUSH_UNIT``, see ``pipeline.inputs.read.read_units``) belong to no
    unit: they are dropped here, neither written nor reported.
    """
    target = Output(output, storage_options)
    batch = batch.filter(pc.not_equal(batch["unit"], FLUSH_UNIT))
    results = []
    for unit in pc.unique(batch["unit"]).to_pylist():
        rows = batch.filter(pc.equal(batch["unit"], unit))
        rows = rows.take(pc.sort_indices(rows["unit_index"]))
        indices = rows["unit_index"].to_numpy()
        last = rows.filter(rows["unit_last"])["unit_index"].to_pylist()
        kept = rows.filter(pc.not_equal(rows["status"], schema.STATUS_SKIP))
        name = None
        if kept.num_rows:
            name = part_name(unit, indices)
            target.write_table(_as_rows(kept, row_schema), name)
        ok = pc.sum(pc.equal(kept["status"], schema.STATUS_OK)).as_py() or 0
        results.append({
            "unit": unit, "file": name, "indices": indices.tolist(), "last_index": last[0] if last else -1,
            "rows": kept.num_rows, "ok": ok, "failed": kept.num_rows - ok,
            "masks": pc.sum(kept["num_masks"]).as_py() or 0,
        })
    return pa.Table.from_pylist(results, schema=WRITE_RESULT_SCHEMA)


def _as_rows(table: pa.Table, row_schema: pa.Schema) -> pa.Table:
    """Exactly the row schema's columns; a sidecar a member did not have ("") becomes null."""
    table = table.select(row_schema.names)
    for name in row_schema.names:
        if name.startswith(schema.SIDECAR_PREFIX):
            column = table[name]
            table = table.set_column(table.column_names.index(name), name,
                                     pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column))
    return table.cast(row_schema)


def part_name(unit: str, indices: np.ndarray) -> str:
    """``part-<unit>-<first>-<digest of the positions>.parquet``: the same rows, the same name."""
    digest = hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()[:8]
    return f"part-{unit}-{int(indices[0]):06d}-{digest}.parquet"


# --- The driver side ----------------------------------------------------------------------------

@dataclass
class _UnitProgress:
    unit: Unit
    seen: Set[int] = field(default_factory=set)
    last_index: Optional[int] = None
    files: Dict[str, int] = field(default_factory=dict)  # name -> rows
    ok: int = 0
    failed: int = 0
    masks: int = 0
    conflicted: bool = False

    @property
    def complete(self) -> bool:
        return self.last_index is not None and len(self.seen) == self.last_index + 1


@dataclass
class WriteTally:
    """What one batch of write results added: rows written, and units committed."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    masks: int = 0
    committed: List[str] = field(default_factory=list)


class Committer:
    """Adds up write results and commits each unit once every one of its items is written.

    Holds state for units in flight only (their positions seen so far): memory grows with the
    units of one run, never with the whole output.
    """

    def __init__(self, output: Output, units: Iterable[Unit], run_index: int):
        self.output = output
        self.run_index = run_index
        self.pending: Dict[str, _UnitProgress] = {unit.id: _UnitProgress(unit) for unit in units}
        self.committed: Dict[str, List[str]] = {}  # this run's commits: unit -> its files

    def add(self, results: pa.Table) -> WriteTally:
        tally = WriteTally()
        for result in results.to_pylist():
            self._add_one(result, tally)
        return tally

    def _add_one(self, result: dict, tally: WriteTally) -> None:
        unit, name = result["unit"], result["file"]
        progress = self.pending.get(unit)
        if progress is None or (name is not None and name in progress.files):
            if name is not None and unit in self.committed and name not in self.committed[unit]:
                self._remove_duplicate(name)  # a stray repeat of a committed unit's rows
            return  # the same file reported again (a re-executed task): already counted
        indices = set(result["indices"])
        if name is None and indices <= progress.seen:
            return  # skipped items reported again (a re-executed task): nothing was written
        if indices & progress.seen:
            if name is not None and indices <= progress.seen:
                self._remove_duplicate(name)
                return
            progress.conflicted = True  # overlapping files: leave the unit to be redone next run
            log.warning("unit %s received overlapping writes; it will be redone on the next run", unit)
        progress.seen |= indices
        if result["last_index"] >= 0:
            progress.last_index = result["last_index"]
        if name is not None:
            progress.files[name] = result["rows"]
        progress.ok += result["ok"]
        progress.failed += result["failed"]
        progress.masks += result["masks"]
        tally.rows += result["rows"]
        tally.ok += result["ok"]
        tally.failed += result["failed"]
        tally.masks += result["masks"]
        if progress.complete and not progress.conflicted:
            self._commit(progress)
            tally.committed.append(unit)

    def _commit(self, progress: _UnitProgress) -> None:
        unit = progress.unit
        self.output.write_commit({
            "unit": unit.id, "kind": unit.kind, "source": redact_text(unit.source), "start": unit.start,
            "stop": unit.stop, "items": progress.last_index + 1, "files": sorted(progress.files),
            "rows": sum(progress.files.values()), "ok": progress.ok, "failed": progress.failed,
            "masks": progress.masks, "run_index": self.run_index,
            "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        self.committed[unit.id] = sorted(progress.files)
        del self.pending[unit.id]

    def _remove_duplicate(self, name: str) -> None:
        log.warning("removing %s: its rows are already written in another file", name)
        with_retries(lambda: self.output.fs.rm(self.output.path(name)), what=f"removing {name}")


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
