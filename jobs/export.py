"""Export the annotation Parquet to COCO instances JSON or SA-1B per-image JSON.

    python -m jobs.export --input s3://bucket/out --format coco --output s3://bucket/out.coco.json
    python -m jobs.export --input ./out --format sa1b --output ./out-sa1b/

Reads the Parquet shards with plain pyarrow over fsspec (no Ray, no model), so it runs on a laptop
against the same bucket the job wrote to. Only rows with ``status == "ok"`` are exported; error rows
are counted and reported.

COCO: one JSON with ``images`` (``file_name`` is the source URI), ``annotations`` (compressed RLE
``segmentation``, ``area``, ``bbox`` XYWH, ``score`` = predicted IoU, ``iscrowd`` 0) and
``categories``. Every mask is category ``"object"`` unless it has a class: its ``label`` in a text-mode
run (``--text``), its ``prompt_label`` in a prompted run; each distinct one becomes a category.
Prompt and detector metadata (``prompt_*``, ``label``, ``detector_*`` fields) is carried into both
formats when present.

SA-1B: one JSON per image, ``{"image": {...}, "annotations": [...]}`` as in Meta's SA-1B release,
named ``<sha256(uri)[:20]>.json`` so that object names never come from user-controlled paths.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import unicodedata
import sys
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import pyarrow.parquet as pq

from jobs.arguments import OneLineErrorParser, json_object
from pipeline.redact import redact_text, secret_values

DEFAULT_CATEGORY = "object"
# Extra mask fields written by prompted runs (pipeline/modes/prompted.py) and text runs
# (pipeline/modes/text.py); absent or null in AMG runs.
PROMPT_FIELDS = ("prompt_index", "prompt_box", "prompt_points", "prompt_point_labels", "prompt_label", "prompt_score",
                 "label", "detector_score", "detector_phrase")
SA1B_MASK_FIELDS = ("segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box")


def parquet_files(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet data files under ``uri`` (a directory or a single file), sorted for a stable order.

    As pyarrow's dataset discovery does, names below ``uri`` that start with ``_`` or ``.`` are
    skipped, files and folders alike (commit records, listing snapshots, manifests, temporaries).
    """
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if fs.isfile(path):
        return fs, [path]
    root = path.rstrip("/") + "/"
    files = [
        p for p in fs.find(path)
        if p.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in p[len(root):].split("/"))
    ]
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri}")
    return fs, sorted(files)


def iter_rows(uri: str, storage_options: dict | None = None, columns: list[str] | None = None,
              batch_size: int = 64) -> Iterator[dict]:
    """Yield output rows as plain dicts, shard by shard, without loading the whole table."""
    fs, files = parquet_files(uri, storage_options)
    for path in files:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            wanted = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_size, columns=wanted):
                yield from batch.to_pylist()


def iter_ok_rows(uri: str, storage_options: dict | None = None, counts: "ExportCounts | None" = None,
                 columns: list[str] | None = None) -> Iterator[dict]:
    """Rows with ``status == "ok"``; error rows are only counted."""
    for row in iter_rows(uri, storage_options, columns):
        if row.get("status") != "ok":
            if counts is not None:
                counts.skipped_errors += 1
            continue
        if counts is not None:
            counts.images += 1
            counts.masks += len(row.get("masks") or [])
        yield row


@dataclass
class ExportCounts:
    images: int = 0
    masks: int = 0
    skipped_errors: int = 0
    categories: dict[str, int] = field(default_factory=dict)


def image_file_stem(uri: str) -> str:
    """Our own name for per-image output files: a hash of the URI, never the user's path."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


READABLE_NAME_CHARS = 40
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]+")


def readable_stem(text: str) -> str:
    """``text`` reduced to ``[A-Za-z0-9_-]`` (accents dropped, anything else a ``_``), at most
    `READABLE_NAME_CHARS`: a part of a name that we make, never a path from the input."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _NOT_IN_NAMES.sub("_", ascii_text).strip("_-")[:READABLE_NAME_CHARS].strip("_-")


def sa1b_file_stem(row: dict) -> str:
    """A shard member's file is named by its key (``sa_1``), as SA-1B names its own JSON files.

    A key that is not already a plain name (``dir/sa 1``) is reduced by ``readable_stem`` and
    given a hash, so two keys never share a file; rows without a key keep the URI hash.
    """
    key = row.get("key")
    if not key:
        return image_file_stem(row["uri"])
    readable = readable_stem(key)
    return readable if readable == key else f"{readable}_{image_file_stem(key)[:8]}".lstrip("_")


def _coco_annotation(mask: dict, annotation_id: int, image_id: int, category_id: int) -> dict:
    segmentation = mask["segmentation"]
    annotation = {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": {"size": list(segmentation["size"]), "counts": segmentation["counts"]},
        "area": int(mask["area"]),
        "bbox": [float(v) for v in mask["bbox"]],
        "score": float(mask["predicted_iou"]),
        "iscrowd": 0,
    }
    for key in ("stability_score", *PROMPT_FIELDS):
        if mask.get(key) is not None:
            annotation[key] = mask[key]
    return annotation


def write_coco(input_uri: str, output_uri: str, storage_options: dict | None = None) -> ExportCounts:
    """Write one COCO instances JSON, streaming: images and annotations are two passes over the shards.

    Image ids are 1-based in shard order, so both passes agree without holding the table in memory.
    """
    counts = ExportCounts()
    with fsspec.open(output_uri, "w", encoding="utf-8", **(storage_options or {})) as out:
        out.write('{"info": {"description": "sam-annotate export"}, "images": [')
        image_columns = ["uri", "width", "height", "status"]
        for image_id, row in enumerate(iter_ok_rows(input_uri, storage_options, columns=image_columns), start=1):
            image = {"id": image_id, "file_name": row["uri"], "width": row["width"], "height": row["height"]}
            out.write(("" if image_id == 1 else ",") + json.dumps(image))
        out.write('], "annotations": [')
        annotation_id = 0
        for image_id, row in enumerate(iter_ok_rows(input_uri, storage_options, counts), start=1):
            for mask in row.get("masks") or []:
                label = mask.get("label") or mask.get("prompt_label") or DEFAULT_CATEGORY
                category_id = counts.categories.setdefault(label, len(counts.categories) + 1)
                annotation_id += 1
                annotation = _coco_annotation(mask, annotation_id, image_id, category_id)
                out.write(("" if annotation_id == 1 else ",") + json.dumps(annotation))
        categories = [{"id": i, "name": name, "supercategory": name} for name, i in counts.categories.items()]
        if not categories:
            categories = [{"id": 1, "name": DEFAULT_CATEGORY, "supercategory": DEFAULT_CATEGORY}]
        out.write('], "categories": ' + json.dumps(categories) + "}")
    return counts


def sa1b_record(row: dict, image_id: int) -> dict:
    """One image's SA-1B JSON: ``{"image": {...}, "annotations": [...]}``."""
    annotations = []
    for index, mask in enumerate(row.get("masks") or []):
        annotation = {"id": index}
        for key in SA1B_MASK_FIELDS:
            annotation[key] = mask.get(key)
        annotation["segmentation"] = {
            "size": list(mask["segmentation"]["size"]), "counts": mask["segmentation"]["counts"],
        }
        for key in PROMPT_FIELDS:
            if mask.get(key) is not None:
                annotation[key] = mask[key]
        annotations.append(annotation)
    image = {"image_id": image_id, "width": row["width"], "height": row["height"], "file_name": row["uri"]}
    return {"image": image, "annotations": annotations}


def write_sa1b(input_uri: str, output_uri: str, storage_options: dict | None = None) -> ExportCounts:
    """Write ``<output>/<key>.json`` per ok image (``sa1b_file_stem``: the shard key, else a URI hash)."""
    counts = ExportCounts()
    fs, root = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    used: set[str] = set()  # keys repeat across shards (Parquet row indices, WebDataset keys)
    for image_id, row in enumerate(iter_ok_rows(input_uri, storage_options, counts), start=1):
        stem = sa1b_file_stem(row)
        if stem in used:
            stem = f"{stem}_{image_file_stem(row['uri'])[:8]}"
        used.add(stem)
        with fs.open(f"{root.rstrip('/')}/{stem}.json", "w") as out:
            json.dump(sa1b_record(row, image_id), out)
    return counts


WRITERS = {"coco": write_coco, "sa1b": write_sa1b}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="output directory (or one Parquet file) of jobs.annotate")
    parser.add_argument("--format", required=True, choices=sorted(WRITERS), help="coco: one instances JSON; "
                        "sa1b: one JSON per image")
    parser.add_argument("--output", required=True, help="coco: a JSON file URI; sa1b: a directory URI")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="JSON object passed to fsspec for both input and output (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = WRITERS[args.format](args.input, args.output, args.storage_options)
    except (FileNotFoundError, PermissionError) as exc:
        print(f"jobs.export: error: {redact_text(str(exc), secret_values(args.storage_options or {}))}", file=sys.stderr)
        return 1
    print(f"exported {counts.images} images, {counts.masks} masks as {args.format} to {args.output}"
          f" ({counts.skipped_errors} error rows skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
