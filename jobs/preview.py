"""Render overlay PNGs of the masks so that a person can look at them.

    python -m jobs.preview --input s3://bucket/out --output ./preview -n 16

For the first ``n`` ok rows, the source image is re-read from its ``uri`` (EXIF orientation applied,
so it lines up with the masks), every mask is painted in its own colour at 50% opacity with its
outline and box, largest first so that small masks stay visible, and the result is written as
``<output>/<k>_<sha256(uri)[:20]>.png`` at the image's own size. Prompted runs also draw each
mask's prompt: its box in white, its clicks as green (foreground) or red (background) dots, its label.
"""
from __future__ import annotations

import argparse
import io
import json
import sys

import fsspec
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from jobs.export import image_file_stem, iter_ok_rows
from pipeline.decode import decode_image
from pipeline.redact import redact_text, secret_values

OVERLAY_ALPHA = 0.5
PROMPT_COLOR = (255, 255, 255)
FOREGROUND_CLICK = (0, 255, 0)
BACKGROUND_CLICK = (255, 0, 0)
CLICK_RADIUS = 3


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


def load_image(uri: str, storage_options: dict | None = None) -> np.ndarray:
    """Re-read a source image as RGB uint8 (H, W, 3), decoded exactly as the pipeline decoded it."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        return decode_image(f.read(), max_pixels=2**62)


def write_previews(input_uri: str, output_uri: str, n: int = 16, storage_options: dict | None = None) -> list[str]:
    """Render the first ``n`` ok rows; returns the written PNG paths."""
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
        path = f"{root.rstrip('/')}/{k:04d}_{image_file_stem(row['uri'])}.png"
        buffer = io.BytesIO()
        Image.fromarray(render_overlay(image, row.get("masks") or [])).save(buffer, format="PNG")
        with fs.open(path, "wb") as f:
            f.write(buffer.getvalue())
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="output directory (or one Parquet file) of jobs.annotate")
    parser.add_argument("--output", required=True, help="directory for the PNGs (local path or fsspec URL)")
    parser.add_argument("-n", type=int, default=16, help="number of images to render (default 16)")
    parser.add_argument("--storage-options", type=json.loads, default=None,
                        help="JSON object passed to fsspec for the Parquet, the images and the PNGs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = write_previews(args.input, args.output, args.n, args.storage_options)
    except (FileNotFoundError, PermissionError) as exc:
        print(f"jobs.preview: error: {redact_text(str(exc), secret_values(args.storage_options or {}))}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} previews to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
