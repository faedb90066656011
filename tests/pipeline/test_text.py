"""Text mode: boxes, labels and scores equal transformers' own detector path, masks equal segment-anything's
predictor on those boxes, and the actor's rows for images without detections, failures and decode errors."""
import numpy as np
import pytest

from pipeline.config import AnnotateConfig, ConfigError
from pipeline.modes import mode_for
from pipeline.modes.text import TEXT_OUTPUT_SCHEMA, TextAnnotator, TextMode, kept_detections
from pipeline.output import schema
from sam_core.detector import DetectorError, Detections, class_for_phrase, parse_text_prompt
from tests.detector_factory import grounding_dino_dir, owlv2_dir, random_images, transformers_one_by_one  # noqa: F401
from tests.sam_factory import make_official_sam, real_photos, tiny_config

TEXT = "car. person. dog."
CLASSES = parse_text_prompt(TEXT)


def text_config(detector_dir, **overrides) -> dict:
    return AnnotateConfig(input="in", output="out", checkpoint="unused", text=TEXT, detector=str(detector_dir),
                          **overrides).to_dict()


def decoded_batch(images, statuses=None) -> dict:
    statuses = statuses or ["ok"] * len(images)
    return {
        "uri": np.array([f"s3://b/{k}.jpg" for k in range(len(images))], dtype=object),
        "image": np.array(images + [None], dtype=object)[:-1],
        "status": np.array(statuses, dtype=object),
        "error": np.array([None if s == "ok" else "not a recognised image format" for s in statuses], dtype=object),
        "image_sha256": np.array([f"sha{k}" for k in range(len(images))], dtype=object),
        "decode_s": np.full(len(images), 0.25),
    }


@pytest.fixture(scope="module")
def sam_pair():
    """(ours, reference) SAM models on the same random weights."""
    from sam_core import build_sam

    reference = make_official_sam(seed=5)
    ours = build_sam(tiny_config())
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.eval(), reference


def _actor(detector_dir, sam_pair, **overrides) -> TextAnnotator:
    from sam_core import SamPredictor

    return TextAnnotator(text_config(detector_dir, **overrides), predictor_factory=lambda _: SamPredictor(sam_pair[0]))


# --- class of a detector phrase ------------------------------------------------------------------

@pytest.mark.parametrize("phrase, expected", [
    ("car", "car"),
    ("person", "person"),
    ("car person", "car"),             # two classes run together: the earlier one
    ("person. car. [SEP]", "person"),   # Grounding DINO's decoded tokens, separators dropped
    ("traffic", "traffic light"),       # a fragment of a class
    ("traffic light", "traffic light"),
    ("light car", "light car"),         # a class that is itself a phrase wins over its parts
    ("[SEP]", None),
    ("", None),
    ("bird", None),
])
def test_class_for_phrase(phrase, expected):
    assert class_for_phrase(phrase, ["car", "person", "traffic light", "light car"]) == expected


def test_kept_detections_sort_clip_and_suppress_within_a_class_only():
    found = Detections(
        boxes_xyxy=np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [-5, 2, 30, 50]], np.float64),
        scores=np.array([0.5, 0.9, 0.8, 0.7]),
        labels=["car", "car person", "person", "dog"],  # the second names "car" too
    )
    kept, classes = kept_detections(found, ["car", "person", "dog"], width=20, height=40)
    assert list(kept.scores) == [0.9, 0.8, 0.7, 0.5] and classes == ["car", "person", "dog", "car"]
    assert kept.boxes_xyxy[2].tolist() == [0, 2, 20, 40]  # clipped to the 20x40 image
    assert kept.labels == ["car person", "person", "dog", "car"]  # the detector's own phrases stay
    suppressed, classes = kept_detections(found, ["car", "person", "dog"], width=20, height=40, label_nms=0.5)
    # box 0 overlaps box 1 (same class "car", IoU 0.68) and goes; box 2 is a person and stays
    assert list(suppressed.scores) == [0.9, 0.8, 0.7] and classes == ["car", "person", "dog"]


# --- parity: detector against transformers, masks against segment-anything ----------------------

@pytest.mark.oracle
@pytest.mark.parametrize("family", ["grounding-dino", "owlv2"])
def test_rows_equal_transformers_boxes_and_reference_masks_on_them(family, grounding_dino_dir, owlv2_dir, sam_pair):
    from segment_anything import SamPredictor as ReferencePredictor

    detector_dir = grounding_dino_dir if family == "grounding-dino" else owlv2_dir
    images = real_photos() + random_images([(70, 120)], seed=2)
    actor = _actor(detector_dir, sam_pair)
    encoder_batches = []
    encode = actor.predictor.set_images
    actor.predictor.set_images = lambda batch: encoder_batches.append(len(batch)) or encode(batch)
    table = actor(decoded_batch(images))
    assert table.schema.equals(TEXT_OUTPUT_SCHEMA)
    rows = table.to_pylist()

    reference_detections = transformers_one_by_one(str(detector_dir), family, images, CLASSES, 0.35, 0.25)
    reference = ReferencePredictor(sam_pair[1])
    total = 0
    for image, row, (boxes, scores, phrases) in zip(images, rows, reference_detections):
        height, width = image.shape[:2]
        assert (row["status"], row["width"], row["height"]) == ("ok", width, height)
        order = np.argsort(-scores, kind="stable")
        assert row["num_masks"] == len(boxes)
        assert [m["detector_score"] for m in row["masks"]] == pytest.approx(scores[order].tolist(), abs=1e-5)
        assert [m["detector_phrase"] for m in row["masks"]] == [phrases[i] for i in order]
        assert [m["label"] for m in row["masks"]] == [class_for_phrase(phrases[i], CLASSES) for i in order]
        expected_boxes = np.clip(boxes[order], 0, [width, height, width, height])
        got_boxes = np.array([m["prompt_box"] for m in row["masks"]]).reshape(-1, 4)
        np.testing.assert_allclose(got_boxes, expected_boxes, atol=1e-3, rtol=0)
        assert [m["prompt_index"] for m in row["masks"]] == list(range(len(boxes)))
        if len(boxes):
            reference.set_image(image)
        for mask, box in zip(row["masks"], got_boxes):
            masks, ious, _ = reference.predict(box=box, multimask_output=False)
            np.testing.assert_array_equal(schema.decode_rle(mask["segmentation"]), masks[0])
            assert mask["predicted_iou"] == pytest.approx(float(ious[0]), abs=1e-5)
            assert mask["area"] == int(masks[0].sum())
        total += len(boxes)
    assert total > 0  # boxes must occur, or the comparison proves nothing
    assert encoder_batches == [sum(1 for r in rows if r["num_masks"])]  # ONE encoder batch for the images with boxes


def test_an_image_without_detections_gets_an_ok_row_with_no_masks_and_is_not_encoded(grounding_dino_dir, sam_pair):
    actor = _actor(grounding_dino_dir, sam_pair, box_threshold=1.0)  # no score exceeds 1

    def no_encoder(images):
        assert images == [], "images without boxes must not be encoded"
        return []

    actor.predictor.set_images = no_encoder
    rows = actor(decoded_batch(random_images([(64, 96), (80, 80)]))).to_pylist()
    assert [(r["status"], r["num_masks"], r["masks"]) for r in rows] == [("ok", 0, [])] * 2
    assert [r["image_sha256"] for r in rows] == ["sha0", "sha1"] and rows[0]["decode_s"] == 0.25


def test_a_failing_image_costs_only_its_own_row_and_decode_errors_are_kept(owlv2_dir, sam_pair):
    actor = _actor(owlv2_dir, sam_pair)
    images = random_images([(64, 96), (70, 70), (80, 80)])
    detect = actor.detector.detect

    def detect_failing_on_the_square(batch, *args, **kwargs):
        if any(image.shape[:2] == (70, 70) for image in batch):
            raise RuntimeError("CUDA out of memory (simulated)")
        return detect(batch, *args, **kwargs)

    actor.detector.detect = detect_failing_on_the_square
    batch = decoded_batch(images + [np.zeros((0, 0, 3), np.uint8)], statuses=["ok", "ok", "ok", "error"])
    rows = actor(batch).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error"]
    assert "annotation failed: RuntimeError: CUDA out of memory (simulated)" == rows[1]["error"]
    assert (rows[1]["width"], rows[1]["height"]) == (70, 70)
    assert rows[3]["error"] == "not a recognised image format" and rows[3]["num_masks"] == 0
    assert rows[0]["num_masks"] > 0 and all(m["label"] in CLASSES for m in rows[0]["masks"])


# --- the mode and its settings ----------------------------------------------------------------

def test_text_picks_the_text_mode_and_its_settings_are_checked():
    config = AnnotateConfig(input="i", output="o", checkpoint="c", text=TEXT, detector="d")
    assert isinstance(mode_for(config.validate()), TextMode)
    assert mode_for(config).row_schema.equals(TEXT_OUTPUT_SCHEMA)
    for bad, message in [
        (dict(text=TEXT), "--text and --detector must be given together"),
        (dict(detector="d"), "--text and --detector must be given together"),
        (dict(text="  ", detector="d"), "--text the text prompt is empty"),
        (dict(text=" . .", detector="d"), "names no class"),
        (dict(text=TEXT, detector="d", prompts="p.parquet"), "cannot be combined"),
        (dict(text=TEXT, detector="d", box_threshold=1.5), "--box-threshold must be between 0 and 1"),
        (dict(text=TEXT, detector="d", label_nms=-0.1), "--label-nms"),
    ]:
        with pytest.raises(ConfigError, match=message):
            AnnotateConfig(input="i", output="o", checkpoint="c", **bad).validate()


def test_text_settings_belong_to_the_result_so_resume_refuses_a_changed_prompt():
    from pipeline.config import RESULT_FIELDS

    assert {"text", "detector", "box_threshold", "text_threshold", "label_nms"} <= set(RESULT_FIELDS)


def test_prepare_refuses_a_directory_that_is_not_a_detector_with_one_line(tmp_path, grounding_dino_dir):
    config = AnnotateConfig(input="i", output="o", checkpoint="c", text=TEXT, detector=str(tmp_path))
    with pytest.raises(DetectorError) as error:
        TextMode().prepare(config)
    assert "not a detector directory" in str(error.value) and "\n" not in str(error.value)
    TextMode().prepare(AnnotateConfig(input="i", output="o", checkpoint="c", text=TEXT, detector=str(grounding_dino_dir)))


def test_fast_encodes_in_bf16_where_it_pays_and_keeps_the_boxes_and_near_identical_masks(grounding_dino_dir,
                                                                                          sam_pair, monkeypatch):
    import torch

    from sam_core.amg import tuning
    from tests.mask_match import assert_masks_match

    images = real_photos()
    fp32_rows = _actor(grounding_dino_dir, sam_pair)(decoded_batch(images)).to_pylist()
    # Taken as paying here, whatever this CPU measures, so that the bf16 path runs on every machine.
    monkeypatch.setattr(tuning, "bfloat16_pays", lambda device_type, threads: True)
    fast = _actor(grounding_dino_dir, sam_pair, fast=True)
    dtypes = []
    encode = fast.predictor.set_images
    fast.predictor.set_images = lambda batch: dtypes.append(torch.get_autocast_dtype("cpu")
                                                            if torch.is_autocast_enabled("cpu") else None) \
        or encode(batch)
    fast_rows = fast(decoded_batch(images)).to_pylist()
    assert dtypes == [torch.bfloat16]  # the encoder batch ran under bf16 autocast
    assert sum(r["num_masks"] for r in fp32_rows) > 0
    for ours, reference in zip(fast_rows, fp32_rows):
        assert [m["prompt_box"] for m in ours["masks"]] == [m["prompt_box"] for m in reference["masks"]]
        assert [m["label"] for m in ours["masks"]] == [m["label"] for m in reference["masks"]]
        assert_masks_match(ours["masks"], reference["masks"], min_iou=0.9, score_atol=0.05)
