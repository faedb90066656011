"""jobs.preview: overlay PNGs at the image's size, painted where the masks are and untouched elsewhere."""
import numpy as np
from PIL import Image

from jobs import preview
from pipeline import schema
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
