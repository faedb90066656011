"""Text mode through the whole CLI on a real S3 server (SeaweedFS): a tiny Grounding DINO and SAM read from
S3, a tar shard and loose objects in, labelled masks out, a resume that redoes nothing, and the bad inputs
that must stop the job with one line before Ray starts and before anything is written."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import annotate as cli
from jobs import export
from pipeline.modes.text import TEXT_OUTPUT_SCHEMA
from sam_core.detector import class_for_phrase
from tests.detector_factory import grounding_dino_dir  # noqa: F401 (fixture)
from tests.pipeline.shard_corpus import sa1b_members, tar_bytes
from tests.sam_factory import make_official_sam, save_official_checkpoint

pytestmark = pytest.mark.s3

PREFIX = "s3://images/text-e2e"
DETECTOR = "s3://models/text-e2e/gdino"
CHECKPOINT = "s3://models/text-e2e/tiny.pth"
TEXT = "car. person. dog."


def put_dir(fs, local: Path, remote: str) -> None:
    for path in sorted(local.iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{remote}/{path.name}")


@pytest.fixture(scope="module")
def corpus(s3, ray_session, grounding_dino_dir, tmp_path_factory):
    fs = s3.filesystem()
    fs.pipe(f"{PREFIX}/shards/sa_000000.tar", tar_bytes(sa1b_members(0, 3)))
    for key, data in sa1b_members(10, 2):
        if key.endswith(".jpg"):
            fs.pipe(f"{PREFIX}/loose/{key}", data)
    put_dir(fs, Path(grounding_dino_dir), DETECTOR)
    checkpoint = save_official_checkpoint(make_official_sam(seed=13), tmp_path_factory.mktemp("ckpt") / "t.pth")
    fs.put_file(str(checkpoint), CHECKPOINT.removeprefix("s3://"))
    return fs


def annotate(output: str, *args) -> int:
    return cli.main(["--output", output, "--checkpoint", CHECKPOINT, "--num-actors", "1", "--batch-size", "2",
                     "--no-progress", *args])


def rows_of(fs, output: str) -> dict:
    fs.invalidate_cache()
    table = pq.read_table(output.removeprefix("s3://"), filesystem=fs)
    return table, {row["uri"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def text_run(corpus):
    output = "s3://annotations/text-e2e/out"
    inputs = f"{PREFIX}/shards/sa_000000.tar"
    assert annotate(output, "--input", inputs, "--text", TEXT, "--detector", DETECTOR, "--label-nms", "0.7") == 0
    table, rows = rows_of(corpus, output)
    return {"output": output, "input": inputs, "table": table, "rows": rows}


def test_every_shard_image_gets_labelled_masks(text_run):
    rows = text_run["rows"]
    assert sorted(row["key"] for row in rows.values()) == ["sa_0", "sa_1", "sa_2"]
    for name in TEXT_OUTPUT_SCHEMA.names:
        assert text_run["table"].schema.field(name).type == TEXT_OUTPUT_SCHEMA.field(name).type
    masks = [mask for row in rows.values() for mask in row["masks"]]
    assert all(row["status"] == "ok" for row in rows.values()) and masks
    for mask in masks:
        assert mask["label"] == class_for_phrase(mask["detector_phrase"], ["car", "person", "dog"])
        assert 0.35 < mask["detector_score"] <= 1.0 and len(mask["prompt_box"]) == 4
    assert any(mask["label"] is not None for mask in masks)


def test_resume_redoes_nothing_and_a_changed_prompt_is_refused(text_run, corpus, monkeypatch, capsys):
    def no_ray(address):
        raise AssertionError("a rerun with nothing to do must not start Ray")

    with monkeypatch.context() as patch:
        patch.setattr(cli, "init_ray", no_ray)
        args = ["--input", text_run["input"], "--text", TEXT, "--detector", DETECTOR, "--label-nms", "0.7"]
        assert annotate(text_run["output"], *args) == 0
        capsys.readouterr()
        assert annotate(text_run["output"], "--input", text_run["input"], "--text", "cat.", "--detector",
                        DETECTOR, "--label-nms", "0.7") == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "text" in error
    assert rows_of(corpus, text_run["output"])[1].keys() == text_run["rows"].keys()


def test_loose_objects_and_coco_export_use_the_labels_as_categories(corpus, tmp_path):
    output = "s3://annotations/text-e2e/loose"
    assert annotate(output, "--input", f"{PREFIX}/loose/", "--text", TEXT, "--detector", DETECTOR) == 0
    _, rows = rows_of(corpus, output)
    assert sorted(rows) == [f"{PREFIX}/loose/sa_{n}.jpg" for n in (10, 11)]
    export.main(["--input", output, "--output", str(tmp_path / "coco.json"), "--format", "coco"])
    coco = json.loads((tmp_path / "coco.json").read_text())
    labels = {m["label"] for row in rows.values() for m in row["masks"] if m["label"]}
    assert {c["name"] for c in coco["categories"]} - {"object"} == labels and labels
    assert len(coco["annotations"]) == sum(row["num_masks"] for row in rows.values())


@pytest.mark.parametrize("case", ["not_a_detector", "no_tokenizer", "empty_text"])
def test_bad_detector_or_text_stops_with_one_line_before_ray_and_writes_nothing(case, corpus, grounding_dino_dir,
                                                                                monkeypatch, capsys):
    detector = DETECTOR
    text = TEXT
    if case == "not_a_detector":
        detector = f"{PREFIX}/shards"  # a directory, but of images
    elif case == "no_tokenizer":
        detector = "s3://models/text-e2e/gdino-no-tokenizer"
        put_dir(corpus, Path(grounding_dino_dir), detector)
        for name in ("vocab.txt", "tokenizer.json"):
            if corpus.exists(f"{detector}/{name}"):
                corpus.rm_file(f"{detector}/{name}")
        assert not any(corpus.exists(f"{detector}/{name}") for name in ("vocab.txt", "tokenizer.json"))
    else:
        text = " . "
    output = f"s3://annotations/text-e2e/bad-{case}"

    def no_ray(address):
        raise AssertionError("bad input must stop the job before Ray starts")

    monkeypatch.setattr(cli, "init_ray", no_ray)
    code = annotate(output, "--input", f"{PREFIX}/loose/", "--text", text, "--detector", detector)
    error = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2)
    assert len(error) == 1 and error[0].startswith("sam-annotate: error:")
    expected = {"not_a_detector": "not a detector directory", "no_tokenizer": "has no tokenizer",
                "empty_text": "names no class"}[case]
    assert expected in error[0]
    corpus.invalidate_cache()
    assert not corpus.exists(output.removeprefix("s3://"))
