"""jobs.preview: overlay PNGs at the image's size, painted where the masks are and untouched elsewhere."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from jobs import export, preview
from pipeline.output import schema
from tests.jobs.annotated_output import mask_record, write_annotated_output
from tests.sam_factory import real_photos


def test_previews_overlay_masks_on_the_upright_source(tmp_path):
    output = write_annotated_output(tmp_path)
    out_dir = tmp_path / "preview"
    assert preview.main(["--input", str(output["output"]), "--output", str(out_dir), "-n", "16"]) == 0

    ok_rows = [r for r in output["rows"] if r["status"] == "ok"]
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == len(ok_rows)
    for png, row in zip(pngs, ok_rows):
        rendered = np.asarray(Image.open(png).convert("RGB"))
        assert rendered.shape == (row["height"], row["width"], 3)
        source = preview.load_image(row["uri"])
        masks = output["masks"][row["uri"]]
        inside = np.any(masks, axis=0)
        near = inside.copy()  # masks, outlines and box edges may be painted; anything farther must not be
        for record in row["masks"]:
            x, y, w, h = (int(v) for v in record["bbox"])
            near[max(y - 1, 0): y + h + 2, max(x - 1, 0): x + w + 2] = True
        np.testing.assert_array_equal(rendered[~near], source[~near])
        changed = np.any(rendered != source, axis=-1)
        assert changed[inside].mean() > 0.9


def test_exif_rotated_source_is_read_upright(tmp_path):
    output = write_annotated_output(tmp_path)
    row = output["rows"][1]
    image = preview.load_image(row["uri"])
    np.testing.assert_array_equal(image, real_photos()[1])  # stored sideways, read back upright
    assert image.shape[:2] == (row["height"], row["width"])


def test_n_limits_the_number_of_previews(tmp_path):
    output = write_annotated_output(tmp_path)
    written = preview.write_previews(str(output["output"]), str(tmp_path / "p"), n=1)
    assert len(written) == 1


def test_prompted_masks_show_their_box_clicks_and_label():
    image = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:40, 20:60] = True
    (record,) = schema.ok_row("u", 80, 60, [mask_record(mask, 0.9)], "x")["masks"]
    record.update(prompt_box=[15.0, 5.0, 65.0, 45.0], prompt_points=[[30.0, 20.0], [50.0, 30.0]],
                  prompt_point_labels=[1, 0], prompt_label="cup")
    rendered = preview.render_overlay(image, [record])
    assert tuple(rendered[20, 30]) == preview.FOREGROUND_CLICK
    assert tuple(rendered[30, 50]) == preview.BACKGROUND_CLICK
    assert tuple(rendered[45, 40]) == preview.PROMPT_COLOR  # bottom edge of the prompt box
    plain = preview.render_overlay(image, [{k: v for k, v in record.items() if k != "prompt_label"}])
    assert np.any(rendered[5:20, 15:40] != plain[5:20, 15:40])  # the label text


# --- names after the image, the mapping printed, the demo said on the picture (issue 13) ---

PREVIEW_NAME = re.compile(r"^\d{4}_(?:[A-Za-z0-9_-]{1,40}_)?[0-9a-f]{8}\.png$")


def test_pngs_are_named_after_their_image_and_the_command_prints_which_is_which(tmp_path, capsys):
    output = write_annotated_output(tmp_path)
    out_dir = tmp_path / "preview"
    assert preview.main(["--input", str(output["output"]), "--output", str(out_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ok_rows = [r for r in output["rows"] if r["status"] == "ok"]
    assert len(lines) == len(ok_rows) + 1 and lines[-1] == f"wrote {len(ok_rows)} previews to {out_dir}"
    shown = dict(line.split(" <- ") for line in lines[:-1])
    assert sorted(shown) == sorted(p.name for p in out_dir.glob("*.png"))
    by_uri = {r["uri"]: r for r in ok_rows}
    for name, uri in shown.items():
        k = int(name[:4])
        assert name == f"{k:04d}_photo_{uri.rsplit('_', 1)[-1].split('.')[0]}_{export.image_file_stem(uri)[:8]}.png"
        rendered = Image.open(out_dir / name)
        assert rendered.size == (by_uri[uri]["width"], by_uri[uri]["height"])  # the name shows that very image


@pytest.mark.parametrize("uri, readable", [
    ("s3://bucket/images/chelsea.jpg", "chelsea"),
    ("/data/a b/Café au lait.JPG", "Cafe_au_lait"),
    ("file:///x/../../etc/passwd", "passwd"),
    ("https://h.example/get?id=../../5&sig=abc", "get"),
    ("https://b.s3.amazonaws.com/cat.jpg?X-Amz-Credential=AKIAEXAMPLE%2F1&X-Amz-Signature=5ec2e7", "cat"),
    ("s3://b/dir/..", ""),
    ("s3://b/\u0436\u0443\u043a.png", ""),
    ("C:\\photos\\holiday.2024.png", "holiday_2024"),
    ("s3://b/" + "x" * 300 + ".png", "x" * 40),
    ("s3://b/-rf .jpg", "rf"),
])
def test_preview_names_keep_only_safe_characters_and_a_hash(uri, readable):
    name = preview.preview_name(3, uri)
    assert PREVIEW_NAME.match(name), name
    expected = "_".join(part for part in ("0003", readable, export.image_file_stem(uri)[:8]) if part) + ".png"
    assert name == expected


def test_same_image_names_in_different_folders_get_different_pngs():
    assert preview.preview_name(0, "s3://b/a/cat.jpg") != preview.preview_name(0, "s3://b/b/cat.jpg")


def test_previews_of_a_demo_run_say_the_weights_are_random(tmp_path, capsys):
    output = write_annotated_output(tmp_path)
    plain_dir, demo_dir = tmp_path / "plain", tmp_path / "demo"
    assert preview.main(["--input", str(output["output"]), "--output", str(plain_dir)]) == 0
    assert "random weights" not in capsys.readouterr().out
    manifest = output["output"] / "_run.json"
    manifest.write_text(json.dumps({"config": {"demo": True, "checkpoint": "/tmp/random-tiny-sam-v1.pth"}}))
    assert preview.main(["--input", str(output["output"]), "--output", str(demo_dir)]) == 0
    assert "a demo run: random weights, the masks are meaningless" in capsys.readouterr().out.splitlines()[-1]
    for plain_png in sorted(plain_dir.glob("*.png")):
        plain = np.asarray(Image.open(plain_png).convert("RGB"))
        demo = np.asarray(Image.open(demo_dir / plain_png.name).convert("RGB"))
        band = np.all(demo == preview.DEMO_BANNER_COLOR, axis=-1).all(axis=1) | \
            np.any(demo != plain, axis=-1).any(axis=1)
        top = int(np.argmin(band))  # rows changed by the banner, from the top down
        assert 8 <= top < plain.shape[0] // 2, top
        assert (demo[:top] == preview.DEMO_BANNER_COLOR).all(axis=-1).mean() > 0.5  # a red band
        assert (demo[:top, :, 1] > 128).sum() > 50  # with white (anti-aliased) text on it
        np.testing.assert_array_equal(demo[top:], plain[top:])  # the rest is the same overlay
    # one shard of a demo output as --input: the manifest next to it still counts
    assert preview.is_demo_output(str(sorted(output["output"].glob("*.parquet"))[0]))
