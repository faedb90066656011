"""Listing the image objects under a prefix or glob, streamed in one deterministic order.

`--input` may be a prefix (a directory, or any key prefix in an object store), walked
recursively, a glob (`*`, `?`, `[`) whose matches are walked recursively if they are
directories, or WebDataset brace notation (`s3://b/sa_{000000..000999}.tar`), which names files
without listing anything. (Manifests, `.txt` or `.parquet`, are cut into units in
`pipeline.inputs.units` and read on the workers; they are not listed here.)

Walked inputs keep image files, tar shards and Parquet files (image bytes), chosen by extension
case-insensitively. URIs keep the scheme of `--input` (`s3://bucket/a.jpg`); local inputs
without a scheme are absolute paths.

The listing is a generator: one directory's entries are held at a time, never the whole
corpus. Its order is ``listing_key`` (path components compared one by one), the order in which a
sorted depth-first walk meets the files, so a listing is always the same sequence and two
listings can be compared in one streaming pass (`pipeline.inputs.units.new_entries`).
"""
from __future__ import annotations

import posixpath
import re
from typing import Callable, Iterator, List, Optional, Tuple

import fsspec

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_TEXT = ".txt"
MANIFEST_PARQUET = ".parquet"
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = "*?["
_BRACES = re.compile(r"\{([^{}]*)\}")

IMAGE, TAR, PARQUET = "image", "tar", "parquet"


def is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def file_kind(path: str) -> Optional[str]:
    """``image``, ``tar`` (a shard of images), ``parquet`` (image bytes), or None, by extension."""
    lowered = path.lower()
    if lowered.endswith(TAR_EXTENSIONS):
        return TAR
    if lowered.endswith(MANIFEST_PARQUET):
        return PARQUET
    return IMAGE if is_image_name(path) else None


def has_braces(uri: str) -> bool:
    return bool(_BRACES.search(uri))


def expand_braces(pattern: str) -> List[str]:
    """WebDataset brace notation: ``{000..123}`` (zero padding kept) and ``{a,b}``, any number of them."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def has_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)


def listing_key(uri: str) -> Tuple[str, ...]:
    """The listing order: path components compared one at a time (what a sorted walk yields)."""
    return tuple(uri.split("/"))


def iter_input_files(input_uri: str, storage_options: Optional[dict] = None) -> Iterator[Tuple[str, str]]:
    """(kind, URI) of every image, tar shard and Parquet file under ``input_uri``, in listing order."""
    fs, path = fsspec.core.url_to_fs(input_uri, **(storage_options or {}))
    for found in _walk_input(fs, path):
        kind = file_kind(found)
        if kind is not None:
            yield kind, _with_scheme(input_uri, found)


def iter_image_uris(input_uri: str, storage_options: Optional[dict] = None) -> Iterator[str]:
    """Every image URI under ``input_uri`` (prefix or glob), in ``listing_key`` order."""
    return (uri for kind, uri in iter_input_files(input_uri, storage_options) if kind == IMAGE)


def input_exists(input_uri: str, storage_options: Optional[dict] = None) -> bool:
    """Whether ``input_uri`` names anything: a file, a directory, a key prefix or a glob match."""
    fs, path = fsspec.core.url_to_fs(input_uri, **(storage_options or {}))
    if has_glob(path):
        return bool(fs.glob(path))
    if fs.exists(path):
        return True
    parent, stem = posixpath.split(path.rstrip("/"))
    return bool(parent) and fs.isdir(parent) and any(
        posixpath.basename(p.rstrip("/")).startswith(stem) for p in fs.ls(parent, detail=False))


def _walk_input(fs, path: str) -> Iterator[str]:
    """Files under ``path``: a directory, a glob, a single file, or a bare key prefix."""
    if has_glob(path):
        root = _glob_root(path)
        pattern = re.compile(fsspec.utils.glob_translate(path))
        if fs.isdir(root):
            yield from _sorted_walk(fs, root, lambda p: bool(pattern.match(p)))
        return
    if fs.isdir(path):
        yield from _sorted_walk(fs, path.rstrip("/"), lambda p: True)
        return
    if fs.isfile(path):
        yield path
        return
    # An object-store prefix that is not a "directory", e.g. s3://bucket/images/2024-
    parent = posixpath.dirname(path.rstrip("/"))
    if parent and fs.isdir(parent):
        yield from _sorted_walk(fs, parent, lambda p: p.startswith(path), prune=True)


def _sorted_walk(fs, directory: str, matches: Callable[[str], bool], prune: bool = False) -> Iterator[str]:
    """Depth-first, entries sorted by name; a matching directory brings its whole subtree.

    With ``prune`` a directory that does not match is not entered (a key prefix); without it the
    walk goes on below (a glob may match deeper down).
    """
    entries = fs.ls(directory, detail=True)
    fs.invalidate_cache(directory)  # object-store listings are cached per process: keep none
    children = []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name and name != directory.rstrip("/"):
            children.append((posixpath.basename(name), name, entry.get("type") == "directory"))
    for _, name, is_directory in sorted(children):
        if is_directory:
            if matches(name):
                yield from _sorted_walk(fs, name, _everything)
            elif not prune:
                yield from _sorted_walk(fs, name, matches)
        elif matches(name):
            yield name


def _everything(path: str) -> bool:
    return True


def _glob_root(path: str) -> str:
    """The deepest directory of a glob pattern that has no glob character."""
    head = path[: min(path.index(char) for char in _GLOB_CHARS if char in path)]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _with_scheme(input_uri: str, found: str) -> str:
    """Give a listed path the scheme the user wrote (`s3://...`); plain local paths stay plain."""
    if "://" not in input_uri:
        return found
    scheme = input_uri.split("://", 1)[0]
    return f"{scheme}://{found.lstrip('/')}" if scheme != "file" else f"file://{found}"
