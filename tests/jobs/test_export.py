"""jobs.export: COCO instances JSON that pycocotools loads, and SA-1B per-image JSON, from the Parquet."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs import export
from tests.jobs.annotated_output import write_annotated_output


@pytest.fixture
def output(tmp_path):
    return write_annotated_output(tmp_path)


def ok_rows(output):
    return [r for r in output["rows"] if r["status"] == "ok"]


def test_coco_loads_with_pycocotools_and_decodes_to_the_same_masks(output, tmp_path):
    coco_path = tmp_path / "coco.json"
    assert export.main(["--input", str(output["output"]), "--format", "coco", "--output", str(coco_path)]) == 0

    coco = COCO(str(coco_path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object"]
    images = coco.loadImgs(coco.getImgIds())
    assert sorted(i["file_name"] for i in images) == sorted(r["uri"] for r in ok_rows(output))
    for image in images:
        row = next(r for r in output["rows"] if r["uri"] == image["file_name"])
        assert (image["width"], image["height"]) == (row["width"], row["height"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        truth = output["masks"][image["file_name"]]
        assert len(annotations) == len(truth)
        for annotation, mask, record in zip(annotations, truth, row["masks"]):
            decoded = coco.annToMask(annotation).astype(bool)
            np.testing.assert_array_equal(decoded, mask)
            assert annotation["area"] == mask.sum()
            assert annotation["bbox"] == record["bbox"]
            assert annotation["score"] == pytest.approx(record["predicted_iou"])
    assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.dataset["annotations"])


def test_coco_categories_come_from_prompt_labels(tmp_path):
    output = write_annotated_output(tmp_path, prompt_labels=["cat", "cup", "cat"])
    coco_path = tmp_path / "coco.json"
    counts = export.write_coco(str(output["output"]), str(coco_path))
    coco = COCO(str(coco_path))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["cat", "cup"]
    per_image = [names[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds(imgIds=[1]))]
    assert per_image == ["cat", "cup", "cat"]
    assert (counts.images, counts.masks, counts.skipped_errors) == (3, 9, 1)


def test_sa1b_writes_one_json_per_ok_image(output, tmp_path):
    out_dir = tmp_path / "sa1b"
    counts = export.write_sa1b(str(output["output"]), str(out_dir))
    assert counts.skipped_errors == 1
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == len(ok_rows(output))
    by_uri = {}
    for path in files:
        record = json.loads(path.read_text())
        assert set(record) == {"image", "annotations"}
        assert set(record["image"]) == {"image_id", "width", "height", "file_name"}
        assert path.stem == export.image_file_stem(record["image"]["file_name"])
        by_uri[record["image"]["file_name"]] = record
    for row in ok_rows(output):
        record = by_uri[row["uri"]]
        assert (record["image"]["width"], record["image"]["height"]) == (row["width"], row["height"])
        for annotation, mask in zip(record["annotations"], output["masks"][row["uri"]]):
            assert set(export.SA1B_MASK_FIELDS) <= set(annotation)
            coco_rle = {"size": annotation["segmentation"]["size"],
                        "counts": annotation["segmentation"]["counts"].encode()}
            np.testing.assert_array_equal(mask_utils.decode(coco_rle).astype(bool), mask)
            assert annotation["area"] == mask.sum()


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        export.write_coco(str(tmp_path / "empty"), str(tmp_path / "x.json"))
    assert export.main(["--input", str(tmp_path / "empty"), "--format", "sa1b", "--output", str(tmp_path / "o")]) == 1
    assert "jobs.export: error: no .parquet files under" in capsys.readouterr().err


def test_sa1b_files_are_named_by_key_and_a_repeated_key_never_overwrites(tmp_path):
    """Row 17 of two Parquet shards both have key "17": two files, both kept."""
    import pyarrow.parquet as pq

    from pipeline.output import schema

    rows = [schema.ok_row(uri, 4, 3, [], None) for uri in ("s3://b/a.parquet#row=17", "s3://b/b.parquet#row=17",
                                                            "tar://sa_1.jpg::s3://b/s.tar", "tar://d/x y.jpg::s3://b/s.tar")]
    for row, key in zip(rows, ["17", "17", "sa_1", "d/x y"]):
        row["key"] = key
    (tmp_path / "out").mkdir()
    pq.write_table(schema.rows_to_table(rows), tmp_path / "out" / "part-x.parquet")
    counts = export.write_sa1b(str(tmp_path / "out"), str(tmp_path / "sa1b"))
    names = sorted(p.name for p in (tmp_path / "sa1b").iterdir())
    assert counts.images == 4 and len(names) == 4
    assert "17.json" in names and "sa_1.json" in names
    assert any(n.startswith("17_") for n in names) and any(n.startswith("d_x_y_") for n in names)
    files = {json.loads(p.read_text())["image"]["file_name"] for p in (tmp_path / "sa1b").iterdir()}
    assert files == {row["uri"] for row in rows}
