"""Decode stage: raw image bytes -> RGB uint8 array, or an error row.

Runs on CPU workers via ``Dataset.map_batches(decode_batch, batch_format="numpy")``.
Every input row produces exactly one output row: a bad image becomes ``status="error"``
with a human-readable ``error`` and never raises out of the batch.

What "decoded" means here:
- EXIF orientation is applied, so ``width``/``height`` and the array are in the
  orientation a viewer displays (a 90-degree EXIF rotation swaps width and height).
- Every PIL mode becomes 3-channel RGB: alpha is dropped (the stored colour is kept,
  as ``Image.convert("RGB")`` does), 16/32-bit integer grey is scaled to 8 bits by its
  16-bit range instead of being clipped, palette images go through RGBA so that
  transparency never produces a PIL warning, CMYK uses PIL's conversion.
- Multi-frame files (animated GIF/WebP, multi-page TIFF) give their first frame.
- Decompression bombs: the header's pixel count is checked against ``max_pixels``
  before any pixel is decoded. PIL's own hard limit (``2 * Image.MAX_IMAGE_PIXELS``)
  still applies above that and is reported the same way.
"""
from __future__ import annotations

import hashlib
import io
import struct
import time
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.redact import redact_text
from pipeline.output.schema import STATUS_SKIP

# Same as Pillow's own default warning threshold, so users get the limit they already know.
DEFAULT_MAX_PIXELS = 89_478_485

# The value of ``image`` on error rows. An empty array (not None) keeps the column a
# tensor column in Arrow: a batch of only errors would otherwise become a null-typed
# column that Ray Data cannot concatenate with the tensor blocks of other batches.
EMPTY_IMAGE_SHAPE = (0, 0, 3)


class DecodeError(ValueError):
    """The bytes are not an image we can annotate; the message says why, for a person."""


def empty_image() -> np.ndarray:
    """Placeholder image for error rows: uint8 array of shape (0, 0, 3)."""
    return np.zeros(EMPTY_IMAGE_SHAPE, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one encoded image into the displayed-orientation RGB array.

    Args:
        data: the file's raw bytes (any format Pillow reads).
        max_pixels: largest ``width * height`` accepted; larger images are refused
            before their pixels are decoded.

    Returns:
        uint8 array of shape (H, W, 3), C-contiguous, H and W after EXIF orientation.

    Raises:
        DecodeError: empty input, unknown format, truncated or corrupt data, too many
            pixels, or a pixel mode that cannot be made RGB.
    """
    if data is None or len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our max_pixels is the limit; PIL's softer warning threshold is not.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixel_count(image.size, max_pixels)
            # Image.open stands on the first frame; asking n_frames would scan every frame.
            image.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow checks its own limit inside Image.open, before we can see the size.
        raise DecodeError(
            f"image too large (possible decompression bomb): {exc} "
            f"[max_pixels={max_pixels}; Pillow refuses above {2 * (Image.MAX_IMAGE_PIXELS or 0)} regardless]"
        ) from None
    except UnidentifiedImageError:
        raise DecodeError(
            "not a recognised image format, or its header is damaged "
            f"({len(data)} bytes, starts with {_describe_head(data)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        # struct.error and IndexError escape PIL on some malformed headers.
        raise DecodeError(f"corrupt or truncated image data: {exc}") from None
    image = _apply_exif_orientation(image)
    return _to_rgb_array(image)


def decode_batch(
    batch: dict[str, np.ndarray], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function (``batch_format="numpy"``).

    Input columns: ``uri`` (str), ``bytes`` (bytes, or None/empty when the read failed),
    optional ``read_error`` (None, or why the read failed), optional ``skip`` (bool: an item
    that gets no row, passed on as status "skip"). Any other column is passed through
    unchanged; ``bytes``, ``read_error`` and ``skip`` are consumed.

    Output columns, one row per input row:
        ``uri``: str, unchanged.
        ``image``: uint8 (H, W, 3) array; an empty (0, 0, 3) array on error rows.
        ``width``, ``height``: int32, after EXIF orientation; 0 on error rows.
        ``status``: "ok", "error", or "skip".
        ``error``: None, or the reason (read errors are kept as given, credentials scrubbed).
        ``image_sha256``: hex digest of the raw bytes; None when there were no bytes.
        ``decode_s``: float64 seconds spent decoding this row.
    """
    uris = batch["uri"]
    raw = batch["bytes"]
    read_errors = batch.get("read_error")
    skipped = batch.get("skip")
    n = len(uris)

    images = np.empty(n, dtype=object)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    statuses = np.empty(n, dtype=object)
    errors = np.empty(n, dtype=object)
    digests = np.empty(n, dtype=object)
    seconds = np.zeros(n, dtype=np.float64)

    for i in range(n):
        start = time.perf_counter()
        if skipped is not None and skipped[i]:
            images[i], statuses[i], errors[i], digests[i] = empty_image(), STATUS_SKIP, None, None
            continue
        data = _as_bytes(raw[i])
        read_error = None if read_errors is None else text_or_none(read_errors[i])
        # A failed read has no bytes to hash (Ray may hand its null cell over as b"").
        digests[i] = hashlib.sha256(data).hexdigest() if data is not None and not read_error else None
        try:
            if read_error:
                raise DecodeError(read_error)
            if data is None:
                raise DecodeError("no bytes were read for this object")
            image = decode_image(data, max_pixels=max_pixels)
        except Exception as exc:  # one bad image must never fail the batch
            images[i] = empty_image()
            statuses[i] = "error"
            errors[i] = redact_text(_reason(exc))
        else:
            images[i] = image
            heights[i], widths[i] = image.shape[:2]
            statuses[i] = "ok"
            errors[i] = None
        seconds[i] = time.perf_counter() - start

    out = {k: v for k, v in batch.items() if k not in ("bytes", "read_error", "skip")}
    out.update(
        uri=uris,
        image=images,
        width=widths,
        height=heights,
        status=statuses,
        error=errors,
        image_sha256=digests,
        decode_s=seconds,
    )
    return out


def _as_bytes(value: Any) -> bytes | None:
    """The raw bytes of a cell, or None.

    A column whose values were all None in an upstream batch reaches us as Arrow nulls,
    which numpy renders as float NaN: those mean "no bytes" too.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


def text_or_none(value: Any) -> str | None:
    """A string cell of a Ray Data numpy batch as text, or None for None/NaN/empty.

    Use on any nullable string column downstream of Ray Data: a column whose values were
    all None in one batch comes back as float NaN (see ``_as_bytes``).
    """
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text or None


def _reason(exc: Exception) -> str:
    if isinstance(exc, DecodeError):
        return str(exc)
    return f"unexpected decode failure: {type(exc).__name__}: {exc}"


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds "
            f"max_pixels={max_pixels} (possible decompression bomb; raise --max-pixels to allow)"
        )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip to the displayed orientation; unreadable EXIF leaves pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A broken EXIF block should not cost an otherwise good image.
        return image


_MODES_WITH_ALPHA_OR_PALETTE = frozenset({"P", "PA", "RGBA", "RGBa", "LA", "La"})


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, 3)."""
    mode = image.mode
    if mode == "RGB":
        rgb = image
    elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return _grey16_to_rgb(np.asarray(image))
    elif mode == "F":
        return _grey_float_to_rgb(np.asarray(image, dtype=np.float32))
    elif mode in _MODES_WITH_ALPHA_OR_PALETTE:
        # Via RGBA: palette transparency is honoured without PIL's warning, then alpha dropped.
        rgb = image.convert("RGBA").convert("RGB")
    else:
        try:
            rgb = image.convert("RGB")
        except (ValueError, OSError) as exc:
            raise DecodeError(f"cannot convert pixel mode {mode!r} to RGB: {exc}") from None
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _grey16_to_rgb(values: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int holding 16-bit) grey (H, W) -> uint8 (H, W, 3), full range kept."""
    scaled = (np.clip(values.astype(np.int64), 0, 65535) * 255 + 32767) // 65535
    grey = scaled.astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _grey_float_to_rgb(values: np.ndarray) -> np.ndarray:
    """Float grey (H, W): [0, 1] data is scaled to [0, 255], anything else clipped to it."""
    finite = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if finite.size and finite.max() <= 1.0:
        finite = finite * 255.0
    grey = np.clip(np.rint(finite), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _describe_head(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return repr(head.decode("ascii"))
    return head.hex(" ")


__all__ = ["DEFAULT_MAX_PIXELS", "DecodeError", "decode_batch", "decode_image", "empty_image", "text_or_none"]
