"""Listing the inputs of a run, and subtracting those already written (resume).

`--input` may be:
- a prefix (a directory, or any key prefix in an object store), walked recursively;
- a glob (`*`, `?`, `[`), whose matches are walked recursively if they are directories;
- a manifest: a `.txt` file with one URI per line, or a `.parquet` file with a `uri` column.

Walked inputs keep image files only, chosen by extension case-insensitively. Manifest entries
are taken as written. URIs keep the scheme of `--input` (`s3://bucket/a.jpg`); local inputs
without a scheme become absolute paths. The result is sorted and free of duplicates, so a run
over the same input always sees the same list (which makes `--limit` and resume agree).
"""
from __future__ import annotations

import posixpath
from typing import Iterable, List, Optional

import fsspec
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_TEXT = ".txt"
MANIFEST_PARQUET = ".parquet"
_GLOB_CHARS = "*?["


def is_image_name(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_inputs(input_uri: str, storage_options: Optional[dict] = None, limit: Optional[int] = None) -> List[str]:
    """All input URIs of `input_uri`, sorted and unique; the first `limit` of them if given."""
    fs, path = fsspec.core.url_to_fs(input_uri, **(storage_options or {}))
    lowered = path.lower()
    if lowered.endswith(MANIFEST_TEXT) and fs.isfile(path):
        uris = _read_text_manifest(fs, path)
    elif lowered.endswith(MANIFEST_PARQUET) and fs.isfile(path):
        uris = _read_parquet_manifest(fs, path)
    else:
        uris = [_with_scheme(input_uri, found) for found in _walk(fs, path) if is_image_name(found)]
    uris = sorted(set(uris))
    return uris if limit is None else uris[:limit]


def pending(uris: Iterable[str], done: Iterable[str]) -> List[str]:
    """`uris` minus those in `done`, order kept: the anti-join that makes a rerun resume."""
    done = set(done)
    return [uri for uri in uris if uri not in done]


def _walk(fs, path: str) -> List[str]:
    """Files under `path`: a directory, a glob, a single file, or a bare key prefix."""
    if any(char in path for char in _GLOB_CHARS):
        files = []
        for match in fs.glob(path):
            files.extend(fs.find(match) if fs.isdir(match) else [match])
        return files
    if fs.isdir(path):
        return fs.find(path)
    if fs.isfile(path):
        return [path]
    # An object-store prefix that is not a "directory", e.g. s3://bucket/images/2024-
    parent = posixpath.dirname(path.rstrip("/"))
    if not parent or not fs.isdir(parent):
        return []
    return [found for found in fs.find(parent) if found.startswith(path)]


def _with_scheme(input_uri: str, found: str) -> str:
    """Give a listed path the scheme the user wrote (`s3://...`); plain local paths stay plain."""
    if "://" not in input_uri:
        return found
    scheme = input_uri.split("://", 1)[0]
    return f"{scheme}://{found.lstrip('/')}" if scheme != "file" else f"file://{found}"


def _read_text_manifest(fs, path: str) -> List[str]:
    with fs.open(path, "rt") as handle:
        lines = (line.strip() for line in handle)
        return [line for line in lines if line and not line.startswith("#")]


def _read_parquet_manifest(fs, path: str) -> List[str]:
    with fs.open(path, "rb") as handle:
        schema = pq.read_schema(handle)
        if "uri" not in schema.names:
            raise ValueError(f"manifest {path} has no 'uri' column (columns: {schema.names})")
        handle.seek(0)
        column = pq.read_table(handle, columns=["uri"]).column("uri")
    return [uri for uri in column.to_pylist() if uri]
