"""The bad-input corpus of issue 5, as encoded bytes, built in memory from real photos.

Each case says what the decode stage must make of it: an ``ok`` row with a known displayed
size, or an ``error`` row whose reason contains a known phrase. Unit tests feed the bytes to
``decode_batch``; the end-to-end test writes them to storage under their file names.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112
# Orientation 6: the stored pixels must be rotated 90 degrees clockwise for display.
EXIF_ROTATE_90_CW = 6

BOMB_MAX_PIXELS = 1_000_000  # the --max-pixels the corpus is run with


@dataclass(frozen=True)
class Case:
    name: str  # file name, extension included
    data: bytes
    status: str  # "ok" or "error"
    size_wh: tuple[int, int] | None = None  # displayed (width, height) for ok rows
    reason: str | None = None  # phrase the error must contain, lower case


def photo(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth, non-square RGB uint8 image (H, W, 3) that survives JPEG with small error."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(40, 200, size=3)
    image = np.stack(
        [base[0] + 50 * np.sin(xx / 7.0), base[1] + 50 * np.cos(yy / 5.0), base[2] + 0.5 * (xx - yy)],
        axis=-1,
    )
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(array: np.ndarray, **params) -> bytes:
    return encode(Image.fromarray(array), "JPEG", quality=95, **params)


def exif_rotated_jpeg(array: np.ndarray) -> bytes:
    """JPEG of ``array`` as stored, tagged EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = EXIF_ROTATE_90_CW
    return jpeg(array, exif=exif.tobytes())


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but holds one pixel's data.

    That is what a decompression bomb looks like to a guard that must refuse it from the
    header alone: no test ever allocates the claimed pixels.
    """
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr_start = 8 + 4  # signature, then chunk length
    assert data[ihdr_start : ihdr_start + 4] == b"IHDR"
    data[ihdr_start + 4 : ihdr_start + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr_start : ihdr_start + 4 + 13])) & 0xFFFFFFFF
    data[ihdr_start + 17 : ihdr_start + 21] = struct.pack(">I", crc)
    return bytes(data)


def animated_gif(colours: list[tuple[int, int, int]], size_wh: tuple[int, int] = (24, 16)) -> bytes:
    frames = [Image.new("RGB", size_wh, colour) for colour in colours]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png_with_transparency(array: np.ndarray) -> bytes:
    image = Image.fromarray(array).quantize(colors=16)
    return encode(image, "PNG", transparency=0)


def grey16_png(width: int = 40, height: int = 10) -> tuple[bytes, np.ndarray]:
    """16-bit grey PNG holding a full-range ramp, and the ramp (H, W) uint16."""
    ramp = np.linspace(0, 65535, width * height).round().astype(np.uint16).reshape(height, width)
    return encode(Image.fromarray(ramp), "PNG"), ramp


def corpus() -> list[Case]:
    """Every bad-input class of issue 5 (except deleted objects, which only storage can do)."""
    rgb = photo()
    h, w = rgb.shape[:2]
    good_jpeg = jpeg(rgb)
    grey16, _ = grey16_png()
    return [
        Case("good.jpg", good_jpeg, "ok", (w, h)),
        Case("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "error", reason="truncated"),
        Case("zero.jpg", b"", "error", reason="empty"),
        Case("page.jpg", b"<!DOCTYPE html><html><body>Not found</body></html>\n", "error",
             reason="not a recognised image"),
        Case("notes.png", b"just some text, not a picture\n" * 4, "error", reason="not a recognised image"),
        Case("bomb.png", encode(Image.new("L", (1200, 1000)), "PNG"), "error", reason="max_pixels"),
        Case("huge_header.png", png_with_header_size(50_000, 50_000), "error", reason="max_pixels"),
        Case("cmyk.jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), "ok", (w, h)),
        Case("grey16.png", grey16, "ok", (40, 10)),
        Case("palette.png", palette_png_with_transparency(rgb), "ok", (w, h)),
        Case("rgba.png", encode(Image.fromarray(rgb).convert("RGBA"), "PNG"), "ok", (w, h)),
        Case("la.png", encode(Image.fromarray(rgb).convert("LA"), "PNG"), "ok", (w, h)),
        Case("grey.png", encode(Image.fromarray(rgb).convert("L"), "PNG"), "ok", (w, h)),
        Case("bilevel.png", encode(Image.fromarray(rgb).convert("1"), "PNG"), "ok", (w, h)),
        Case("rotated.jpg", exif_rotated_jpeg(rgb), "ok", (h, w)),
        Case("one_pixel.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), "ok", (1, 1)),
        Case("elongated.png", encode(Image.fromarray(photo(10_000, 3)), "PNG"), "ok", (10_000, 3)),
        Case("animated.gif", animated_gif([(250, 0, 0), (0, 0, 250), (0, 250, 0)]), "ok", (24, 16)),
    ]
