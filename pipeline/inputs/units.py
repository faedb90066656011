"""Units of work: the input cut into deterministic pieces, each with a stable id of our own.

A unit is what one read task turns into items (one input image each), what the workers write
under names derived from it, and what one commit record (`_commits/<unit id>.json`) marks as
done. Its id comes from our naming only, never from an input name:

    <kind>-<sha256(source key)[:12]>-<start>-<stop>      (stop "end": to the end of the file)

| kind | source                                                  | start, stop                              |
|------|---------------------------------------------------------|------------------------------------------|
| txt  | a `.txt` manifest, one URI a line                       | bytes: the lines that *start* in [start, stop) |
| pq   | a `.parquet` manifest with a `uri` column               | rows [start, stop)                       |
| ls   | a listing snapshot we wrote, `_listings/<run>.parquet`  | rows [start, stop)                       |
| tar  | a tar shard (WebDataset, SA-1B): one image member an item | image members [start, end)             |
| img  | a Parquet file of image bytes (HF datasets `image` column) | rows [start, end)                      |
| po   | prompted images --input lacks, `_prompts/<version>/orphans/part-N.parquet` | rows [start, stop)      |

Planning (``plan_units``) covers what the committed units do not: for each source it takes the
committed ranges from the unit ids alone (one listing of `_commits/`, no object read), and cuts
every range left over into units on a fixed grid of ``span`` items (bytes for `txt`). So:
- a rerun after completion plans nothing;
- lines appended to a manifest, or rows to a Parquet manifest, become new units after the old;
- a prefix or glob is listed afresh each run, and only the objects that no earlier snapshot
  holds go into a new snapshot (``new_entries``): late arrivals are picked up, nothing twice;
- a unit that was planned but never committed is planned again, and the sink removes what it
  left behind before anything is rewritten (``pipeline.output.sink.Output.remove_uncommitted``).

A run's first units are small (``Ramp``, when ``plan_units`` is given ``ramp_from``): the first is
``ramp_from`` items and each next one ends on a grid twice as wide, until ``unit_size``; so the
first commit record, and the rows it marks, come after a few images, not after a whole unit.
Every run ramps from where its own work starts (a resume, a late arrival), and the ramp ends on
the fixed grid, so later units are the grid's. Any split is safe: resume takes ranges, not ids.

The driver holds the planned units and the committed ids: state that grows with units, not with
images. Manifests are read on the workers (`pipeline.inputs.read`), listings are streamed.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs import sources
from pipeline.redact import redact_text

KIND_TEXT = "txt"
KIND_PARQUET = "pq"
KIND_LISTING = "ls"
KIND_PROMPT_ORPHANS = "po"
KIND_TAR = "tar"
KIND_PARQUET_IMAGES = "img"
KINDS = (KIND_TEXT, KIND_PARQUET, KIND_LISTING, KIND_PROMPT_ORPHANS, KIND_TAR, KIND_PARQUET_IMAGES)
# Shards: a file whose items are inside it. One shard is one unit, read front to back; how many
# images it holds is known only once it is read, so its unit runs to the end.
CONTAINER_KINDS = (KIND_TAR, KIND_PARQUET_IMAGES)
END = 2**62  # "to the end of the file", written "end" in unit ids

UNIT_ID_PATTERN = r"(?:txt|pq|ls|po|tar|img)-[0-9a-f]{12}-\d+-(?:\d+|end)"
_UNIT_ID = re.compile(rf"^(?P<kind>[a-z]+)-(?P<source>[0-9a-f]{{12}})-(?P<start>\d+)-(?P<stop>\d+|end)$")

DEFAULT_UNIT_SIZE = 1024
# Items in a run's first unit (at least the annotate batch; see ``Ramp``).
RAMP_FIRST = 16
# The ``unit`` column of the rows the read stage sends after a ramp unit (``Unit.flush``): no unit's.
FLUSH_UNIT = ""

# The error of a prompted image that --input does not hold (the rows of a KIND_PROMPT_ORPHANS unit).
ORPHAN_REASON = ("prompts given for an image that is not in --input "
                 "(URIs must match exactly, scheme included, file:// optional)")
# Bytes of a text manifest sampled to turn images per unit into bytes per unit.
TEXT_SAMPLE_BYTES = 64 * 1024
LISTING_DIR = "_listings"
LISTING_ROW_GROUP = 64 * 1024


class InputError(ValueError):
    """The input cannot be used as given (missing, empty, malformed); the message says why."""


@dataclass(frozen=True)
class Unit:
    """One unit of work.

    ``source`` is the URI of the file the unit reads (a manifest or our listing snapshot);
    ``source_key`` the stable identity its id is derived from: the canonical URI of a manifest,
    or ``listing:<name>`` for a snapshot (so an output that moves keeps its ids).
    ``size`` is the number of items where planning knows it exactly (rows), else None.
    ``flush``: a ramp unit, whose rows should reach storage as soon as they are annotated
    (``pipeline.inputs.read.read_units`` sends flush rows after its items). Not part of the id.
    """

    kind: str
    source: str
    source_key: str
    start: int
    stop: int
    size: Optional[int] = None
    flush: bool = False

    @property
    def id(self) -> str:
        return unit_id(self.kind, self.source_key, self.start, self.stop)

    def to_row(self) -> dict:
        """The unit as one row of the plan's input Dataset."""
        return {"unit": self.id, **asdict(self), "size": -1 if self.size is None else self.size}

    @classmethod
    def from_row(cls, row: dict) -> "Unit":
        size = int(row["size"])
        return cls(kind=str(row["kind"]), source=str(row["source"]), source_key=str(row["source_key"]),
                   start=int(row["start"]), stop=int(row["stop"]), size=None if size < 0 else size,
                   flush=bool(row.get("flush", False)))


def source_hash(source_key: str) -> str:
    return hashlib.sha256(source_key.encode("utf-8")).hexdigest()[:12]


def unit_id(kind: str, source_key: str, start: int, stop: int) -> str:
    return f"{kind}-{source_hash(source_key)}-{start}-{'end' if stop == END else stop}"


def parse_unit_id(name: str) -> Optional[Tuple[str, str, int, int]]:
    """(kind, source hash, start, stop) of one of our unit ids, or None."""
    match = _UNIT_ID.match(name)
    if not match or match["kind"] not in KINDS:
        return None
    return match["kind"], match["source"], int(match["start"]), END if match["stop"] == "end" else int(match["stop"])


def committed_ranges(committed: Iterable[str]) -> Dict[Tuple[str, str], List[Tuple[int, int]]]:
    """Committed unit ids grouped per (kind, source hash) as sorted [start, stop) ranges."""
    ranges: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    for name in committed:
        parsed = parse_unit_id(name)
        if parsed:
            kind, source, start, stop = parsed
            ranges.setdefault((kind, source), []).append((start, stop))
    return {key: sorted(value) for key, value in ranges.items()}


def uncovered(total: int, covered: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The parts of [0, total) that no range in ``covered`` (sorted) contains."""
    gaps, position = [], 0
    for start, stop in covered:
        if start > position:
            gaps.append((position, min(start, total)))
        position = max(position, stop)
        if position >= total:
            break
    if position < total:
        gaps.append((position, total))
    return [(a, b) for a, b in gaps if b > a]


def cut(gaps: Iterable[Tuple[int, int]], span: int) -> Iterator[Tuple[int, int]]:
    """Each gap cut at the multiples of ``span``: the same grid whatever was committed before."""
    for start, stop in gaps:
        while start < stop:
            boundary = min(stop, (start // span + 1) * span)
            yield start, boundary
            start = boundary


class Ramp:
    """The first units of a run: small, then wider, up to the unit size.

    The k-th ramp unit ends at the next multiple of ``first * 2**k`` items (in the source's own
    measure: bytes for `txt`), so from position 0 the units are 16, 16, 32, ... 512 items and
    the ramp ends on the ``unit_size`` grid; from any other position (a resume, late arrivals)
    it grows the same way and the next unit runs to the grid. The ramp spans a run, not a
    source: it goes on into the next gap or source until it is used up, so a run of a thousand
    shards splits only its first. Planning the same gaps again gives the same units.
    """

    def __init__(self, first: Optional[int], unit_size: int):
        sizes = []
        size = max(1, first or unit_size)
        while size < unit_size:
            sizes.append(size)
            size *= 2
        self.sizes = sizes  # item widths of the ramp units still to plan

    def cut(self, gaps: Iterable[Tuple[int, int]], span: int, unit_size: int,
            whole: bool = False) -> Iterator[Tuple[int, int, bool]]:
        """(start, stop, is a ramp unit) for ``gaps``: the ramp while it lasts, then the grid of ``span``.

        ``span`` is ``unit_size`` items in the source's measure; ``whole``: after the ramp, the
        rest of each gap is one unit (shards).
        """
        for start, stop in gaps:
            while start < stop and self.sizes:
                width = max(1, self.sizes.pop(0) * span // unit_size)
                boundary = min(stop, (start // width + 1) * width)
                yield start, boundary, True
                start = boundary
            if start < stop:
                yield from ((a, b, False) for a, b in ([(start, stop)] if whole else cut([(start, stop)], span)))


def units_of_source(kind: str, source: str, source_key: str, total: int, span: int,
                    committed: Dict[Tuple[str, str], List[Tuple[int, int]]], exact_size: bool,
                    limit_total: Optional[int] = None, ramp: Optional[Ramp] = None,
                    unit_size: Optional[int] = None) -> List[Unit]:
    """The units still to do for one source of ``total`` items (or bytes), up to ``limit_total`` if given.

    ``ramp`` (with ``unit_size``, the items ``span`` stands for) makes the first units small.
    """
    covered = committed.get((kind, source_hash(source_key)), [])
    if covered and covered[-1][1] > total:
        raise InputError(
            f"{source} is shorter than when it was annotated ({total} {'rows' if exact_size else 'bytes'} now, "
            f"{covered[-1][1]} done): manifests must only grow; use --overwrite or another --output")
    end = total if limit_total is None else min(total, limit_total)
    ramp = ramp or Ramp(None, 1)
    return [Unit(kind, source, source_key, start, stop, size=(stop - start) if exact_size else None, flush=flush)
            for start, stop, flush in ramp.cut(uncovered(end, covered), span, unit_size or span)]


# --- Planning ---------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a run will do: the units, and a listing snapshot to publish first (if any)."""

    units: List[Unit]
    # All of the input as whole-source units, to stream every item when a mode must (prompted
    # mode looks for prompted images that the input does not hold).
    extent: List[Unit] = field(default_factory=list)
    snapshot_local_path: Optional[str] = None  # staged here; the run copies it into the output
    snapshot_name: Optional[str] = None        # `_listings/<name>.parquet`
    new_listed: int = 0                          # objects in that snapshot
    shards: int = 0                              # tar / Parquet shards in the input

    @property
    def known_items(self) -> Optional[int]:
        sizes = [u.size for u in self.units]
        return None if any(s is None for s in sizes) else sum(sizes)


def plan_units(input_uri: str, storage_options: dict, committed: Iterable[str], *, unit_size: int,
               limit: Optional[int], output, run_index: int, staging_dir: Optional[str] = None,
               fresh_output: bool = False, image_column: Optional[str] = None,
               ramp_from: Optional[int] = None) -> Plan:
    """Cut ``input_uri`` into the units that ``committed`` does not cover yet.

    ``output`` is the ``pipeline.output.sink.Output`` (its earlier listing snapshots are diffed against
    a fresh listing, unless ``fresh_output``: --overwrite); ``run_index`` names a new snapshot.
    Raises ``InputError`` for an input that is missing or holds no image, with a one-line message.

    Shards (tar, Parquet of image bytes) become one unit each; under ``limit`` only the first
    shard is planned, for its first ``limit`` images (a shard's size is known once it is read).
    ``ramp_from``: the items of the run's first unit; the units after it grow to ``unit_size``
    (``Ramp``). None: every unit on the grid.
    """
    options = storage_options or {}
    ranges = committed_ranges(committed)
    ramp = Ramp(ramp_from, unit_size)
    if sources.has_braces(input_uri):  # WebDataset's shard notation names the files: no listing
        files = [(sources.file_kind(uri), uri) for uri in sources.expand_braces(input_uri)]
        unknown = [uri for kind, uri in files if kind not in (sources.TAR, sources.PARQUET)]
        if unknown:
            raise InputError(f"--input {redact_text(input_uri)}: brace notation names shards (.tar, .parquet), "
                             f"not {redact_text(unknown[0])}")
        present = present_shards(files, options)
        if not present:
            raise InputError(f"--input {redact_text(input_uri)} names {len(files)} shard(s), none of them there")
        return Plan(shard_units(present, options, ranges, limit, ramp, unit_size), shards=len(present))
    fs, path = fsspec.core.url_to_fs(input_uri, **options)
    kind = manifest_kind(fs, path)
    if kind == KIND_TEXT:
        shards = text_manifest_shards(fs, path)
        if shards is not None:
            present = present_shards(shards, options)
            return Plan(shard_units(present, options, ranges, limit, ramp, unit_size), shards=len(present))
        size = int(fs.size(path))
        total = size if limit is None else text_manifest_extent(fs, path, limit)
        span = text_span(fs, path, unit_size)
        key = canonical(fs, path)
        return Plan(units_of_source(KIND_TEXT, input_uri, key, size, span, ranges, exact_size=False,
                                    limit_total=total, ramp=ramp, unit_size=unit_size),
                    extent=[Unit(KIND_TEXT, input_uri, key, 0, total)])
    if kind == KIND_PARQUET:
        if parquet_holds_images(fs, path, image_column):
            return Plan(shard_units([(sources.PARQUET, input_uri)], options, ranges, limit, ramp, unit_size),
                        shards=1)
        rows = parquet_manifest_rows(fs, path)
        total = rows if limit is None else min(rows, limit)
        key = canonical(fs, path)
        return Plan(units_of_source(KIND_PARQUET, input_uri, key, rows, unit_size, ranges, exact_size=True,
                                    limit_total=total, ramp=ramp),
                    extent=[Unit(KIND_PARQUET, input_uri, key, 0, total, total)])
    return _plan_listing(input_uri, options, ranges, unit_size, limit, output, run_index, staging_dir,
                         fresh_output, ramp)


def manifest_kind(fs, path: str) -> Optional[str]:
    """``txt`` / ``pq`` when ``path`` names a manifest file (or a Parquet of images), None for a prefix or glob."""
    if sources.has_glob(path):
        return None
    lowered = path.lower()
    kind = KIND_TEXT if lowered.endswith(sources.MANIFEST_TEXT) else (
        KIND_PARQUET if lowered.endswith(sources.MANIFEST_PARQUET) else None)
    if kind is None or fs.isfile(path):
        return kind
    if fs.isdir(path):  # a folder that happens to be named like a manifest is a prefix
        return None
    raise InputError(f"--input manifest {redact_text(canonical(fs, path))} does not exist")


def canonical(fs, path: str) -> str:
    """One spelling per file (`./list.txt` and `/abs/list.txt` agree), so unit ids survive retyping."""
    return fs.unstrip_protocol(path)


def canonical_uri(uri: str, storage_options: dict) -> str:
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return canonical(fs, path)


def text_manifest_extent(fs, path: str, limit: int) -> int:
    """Bytes of the manifest up to the end of its ``limit``-th URI."""
    count = position = 0
    with fs.open(path, "rb") as handle:
        while count < limit:
            line = handle.readline()
            if not line:
                break
            position += len(line)
            count += is_manifest_entry(line)
    return position


def text_manifest_shards(fs, path: str) -> Optional[List[Tuple[str, str]]]:
    """The (kind, URI) of each line of a manifest of shards, or None when it lists images.

    Its first entry decides. A manifest of shards has a line per shard (thousands, not billions),
    so the driver reads it whole.
    """
    with fs.open(path, "rb") as handle:
        first = next((line for line in handle if is_manifest_entry(line)), b"").strip().decode("utf-8", "replace")
        if sources.file_kind(first) not in (sources.TAR, sources.PARQUET):
            return None
        handle.seek(0)
        entries = [line.strip().decode("utf-8", "replace") for line in handle if is_manifest_entry(line)]
    return [(sources.file_kind(uri) or sources.TAR, uri) for uri in entries]


def text_span(fs, path: str, unit_size: int) -> int:
    """Bytes per unit: ``unit_size`` lines at the average line length of the manifest's head."""
    with fs.open(path, "rb") as handle:
        head = handle.read(TEXT_SAMPLE_BYTES)
    lines = max(1, head.count(b"\n"))
    return max(1, round(unit_size * len(head) / lines))


def is_manifest_entry(line: bytes) -> bool:
    text = line.strip()
    return bool(text) and not text.startswith(b"#")


def parquet_manifest_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        if "uri" not in parquet.schema_arrow.names:
            raise InputError(f"{fs.unstrip_protocol(path)} has neither a 'uri' column (a manifest) nor an image "
                             f"column (--image-column; columns: {parquet.schema_arrow.names})")
        return parquet.metadata.num_rows


def parquet_holds_images(fs, path: str, image_column: Optional[str]) -> bool:
    """Whether one Parquet file is a shard of image bytes, not a manifest.

    A file with a ``uri`` column is a manifest unless ``--image-column`` names a column: a
    manifest may well carry a binary column of its own (a hash, a thumbnail).
    """
    with fs.open(path, "rb") as handle:
        schema = pq.read_schema(handle)
    if image_column is None and "uri" in schema.names:
        return False
    return find_image_column(schema, image_column) is not None


def find_image_column(schema: pa.Schema, named: Optional[str] = None) -> Optional[str]:
    """The column that holds image bytes: ``named``, else an HF ``image`` struct<bytes, path>, else binary.

    HF datasets store an ``Image`` feature as struct<bytes: binary, path: string>; plain binary
    columns hold the encoded file. With several candidates, a struct is preferred, then ``image``.
    """
    if named is not None:
        return named if named in schema.names else None
    def holds_bytes(field: pa.Field) -> bool:
        if pa.types.is_struct(field.type):
            return any(f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
                       for f in field.type)
        return pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)
    candidates = [f for f in schema if holds_bytes(f)]
    candidates.sort(key=lambda f: (not pa.types.is_struct(f.type), f.name != "image"))
    return candidates[0].name if candidates else None


def present_shards(files: Sequence[Tuple[str, str]], storage_options: dict) -> List[Tuple[str, str]]:
    """The named shards (brace notation, a manifest of shards) that exist now, in order.

    One listing per folder, not a request per shard. A shard that is not there yet is left for
    a later run, which finds it as a late arrival; a unit for it now would commit an error row.
    """
    present: Dict[str, set] = {}
    kept = []
    for kind, uri in files:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        folder = path.rsplit("/", 1)[0]
        if folder not in present:
            fs.invalidate_cache(folder)
            try:
                present[folder] = {entry.rstrip("/") for entry in fs.ls(folder, detail=False)}
            except FileNotFoundError:
                present[folder] = set()
        if path.rstrip("/") in present[folder]:
            kept.append((kind, uri))
    return kept


def shard_units(files: Sequence[Tuple[str, str]], storage_options: dict, ranges, limit: Optional[int],
                ramp: Optional[Ramp] = None, unit_size: int = DEFAULT_UNIT_SIZE) -> List[Unit]:
    """One unit per shard not yet committed to its end; under ``limit``, the first shard's first images.

    With ``ramp``, the first shard's first members are cut into ramp units (member ranges) and
    the rest of it is one unit; each ramp unit streams the shard from its start to its range.
    """
    ramp = ramp or Ramp(None, 1)
    units = []
    for position, (kind, uri) in enumerate(files):
        unit_kind = KIND_TAR if kind == sources.TAR else KIND_PARQUET_IMAGES
        total = END if limit is None else (limit if position == 0 else 0)
        key = canonical_uri(uri, storage_options)
        covered = ranges.get((unit_kind, source_hash(key)), [])
        units += [Unit(unit_kind, uri, key, start, stop, flush=flush)
                  for start, stop, flush in ramp.cut(uncovered(total, covered), unit_size, unit_size, whole=True)]
    return units


# --- Listings: prefixes and globs ---------------------------------------------------------------

def _plan_listing(input_uri: str, storage_options: dict, ranges, unit_size: int, limit: Optional[int],
                  output, run_index: int, staging_dir: Optional[str], fresh_output: bool,
                  ramp: Optional[Ramp] = None) -> Plan:
    shards: List[Tuple[str, str]] = []  # listed on the way; a handful per thousand images at most

    def images() -> Iterator[str]:
        for kind, uri in sources.iter_input_files(input_uri, storage_options):
            if kind == sources.IMAGE:
                yield uri
            else:
                shards.append((kind, uri))

    listed = [0]  # images taken from the listing: under --limit the shards get what is left

    def counted(uris: Iterator[str]) -> Iterator[str]:
        for uri in uris:
            listed[0] += 1
            yield uri

    fresh = images() if limit is None else counted(_first(images(), limit))
    snapshots = [] if fresh_output else output.listing_snapshots()
    new = new_entries(fresh, [output.iter_listing(name) for name in snapshots])
    name = f"{run_index:04d}"
    staged, count = _stage_snapshot(new, staging_dir)
    if count == 0 and not shards and (not snapshots or not sources.input_exists(input_uri, storage_options)):
        os.unlink(staged)
        if not sources.input_exists(input_uri, storage_options):
            missing = "matches nothing" if sources.has_glob(input_uri) else "does not exist"
            raise InputError(f"--input {redact_text(input_uri)} {missing}")
        raise InputError(f"--input {redact_text(input_uri)} holds no image files, tar or Parquet shards "
                         f"(extensions: {' '.join(sorted(sources.IMAGE_EXTENSIONS))} .tar .parquet)")
    listings = [(output.listing_uri(s), s, output.listing_rows(s)) for s in snapshots]
    if count:
        listings.append((staged, name, count))
    units, extent = [], []
    for uri, snapshot, rows in listings:
        key = f"listing:{snapshot}"
        source = output.listing_uri(snapshot)  # the staged one is published there before any read
        units += units_of_source(KIND_LISTING, source, key, rows, unit_size, ranges, exact_size=True, ramp=ramp)
        extent.append(Unit(KIND_LISTING, uri, key, 0, rows, rows))
    shard_limit = None if limit is None else max(0, limit - listed[0])
    units += shard_units(shards, storage_options, ranges, shard_limit, ramp, unit_size)
    if not count:
        os.unlink(staged)
        return Plan(units, extent, shards=len(shards))
    return Plan(units, extent, snapshot_local_path=staged, snapshot_name=name, new_listed=count, shards=len(shards))


def _first(items: Iterator[str], limit: int) -> Iterator[str]:
    for index, item in enumerate(items):
        if index >= limit:
            return
        yield item


def new_entries(fresh: Iterable[str], previous: Sequence[Iterable[str]]) -> Iterator[str]:
    """The URIs of ``fresh`` that no earlier snapshot holds; all in listing order, streamed.

    Every snapshot, and the fresh listing, are sorted by ``sources.listing_key``: a merge of the
    old ones and one pass over the new one keep memory bounded by a batch of each.
    """
    old = heapq.merge(*previous, key=sources.listing_key)
    current = next(old, None)
    for uri in fresh:
        key = sources.listing_key(uri)
        while current is not None and sources.listing_key(current) < key:
            current = next(old, None)
        if current is not None and current == uri:
            continue
        yield uri


def _stage_snapshot(uris: Iterable[str], staging_dir: Optional[str]) -> Tuple[str, int]:
    """Write ``uris`` to a local Parquet file in row groups; (path, count)."""
    handle, path = tempfile.mkstemp(prefix="listing-", suffix=".parquet", dir=staging_dir)
    os.close(handle)
    schema = pa.schema([pa.field("uri", pa.string(), nullable=False)])
    count, pending = 0, []
    with pq.ParquetWriter(path, schema) as writer:
        for uri in uris:
            pending.append(uri)
            if len(pending) == LISTING_ROW_GROUP:
                writer.write_table(pa.table({"uri": pending}, schema=schema))
                count, pending = count + len(pending), []
        if pending or count == 0:
            writer.write_table(pa.table({"uri": pending}, schema=schema))
            count += len(pending)
    return path, count


def listing_name_ok(name: str) -> bool:
    return bool(re.fullmatch(r"\d{4,}", name))


__all__ = ["DEFAULT_UNIT_SIZE", "FLUSH_UNIT", "InputError", "Plan", "RAMP_FIRST", "Ramp", "Unit", "committed_ranges",
           "cut", "new_entries",
           "parse_unit_id", "plan_units", "uncovered", "unit_id", "LISTING_DIR", "UNIT_ID_PATTERN"]
