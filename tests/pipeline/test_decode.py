"""Decode stage: every bad-input class of issue 5, at the level of decode_batch / decode_image."""
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.decode import DecodeError, decode_batch, decode_image
from tests.pipeline.bad_inputs import (
    BOMB_MAX_PIXELS,
    animated_gif,
    corpus,
    encode,
    exif_rotated_jpeg,
    grey16_png,
    jpeg,
    palette_png_with_transparency,
    photo,
    png_with_header_size,
)


def batch_of(named_bytes, **extra_columns):
    names = list(named_bytes)
    batch = {
        "uri": np.array([f"s3://bucket/in/{n}" for n in names], dtype=object),
        "bytes": np.array([named_bytes[n] for n in names], dtype=object),
    }
    batch.update({k: np.array(v, dtype=object) for k, v in extra_columns.items()})
    return batch


def rows(out):
    return [dict(zip(out.keys(), values)) for values in zip(*out.values())]


def mean_abs_diff(a, b):
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def decoded_corpus():
    cases = corpus()
    out = decode_batch(batch_of({c.name: c.data for c in cases}), max_pixels=BOMB_MAX_PIXELS)
    return cases, rows(out)


def test_one_row_per_input_in_input_order(decoded_corpus):
    cases, out = decoded_corpus
    assert [r["uri"] for r in out] == [f"s3://bucket/in/{c.name}" for c in cases]


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.name)
def test_each_bad_input_class_gets_the_expected_row(decoded_corpus, case):
    _, out = decoded_corpus
    row = next(r for r in out if r["uri"].endswith("/" + case.name))
    assert row["status"] == case.status, row["error"]
    assert row["image_sha256"] == hashlib.sha256(case.data).hexdigest()
    assert row["decode_s"] >= 0.0
    if case.status == "ok":
        assert row["error"] is None
        assert (int(row["width"]), int(row["height"])) == case.size_wh
        image = row["image"]
        assert image.dtype == np.uint8 and image.shape == (case.size_wh[1], case.size_wh[0], 3)
        assert image.flags.c_contiguous
    else:
        assert case.reason in row["error"].lower()
        assert row["image"].shape == (0, 0, 3) and row["image"].dtype == np.uint8
        assert (row["width"], row["height"]) == (0, 0)


def test_output_column_types(decoded_corpus):
    cases = corpus()
    out = decode_batch(batch_of({c.name: c.data for c in cases}), max_pixels=BOMB_MAX_PIXELS)
    assert out["width"].dtype == np.int32 and out["height"].dtype == np.int32
    assert out["decode_s"].dtype == np.float64
    assert set(out["status"]) == {"ok", "error"}
    assert "bytes" not in out and "read_error" not in out


def test_bad_rows_do_not_affect_good_rows_in_the_same_batch():
    rgb = photo(40, 30, seed=3)
    good = jpeg(rgb)
    alone = decode_image(good)
    out = decode_batch(batch_of({"a.jpg": b"", "b.jpg": good, "c.jpg": good[:100], "d.jpg": good}))
    assert list(out["status"]) == ["error", "ok", "error", "ok"]
    np.testing.assert_array_equal(out["image"][1], alone)
    np.testing.assert_array_equal(out["image"][3], alone)


def test_read_error_becomes_the_rows_reason_and_other_columns_pass_through():
    good = jpeg(photo())
    out = decode_batch(
        batch_of(
            {"gone.jpg": b"", "here.jpg": good},
            read_error=["object not found: s3://bucket/in/gone.jpg", None],
            read_s=[0.5, 0.25],
        )
    )
    assert list(out["status"]) == ["error", "ok"]
    assert "not found" in out["error"][0]
    assert out["image_sha256"][0] is None
    assert list(out["read_s"]) == [0.5, 0.25]


def test_missing_bytes_without_a_read_error_is_an_error_row():
    out = decode_batch(batch_of({"nothing.jpg": None}))
    assert out["status"][0] == "error" and "no bytes" in out["error"][0]


def test_all_null_columns_arriving_as_nan_are_read_as_missing():
    # Ray Data hands an all-None column of a batch over as Arrow nulls, which numpy shows as NaN.
    good = jpeg(photo())
    batch = {
        "uri": np.array(["a.jpg", "b.jpg"], dtype=object),
        "bytes": np.array([good, float("nan")], dtype=object),
        "read_error": np.array([np.nan, np.nan], dtype=np.float32),
    }
    out = decode_batch(batch)
    assert list(out["status"]) == ["ok", "error"]
    assert "no bytes" in out["error"][1] and out["image_sha256"][1] is None


def test_decode_stage_in_a_ray_data_plan_keeps_one_row_per_input(ray_session):
    """Batches of only errors and of only good images must concatenate into one dataset."""
    import ray

    good = jpeg(photo(40, 30))
    named = {f"bad{i}.jpg": b"" for i in range(4)} | {f"good{i}.jpg": good for i in range(4)}
    named["other_size.png"] = encode(Image.new("RGB", (7, 5), (1, 2, 3)), "PNG")
    items = [{"uri": name, "bytes": data, "read_error": None} for name, data in named.items()]
    dataset = ray.data.from_items(items, override_num_blocks=3).map_batches(
        decode_batch, batch_size=4, batch_format="numpy", fn_kwargs={"max_pixels": 10_000}
    )
    rows = {r["uri"]: r for r in dataset.iter_rows()}
    assert set(rows) == set(named)
    assert all(rows[f"bad{i}.jpg"]["status"] == "error" for i in range(4))
    assert all(rows[f"good{i}.jpg"]["image"].shape == (30, 40, 3) for i in range(4))
    assert rows["other_size.png"]["image"].shape == (5, 7, 3)


def test_truncated_jpeg_is_refused_not_padded_with_grey():
    # PIL's LOAD_TRUNCATED_IMAGES would silently fill the missing half; we must not.
    data = jpeg(photo(64, 64))
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) * 2 // 3])


def test_max_pixels_is_checked_from_the_header_before_decoding():
    with pytest.raises(DecodeError, match="25000000 pixels exceeds max_pixels=1000000"):
        decode_image(png_with_header_size(5_000, 5_000), max_pixels=1_000_000)
    # Pillow's own bomb limit (2 x MAX_IMAGE_PIXELS) still applies with a generous max_pixels.
    with pytest.raises(DecodeError, match="Pillow refuses above"):
        decode_image(png_with_header_size(50_000, 50_000), max_pixels=10**12)


def test_max_pixels_is_configurable_and_inclusive():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert decode_image(data, max_pixels=5000).shape == (50, 100, 3)
    with pytest.raises(DecodeError, match="max_pixels=4999"):
        decode_image(data, max_pixels=4999)


def test_cmyk_jpeg_keeps_its_colours():
    rgb = photo(seed=1)
    decoded = decode_image(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    # Inverted CMYK (the classic Adobe bug) would give a diff near 128.
    assert mean_abs_diff(decoded, rgb) < 6.0


def test_16_bit_png_is_scaled_not_clipped():
    data, ramp = grey16_png()
    decoded = decode_image(data)
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert np.abs(decoded[:, :, 0].astype(int) - expected).max() <= 1
    assert decoded[:, :, 0].max() == 255 and decoded[:, :, 0].min() == 0
    np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 2])


def test_palette_png_with_transparency_gives_palette_colours():
    rgb = photo(seed=2)
    data = palette_png_with_transparency(rgb)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))[:, :, :3]
    np.testing.assert_array_equal(decode_image(data), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1"])
def test_alpha_and_grey_modes_become_rgb_with_stored_colours(mode):
    rgb = photo(seed=4)
    source = Image.fromarray(rgb).convert(mode)
    if "A" in mode:
        source.putalpha(0)  # fully transparent: the colour must still be the stored one
    decoded = decode_image(encode(source, "PNG"))
    expected = np.asarray(source.convert("RGBA" if "A" in mode else "RGB").convert("RGB"))
    np.testing.assert_array_equal(decoded, expected)
    if mode != "RGBA":
        np.testing.assert_array_equal(decoded[:, :, 0], decoded[:, :, 1])


def test_exif_rotation_gives_displayed_orientation():
    stored = np.zeros((30, 60, 3), np.uint8)
    stored[:, :30] = (230, 20, 20)  # left half red
    stored[:, 30:] = (20, 20, 230)  # right half blue
    decoded = decode_image(exif_rotated_jpeg(stored))
    assert decoded.shape == (60, 30, 3)
    # Rotating 90 degrees clockwise puts the stored left half on top.
    assert mean_abs_diff(decoded, np.rot90(stored, k=-1)) < 6.0
    assert decoded[5, 15, 0] > 150 and decoded[-5, 15, 2] > 150


def test_animated_gif_gives_first_frame():
    decoded = decode_image(animated_gif([(250, 0, 0), (0, 0, 250)]))
    assert decoded.shape == (16, 24, 3)
    assert decoded[..., 0].min() > 200 and decoded[..., 2].max() < 50


def test_extreme_shapes_decode_exactly():
    one = decode_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert one.shape == (1, 1, 3) and tuple(one[0, 0]) == (10, 200, 30)
    long_rgb = photo(10_000, 3)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(long_rgb), "PNG")), long_rgb)


def test_sixteen_bit_tiff_and_float_modes_become_rgb():
    ramp = np.linspace(0, 1, 30, dtype=np.float32).reshape(3, 10)
    decoded = decode_image(encode(Image.fromarray(ramp, mode="F"), "TIFF"))
    assert decoded.shape == (3, 10, 3) and decoded[0, 0, 0] == 0 and decoded[-1, -1, 0] == 255


@pytest.mark.parametrize(
    "data, phrase",
    [
        (b"", "empty"),
        (b"GIF89a", "header is damaged"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "header is damaged"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a recognised"),
        (b"%PDF-1.4 hello", "not a recognised"),
    ],
)
def test_garbage_raises_decode_error_with_a_reason(data, phrase):
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert phrase in str(info.value).lower()


def test_multi_page_tiff_gives_first_page():
    pages = [Image.new("RGB", (9, 6), colour) for colour in ((0, 200, 0), (200, 0, 0))]
    decoded = decode_image(encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert decoded.shape == (6, 9, 3) and tuple(decoded[0, 0]) == (0, 200, 0)


def test_bundled_demo_samples_are_small_real_photos_that_decode():
    from pathlib import Path

    samples = sorted((Path(__file__).resolve().parents[2] / "jobs" / "samples").glob("*.jpg"))
    assert 3 <= len(samples) <= 4
    assert sum(p.stat().st_size for p in samples) < 300 * 1024
    for path in samples:
        image = decode_image(path.read_bytes())
        assert max(image.shape[:2]) <= 512
        assert image.std() > 20  # a photo, not a flat placeholder
