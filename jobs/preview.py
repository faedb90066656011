"""Render overlay PNGs of the masks so that a person can look at them.

    python -m jobs.preview --input s3://bucket/out --output ./preview -n 16

For the first ``n`` ok rows, the source image is re-read from its ``uri`` (EXIF orientation applied,
so it lines up with the masks), every mask is painted in its own colour at 50% opacity with its
outline and box, largest first so that small masks stay visible, and the result is written at the
image's own size as ``<output>/<k>_<name>_<sha256(uri)[:8]>.png`` (see `preview_name`); one line per
PNG says which image it shows. Prompted runs also draw each mask's prompt: its box in white, its clicks
as green (foreground) or red (background) dots, its label. The previews of a demo run (random weights)
say so across their top.
"""
from __future__ import annotations

import argparse
import io
import json
import posixpath
import re
import sys

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from jobs.arguments import OneLineErrorParser, json_object
from jobs.export import image_file_stem, iter_ok_rows, readable_stem
from pipeline.inputs.decode import decode_image
from pipeline.inputs.read import fetch_bytes
from pipeline.redact import redact_text, secret_values
from pipeline.output.sink import RUN_MANIFEST

OVERLAY_ALPHA = 0.5
PROMPT_COLOR = (255, 255, 255)
FOREGROUND_CLICK = (0, 255, 0)
BACKGROUND_CLICK = (255, 0, 0)
CLICK_RADIUS = 3
DEMO_BANNER = "DEMO RUN: RANDOM WEIGHTS, THESE MASKS ARE MEANINGLESS"
DEMO_BANNER_COLOR = (200, 0, 0)
MIN_BANNER_FONT = 6  # pixels: the banner still fits a 120-pixel-wide image, on two lines
# The readable part of a PNG's name: letters, digits, "_" and "-" of the image's name, this long at most.


def mask_color(index: int) -> tuple[int, int, int]:
    """A bright colour per mask index, deterministic so that previews are reproducible."""
    rng = np.random.default_rng(index)
    hue_rgb = rng.permutation([255, int(rng.integers(0, 256)), 40])
    return tuple(int(c) for c in hue_rgb)


def decode_masks(masks: list[dict]) -> np.ndarray:
    """COCO RLE records -> bool array of shape (N, H, W)."""
    rles = [{"size": list(m["segmentation"]["size"]), "counts": m["segmentation"]["counts"].encode("ascii")}
            for m in masks]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (H, W) with a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def render_overlay(image: np.ndarray, masks: list[dict]) -> np.ndarray:
    """Paint ``masks`` (output-contract records) over ``image`` (H, W, 3 uint8); returns (H, W, 3) uint8."""
    canvas = image.astype(np.float32)
    if not masks:
        return image.copy()
    order = np.argsort([-int(m["area"]) for m in masks], kind="stable")
    decoded = decode_masks([masks[i] for i in order])
    colors = [np.array(mask_color(int(i)), dtype=np.float32) for i in order]
    for mask, color in zip(decoded, colors):
        canvas[mask] = (1 - OVERLAY_ALPHA) * canvas[mask] + OVERLAY_ALPHA * color
        canvas[_outline(mask)] = color
    result = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for rank, i in enumerate(order):
        x, y, w, h = masks[i]["bbox"]
        draw.rectangle([x, y, x + w, y + h], outline=tuple(int(c) for c in colors[rank]))
    for mask in masks:  # prompts last, so that no mask hides them
        _draw_prompt(draw, mask)
    return np.asarray(result)


def _draw_prompt(draw: ImageDraw.ImageDraw, mask: dict) -> None:
    """A prompted mask's source: its box in white, its clicks as dots, its label at the top left."""
    box = mask.get("prompt_box")
    if box:
        draw.rectangle(list(box), outline=PROMPT_COLOR)
    clicks = mask.get("prompt_points") or []
    for (x, y), label in zip(clicks, mask.get("prompt_point_labels") or [1] * len(clicks)):
        r = CLICK_RADIUS
        draw.ellipse([x - r, y - r, x + r, y + r], fill=FOREGROUND_CLICK if label == 1 else BACKGROUND_CLICK,
                     outline=PROMPT_COLOR)
    if mask.get("prompt_label"):
        x, y = (box[0], box[1]) if box else mask["bbox"][:2]
        draw.text((x + 2, y + 1), str(mask["prompt_label"]), fill=PROMPT_COLOR)


def preview_name(index: int, uri: str, key: str | None = None) -> str:
    """``<k>_<name>_<hash>.png``, e.g. ``0003_chelsea_4e6125d2.png``: our own name, never a path from the input.

    ``name`` is a shard member's key, else the URI's last path segment without its extension,
    reduced by ``jobs.export.readable_stem``; it is left out when nothing remains. A query string
    never takes part: a signed URL's signature stays out of file names. The hash of the whole URI
    tells apart images of the same name in different folders.
    """
    path = re.split(r"[?#]", uri, maxsplit=1)[0]
    last = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    stem = key or (last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last)
    readable = readable_stem(stem)
    return "_".join(part for part in (f"{index:04d}", readable, image_file_stem(uri)[:8]) if part) + ".png"


def is_demo_output(input_uri: str, storage_options: dict | None = None) -> bool:
    """Whether the latest run of this output was `sam-annotate --demo` (its `_run.json` says so)."""
    fs, path = fsspec.core.url_to_fs(input_uri, **(storage_options or {}))
    root = posixpath.dirname(path) if fs.isfile(path) else path  # --input may be one shard of the output
    manifest_path = posixpath.join(root, RUN_MANIFEST)
    if not fs.exists(manifest_path):
        return False
    with fs.open(manifest_path, "rt") as f:
        manifest = json.load(f)
    return bool((manifest.get("config") or {}).get("demo"))


def draw_demo_banner(image: Image.Image) -> None:
    """White `DEMO_BANNER` on a red band across the top of ``image``: on one line, or two on narrow images."""
    draw = ImageDraw.Draw(image)
    first, _, second = DEMO_BANNER.partition(", ")
    layouts = (DEMO_BANNER, f"{first},\n{second}")
    size = max(MIN_BANNER_FONT, min(image.height // 12, 48))
    while True:  # the largest font, one line before two, that fits the width
        font = _font(size)
        fitting = [text for text in layouts if _text_width(draw, text, font) <= image.width - 8]
        if fitting or size <= MIN_BANNER_FONT:
            text = (fitting or layouts[-1:])[0]
            break
        size -= 1
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    draw.rectangle([0, 0, image.width - 1, min(image.height, bottom - top + 8) - 1], fill=DEMO_BANNER_COLOR)
    draw.multiline_text((4 - left, 4 - top), text, fill=(255, 255, 255), font=font)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    left, _, right, _ = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def load_image(uri: str, storage_options: dict | None = None) -> np.ndarray:
    """Re-read a source image as RGB uint8 (H, W, 3), decoded exactly as the pipeline decoded it."""
    return decode_image(fetch_bytes(uri, storage_options), max_pixels=2**62)


def write_previews(input_uri: str, output_uri: str, n: int = 16, storage_options: dict | None = None,
                   demo: bool | None = None) -> list[tuple[str, str]]:
    """Render the first ``n`` ok rows; returns (written PNG path, its row's uri) pairs.

    ``demo`` (default: read from the output's `_run.json`) puts `DEMO_BANNER` on every PNG.
    """
    if demo is None:
        demo = is_demo_output(input_uri, storage_options)
    fs, root = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    written = []
    for k, row in enumerate(iter_ok_rows(input_uri, storage_options)):
        if k >= n:
            break
        image = load_image(row["uri"], storage_options)
        if image.shape[:2] != (row["height"], row["width"]):
            raise ValueError(f"{row['uri']}: image is now {image.shape[1]}x{image.shape[0]}, "
                             f"the row says {row['width']}x{row['height']}; was it replaced?")
        path = f"{root.rstrip('/')}/{preview_name(k, row['uri'], row.get('key'))}"
        picture = Image.fromarray(render_overlay(image, row.get("masks") or []))
        if demo:
            draw_demo_banner(picture)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        with fs.open(path, "wb") as f:
            f.write(buffer.getvalue())
        written.append((path, row["uri"]))
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m jobs.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="output directory (or one Parquet file) of jobs.annotate")
    parser.add_argument("--output", required=True, help="directory for the PNGs (local path or fsspec URL)")
    parser.add_argument("-n", type=int, default=16, help="number of images to render (default 16)")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="JSON object passed to fsspec for the Parquet, the images and the PNGs (default: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secrets = secret_values(args.storage_options or {})
    try:
        demo = is_demo_output(args.input, args.storage_options)
        written = write_previews(args.input, args.output, args.n, args.storage_options, demo=demo)
    except (FileNotFoundError, PermissionError, ValueError) as exc:  # ValueError: a replaced image, a bad _run.json
        print(f"jobs.preview: error: {redact_text(str(exc), secrets)}", file=sys.stderr)
        return 1
    for path, uri in written:
        print(f"{posixpath.basename(path)} <- {redact_text(uri, secrets)}")
    note = " (a demo run: random weights, the masks are meaningless)" if demo else ""
    print(f"wrote {len(written)} previews to {redact_text(args.output, secrets)}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
