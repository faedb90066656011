"""Prompted mode: the prompts table, the per-image checks, and masks equal to the reference predictor's."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output import schema
from pipeline.modes.prompted import PROMPTED_OUTPUT_SCHEMA, prompted_row, prompts_per_chunk, wants_multimask
from pipeline.modes.prompts import (ImagePrompts, Prompt, PromptError, check_prompts_fit, group_prompt_rows,
                                    parse_prompt_row)
from tests.sam_factory import make_official_sam, real_photos, tiny_config


# --- the prompts table -------------------------------------------------------------------------

def test_row_gives_boxes_then_points_with_their_labels_and_scores():
    prompts = parse_prompt_row({
        "boxes": [[1, 2, 30, 40]], "points": [[5, 6], [[7, 8], [9, 10]]], "point_labels": [1, [1, 0]],
        "labels": ["cat", "dog", "cup"], "scores": [0.9, 0.8, 0.7],
    })
    assert [p.index for p in prompts] == [0, 1, 2]
    assert prompts[0].box_xyxy == (1.0, 2.0, 30.0, 40.0) and prompts[0].point_coords is None
    assert prompts[1].point_coords == ((5.0, 6.0),) and prompts[1].point_labels == (1,)
    assert prompts[2].point_coords == ((7.0, 8.0), (9.0, 10.0)) and prompts[2].point_labels == (1, 0)
    assert [p.label for p in prompts] == ["cat", "dog", "cup"]
    assert [p.score for p in prompts] == [0.9, 0.8, 0.7]


def test_point_labels_default_to_foreground_and_flat_box_and_scalar_label_work():
    (point,) = parse_prompt_row({"points": [[[3, 4], [5, 6]]]})
    assert point.point_labels == (1, 1)
    (box,) = parse_prompt_row({"boxes": [0, 0, 10, 10], "label": "person", "score": 0.5})
    assert box.box_xyxy == (0.0, 0.0, 10.0, 10.0) and (box.label, box.score) == ("person", 0.5)


@pytest.mark.parametrize("row, message", [
    ({"boxes": [[10, 10, 5, 20]]}, "not XYXY"),
    ({"boxes": [[1, 2, 3]]}, "4 numbers"),
    ({"boxes": [[0, 0, float("nan"), 4]]}, "non-finite"),
    ({"boxes": [[0, 0, 4, 4]], "labels": ["a", "b"]}, "2 labels for 1 prompts"),
    ({"points": [[[1, 2], [3, 4]]], "point_labels": [[1]]}, "one label"),
    ({"points": [[1, 2]], "point_labels": [2]}, "one label"),
])
def test_malformed_rows_are_refused_with_a_reason(row, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt_row(row)


def test_rows_for_one_image_are_concatenated_and_a_bad_row_fails_only_its_image():
    grouped = group_prompt_rows([
        {"uri": "s3://b/a.jpg", "boxes": [[0, 0, 5, 5]], "labels": ["x"]},
        {"uri": "s3://b/b.jpg", "boxes": [[5, 5, 1, 1]]},
        {"uri": "s3://b/a.jpg", "points": [[1, 1]], "labels": ["y"]},
    ])
    a, b = grouped["s3://b/a.jpg"], grouped["s3://b/b.jpg"]
    assert a.error is None and [(p.index, p.label) for p in a.prompts] == [(0, "x"), (1, "y")]
    assert b.prompts == [] and "table row 1" in b.error and "not XYXY" in b.error
    assert ImagePrompts.from_json(a.uri, a.to_json()) == a


def test_prompts_outside_the_image_are_named():
    inside = Prompt(0, box_xyxy=(0, 0, 300, 200))  # touching the edges is inside
    outside = [Prompt(1, box_xyxy=(10, 10, 301, 50)), Prompt(2, point_coords=((-1, 5),), point_labels=(1,))]
    assert check_prompts_fit([inside], 300, 200) is None
    problem = check_prompts_fit([inside, *outside], 300, 200)
    assert "2 of 3 prompts lie outside the 300x200 image" in problem
    assert "prompt 1 (box [10, 10, 301, 50])" in problem and "prompt 2 (points [[-1, 5]])" in problem


def test_multimask_rule_follows_the_reference_advice():
    click = Prompt(0, point_coords=((1, 1),), point_labels=(1,))
    two_clicks = Prompt(1, point_coords=((1, 1), (2, 2)), point_labels=(1, 0))
    box = Prompt(2, box_xyxy=(0, 0, 4, 4))
    assert [wants_multimask(p) for p in (click, two_clicks, box)] == [True, False, False]
    assert wants_multimask(box, "always") and not wants_multimask(click, "never")
    with pytest.raises(ValueError):
        wants_multimask(box, "sometimes")


def test_multimask_option_reaches_the_prompted_actor():
    from jobs.annotate import build_parser, config_from_args
    from pipeline.modes import mode_for
    from pipeline.modes.prompted import PromptedAnnotator

    args = build_parser().parse_args(["--input", "i", "--output", "o", "--checkpoint", "c",
                                      "--prompts", "p.parquet", "--multimask", "never"])
    config = config_from_args(args)
    actor_class, kwargs = mode_for(config).stage(config)
    assert actor_class is PromptedAnnotator and kwargs["multimask"] == "never"


def test_chunks_bound_the_full_resolution_logits():
    assert prompts_per_chunk(64, 3, 1000, 1000, max_logits=10 * 3 * 1000 * 1000) == 10
    assert prompts_per_chunk(64, 1, 100, 100, max_logits=10**9) == 64
    assert prompts_per_chunk(64, 3, 10**5, 10**5, max_logits=10) == 1


# --- masks, against the reference predictor ---------------------------------------------------

@pytest.fixture(scope="module")
def predictors():
    """(ours, reference) predictors on the same random weights."""
    from segment_anything import SamPredictor as ReferencePredictor
    from sam_core import SamPredictor, build_sam

    reference = make_official_sam(seed=3)
    ours = build_sam(tiny_config())
    ours.load_state_dict(reference.state_dict(), strict=True)
    return SamPredictor(ours.eval()), ReferencePredictor(reference)


def _decoded(row):
    return [schema.decode_rle(m["segmentation"]) for m in row["masks"]]


def _assert_same_mask(ours, reference, iou, reference_iou):
    # Batched decoding differs from the reference's one-prompt calls by float rounding only
    # (measured: IoU within 1e-7, masks identical on these weights).
    np.testing.assert_array_equal(ours, reference)
    assert iou == pytest.approx(float(reference_iou), abs=1e-5)


@pytest.mark.oracle
@pytest.mark.parametrize("photo_index", [0, 1])
def test_boxes_and_points_match_the_reference_predictor(predictors, photo_index):
    ours, reference = predictors
    image = real_photos()[photo_index]
    height, width = image.shape[:2]
    table_row = {
        "boxes": [[0.1 * width, 0.1 * height, 0.6 * width, 0.7 * height], [0.5 * width, 0.3 * height, width, height],
                  [0, 0, width, height]],
        "points": [[0.3 * width, 0.4 * height], [0.8 * width, 0.2 * height],
                   [[0.5 * width, 0.5 * height], [0.1 * width, 0.9 * height]]],
        "point_labels": [1, 0, [1, 0]],
        "labels": ["a", "b", "c", "d", "e", "f"], "scores": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
    }
    prompts = parse_prompt_row(table_row)
    row = prompted_row(ours, "file:///photo.png", image, ImagePrompts("file:///photo.png", prompts),
                       prompts_per_batch=2)
    assert row["status"] == "ok" and row["num_masks"] == len(prompts)
    schema.rows_to_table([row], PROMPTED_OUTPUT_SCHEMA)  # fits the extended contract

    reference.set_image(image)
    for mask, record, prompt in zip(_decoded(row), row["masks"], prompts):
        if prompt.box_xyxy is not None:
            masks, ious, _ = reference.predict(box=np.array(prompt.box_xyxy), multimask_output=False)
            best = 0
        elif len(prompt.point_coords) == 1:  # single click: best of three, as the reference advises
            masks, ious, _ = reference.predict(point_coords=np.array(prompt.point_coords),
                                               point_labels=np.array(prompt.point_labels), multimask_output=True)
            assert masks.shape[0] == 3
            best = int(np.argmax(ious))
        else:
            masks, ious, _ = reference.predict(point_coords=np.array(prompt.point_coords),
                                               point_labels=np.array(prompt.point_labels), multimask_output=False)
            best = 0
        _assert_same_mask(mask, masks[best], record["predicted_iou"], ious[best])
        assert record["area"] == mask.sum()
        assert (record["prompt_index"], record["prompt_label"]) == (prompt.index, prompt.label)
        assert record["prompt_score"] == prompt.score
        assert record["prompt_box"] == (None if prompt.box_xyxy is None else list(prompt.box_xyxy))
        assert record["crop_box"] == [0.0, 0.0, float(width), float(height)]
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


@pytest.mark.oracle
def test_multimask_override_never_gives_the_single_mask_output(predictors):
    ours, reference = predictors
    image = real_photos()[2]
    click = Prompt(0, point_coords=((40.0, 30.0),), point_labels=(1,))
    row = prompted_row(ours, "u", image, ImagePrompts("u", [click]), multimask="never")
    reference.set_image(image)
    masks, ious, _ = reference.predict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]),
                                       multimask_output=False)
    _assert_same_mask(_decoded(row)[0], masks[0], row["masks"][0]["predicted_iou"], ious[0])


def test_prompts_outside_the_image_make_an_error_row_without_running_the_model():
    class NoModel:
        def set_image(self, image):
            raise AssertionError("must not encode an image whose prompts are wrong")

    image = np.zeros((20, 30, 3), np.uint8)
    prompts = ImagePrompts("u", [Prompt(0, box_xyxy=(0, 0, 40, 10))])
    row = prompted_row(NoModel(), "u", image, prompts, image_sha256="abc")
    assert (row["status"], row["width"], row["height"], row["image_sha256"]) == ("error", 30, 20, "abc")
    assert "outside the 30x20 image" in row["error"]
    empty = prompted_row(NoModel(), "u", image, ImagePrompts("u", []))
    assert (empty["status"], empty["num_masks"]) == ("ok", 0)


def test_actor_keeps_decode_errors_and_annotates_the_rest():
    from segment_anything import SamPredictor as ReferencePredictor

    from pipeline.config import AnnotateConfig
    from pipeline.modes.prompted import PROMPTS_COLUMN, PromptedAnnotator

    config = AnnotateConfig(input="in", output="out", checkpoint="unused", prompts="p.parquet").to_dict()
    actor = PromptedAnnotator(config, predictor_factory=lambda _: ReferencePredictor(make_official_sam(seed=1)))
    image = real_photos()[2]
    prompts = ImagePrompts("b", [Prompt(0, box_xyxy=(5.0, 5.0, 60.0, 40.0), label="cat")])
    batch = {
        "uri": np.array(["a", "b"], dtype=object),
        "image": np.array([np.zeros((0, 0, 3), np.uint8), image], dtype=object),
        "status": np.array(["error", "ok"], dtype=object),
        "error": np.array(["not a recognised image format", float("nan")], dtype=object),  # NaN: Ray's None
        "image_sha256": np.array([float("nan"), "abc"], dtype=object),
        PROMPTS_COLUMN: np.array([ImagePrompts("a").to_json(), prompts.to_json()], dtype=object),
        "decode_s": np.array([0.1, 0.2]),
    }
    table = actor(batch)
    assert table.schema.equals(PROMPTED_OUTPUT_SCHEMA)
    bad, good = table.to_pylist()
    assert (bad["status"], bad["error"], bad["image_sha256"]) == ("error", "not a recognised image format", None)
    assert (good["status"], good["num_masks"], good["image_sha256"]) == ("ok", 1, "abc")
    assert good["masks"][0]["prompt_label"] == "cat" and good["decode_s"] == 0.2
