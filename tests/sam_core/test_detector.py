"""sam_core.detector: text prompt parsing, the detector-directory check, loading (local, file://,
memory://), batched detection against transformers' own one-image-at-a-time path, per-label NMS.

All models are tiny random-weight ones from tests/detector_factory.py.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from sam_core.detector import (
    DetectorError,
    Detections,
    ZeroShotDetector,
    _cached_copy,
    _file_names,
    _open_dir,
    check_detector,
    grounding_dino_text,
    parse_text_prompt,
    per_label_nms,
)
from tests.detector_factory import grounding_dino_dir, owlv2_dir, random_images, transformers_one_by_one  # noqa: F401

CLASSES = ["car", "person", "dog"]
# Five originals, four processed shapes for Grounding DINO (64x96 and 128x192 both become 64x96),
# so one group really is a batch of two; OWLv2 makes all of them 64x64.
SIZES = [(64, 96), (100, 70), (128, 192), (80, 80), (70, 120)]
# Random weights score most boxes high; these thresholds keep some and drop some.
BOX_THRESHOLD, TEXT_THRESHOLD = 0.35, 0.25


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# ----------------------------------------------------------------------------- parse_text_prompt


@pytest.mark.parametrize(
    "text, expected",
    [
        ("car. person. dog.", ["car", "person", "dog"]),
        ("car . person . dog", ["car", "person", "dog"]),
        ("Car. PERSON.", ["car", "person"]),
        ("  traffic   light .. car. ", ["traffic light", "car"]),
        ("dog. car. dog. Car.", ["dog", "car"]),
        ("cat", ["cat"]),
    ],
)
def test_parse_text_prompt(text, expected):
    assert parse_text_prompt(text) == expected
    assert grounding_dino_text(expected) == " ".join(f"{c}." for c in expected)


@pytest.mark.parametrize("text", ["", "   ", " . .. ", None])
def test_parse_text_prompt_refuses_empty(text):
    with pytest.raises(DetectorError) as error:
        parse_text_prompt(text)
    assert isinstance(error.value, ValueError)
    assert "names no class" in _one_line(error) or "empty" in _one_line(error)


# ----------------------------------------------------------------------------- check_detector


def test_check_detector_accepts_good_dirs(grounding_dino_dir, owlv2_dir):
    assert check_detector(str(grounding_dino_dir)) == "grounding-dino"
    assert check_detector(f"file://{grounding_dino_dir}/") == "grounding-dino"
    assert check_detector(str(owlv2_dir)) == "owlv2"


def _copy(source: Path, tmp_path: Path, drop=()) -> Path:
    target = tmp_path / "model"
    shutil.copytree(source, target)
    for name in drop:
        (target / name).unlink()
    return target


def test_check_detector_not_a_directory(tmp_path, grounding_dino_dir):
    with pytest.raises(DetectorError) as error:
        check_detector(str(tmp_path / "absent"))
    assert "not found" in _one_line(error)
    with pytest.raises(DetectorError) as error:
        check_detector(str(grounding_dino_dir / "config.json"))
    assert "is a file" in _one_line(error)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DetectorError) as error:
        check_detector(str(tmp_path / "photos"))
    assert "no config.json" in _one_line(error)


def test_check_detector_refuses_other_model_types(tmp_path, grounding_dino_dir):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(bert)
    with pytest.raises(DetectorError) as error:
        check_detector(str(bert))
    assert "model_type 'bert'" in _one_line(error) and "grounding-dino" in _one_line(error)

    sam = _copy(grounding_dino_dir, tmp_path)
    (sam / "config.json").write_text('{"model_type": "sam", "vision_config": {}}')
    with pytest.raises(DetectorError) as error:
        check_detector(str(sam))
    assert "model_type 'sam'" in _one_line(error)

    (sam / "config.json").write_text("{not json")
    with pytest.raises(DetectorError) as error:
        check_detector(str(sam))
    assert "not readable JSON" in _one_line(error)


def test_check_detector_refuses_pickle_only_weights(tmp_path, grounding_dino_dir):
    model = _copy(grounding_dino_dir, tmp_path, drop=["model.safetensors"])
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(DetectorError) as error:
        check_detector(str(model))
    message = _one_line(error)
    assert "pytorch_model.bin" in message and "unpickling can run code" in message
    (model / "pytorch_model.bin").unlink()
    with pytest.raises(DetectorError) as error:
        check_detector(str(model))
    assert "no weights" in _one_line(error)


def test_check_detector_missing_tokenizer_or_processor(tmp_path, grounding_dino_dir):
    tokenizer_files = [n for n in os.listdir(grounding_dino_dir) if n.startswith("tokenizer") or n == "vocab.txt"]
    model = _copy(grounding_dino_dir, tmp_path, drop=tokenizer_files)
    with pytest.raises(DetectorError) as error:
        check_detector(str(model))
    assert "no tokenizer" in _one_line(error)

    processor_files = [n for n in os.listdir(grounding_dino_dir) if n.endswith("processor_config.json")]
    shutil.rmtree(model)
    model = _copy(grounding_dino_dir, tmp_path, drop=processor_files)
    with pytest.raises(DetectorError) as error:
        check_detector(str(model))
    assert "no image processor config" in _one_line(error)


def test_check_detector_messages_never_show_credentials():
    with pytest.raises(DetectorError) as error:
        check_detector("memory://AKIAKEY:s3cr3t@bucket/models/gdino/", storage_options={"key": "opt-secret"})
    message = _one_line(error)
    assert "s3cr3t" not in message and "opt-secret" not in message and "not found" in message


def test_missing_transformers_names_the_extra(monkeypatch, grounding_dino_dir):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    assert check_detector(str(grounding_dino_dir)) == "grounding-dino"  # the check needs no transformers
    with pytest.raises(DetectorError) as error:
        ZeroShotDetector.load(str(grounding_dino_dir))
    assert "pip install 'sam-annotate[text]'" in _one_line(error)


# ----------------------------------------------------------------------------- detection parity


def _count_forwards(detector: ZeroShotDetector) -> list[int]:
    """Batch sizes of the model forwards the detector makes from now on."""
    calls: list[int] = []
    forward = detector.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(len(kwargs["pixel_values"]))
        return forward(*args, **kwargs)

    detector.model.forward = counting_forward
    return calls


@pytest.mark.oracle
@pytest.mark.parametrize("family", ["grounding-dino", "owlv2"])
def test_batched_detect_equalstransformers_one_by_one(family, grounding_dino_dir, owlv2_dir):
    model_dir = str(grounding_dino_dir if family == "grounding-dino" else owlv2_dir)
    images = random_images(SIZES, seed=1)
    detector = ZeroShotDetector.load(model_dir)
    assert detector.model_type == family and not detector.model.training
    forwards = _count_forwards(detector)
    ours = detector.detect(images, CLASSES, box_threshold=BOX_THRESHOLD, text_threshold=TEXT_THRESHOLD)
    # One forward per processed shape: Grounding DINO keeps its aspect ratio (4 shapes, one of them
    # shared by two images), OWLv2 makes every image one square.
    assert sorted(forwards) == ([1, 1, 1, 2] if family == "grounding-dino" else [len(images)])

    reference = transformers_one_by_one(model_dir, family, images, CLASSES, BOX_THRESHOLD, TEXT_THRESHOLD)
    assert len(ours) == len(images)
    total_kept = 0
    for got, (boxes, scores, labels) in zip(ours, reference):
        assert isinstance(got, Detections)
        assert got.boxes_xyxy.dtype == np.float64 and got.boxes_xyxy.shape == (len(got), 4)
        assert got.scores.dtype == np.float64 and got.scores.shape == (len(got),)
        assert got.labels == labels
        np.testing.assert_allclose(got.boxes_xyxy, boxes, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.scores, scores, atol=1e-5, rtol=0)
        total_kept += len(got)
        if family == "owlv2":
            assert set(got.labels) <= set(CLASSES)
    # Detections must occur, or the comparison proves nothing; and the threshold must bite.
    assert total_kept > 0
    everything = detector.detect(images, CLASSES, box_threshold=0.0, text_threshold=0.0)
    assert sum(len(d) for d in everything) > total_kept


def test_detect_validates_inputs(grounding_dino_dir):
    detector = ZeroShotDetector.load(str(grounding_dino_dir))
    image = random_images([(64, 64)])[0]
    assert detector.detect([], CLASSES) == []
    with pytest.raises(DetectorError, match="HxWx3 uint8"):
        detector.detect([image.astype(np.float32)], CLASSES)
    with pytest.raises(DetectorError, match="HxWx3 uint8"):
        detector.detect([image[..., 0]], CLASSES)
    with pytest.raises(DetectorError, match="must not contain"):
        detector.detect([image], ["car. dog"])
    with pytest.raises(DetectorError, match="non-empty list"):
        detector.detect([image], "car. dog.")
    with pytest.raises(DetectorError, match="max_text_len"):
        detector.detect([image], ["car"] * 40)


# ----------------------------------------------------------------------------- loading from URLs


@pytest.fixture
def memory_model(grounding_dino_dir):
    """The tiny Grounding DINO uploaded to fsspec's in-memory filesystem, with a pickle beside it."""
    fs = fsspec.filesystem("memory")
    root = "/models/gdino"
    for name in os.listdir(grounding_dino_dir):
        fs.put_file(str(grounding_dino_dir / name), f"{root}/{name}")
    fs.pipe_file(f"{root}/pytorch_model.bin", b"\x80\x02 never downloaded")
    yield f"memory://{root}/"
    fs.rm(root, recursive=True)


def test_load_from_fsspec_url_copies_once(memory_model, grounding_dino_dir, tmp_path):
    cache = tmp_path / "cache"
    assert check_detector(memory_model) == "grounding-dino"
    remote = ZeroShotDetector.load(memory_model, cache_dir=str(cache))
    (copy,) = cache.iterdir()  # one complete copy, no partial directory left
    assert sorted(os.listdir(copy)) == sorted(os.listdir(grounding_dino_dir))  # the .bin was not copied
    again = ZeroShotDetector.load(memory_model, cache_dir=str(cache))
    assert list(cache.iterdir()) == [copy]
    local = ZeroShotDetector.load(f"file://{grounding_dino_dir}")

    images = random_images([(64, 96), (90, 60)], seed=2)
    want = local.detect(images, CLASSES, box_threshold=BOX_THRESHOLD)
    for detector in (remote, again):
        for got, expected in zip(detector.detect(images, CLASSES, box_threshold=BOX_THRESHOLD), want):
            np.testing.assert_array_equal(got.boxes_xyxy, expected.boxes_xyxy)
            np.testing.assert_array_equal(got.scores, expected.scores)
            assert got.labels == expected.labels
    assert sum(len(d) for d in want) > 0


def test_concurrent_copies_end_in_one_complete_directory(memory_model, tmp_path):
    fs, path, shown = _open_dir(memory_model, None)
    names = _file_names(fs, path, shown)
    cache = tmp_path / "cache"
    results, errors = [], []
    start = threading.Barrier(4)

    def copy():
        start.wait()
        try:
            results.append(_cached_copy(fs, path, names, memory_model, str(cache), shown))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=copy) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert [p.name for p in cache.iterdir()] == [Path(results[0]).name]  # losers removed their copies
    assert check_detector(results[0]) == "grounding-dino"


# ----------------------------------------------------------------------------- per_label_nms


def test_per_label_nms_by_hand():
    detections = Detections(
        boxes_xyxy=np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float64),
        scores=np.array([0.6, 0.9, 0.8, 0.7]),
        labels=["car", "car", "dog", "car"],
    )
    kept = per_label_nms(detections, iou_threshold=0.5)
    # car 0.9 suppresses car 0.6 (IoU 0.81); the dog on the same spot stays: another label.
    assert kept.scores.tolist() == [0.9, 0.8, 0.7]
    assert kept.labels == ["car", "dog", "car"]
    np.testing.assert_array_equal(kept.boxes_xyxy, detections.boxes_xyxy[[1, 2, 3]])
    assert len(per_label_nms(Detections.empty(), 0.5)) == 0


@pytest.mark.oracle
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_per_label_nms_matches_torchvision(threshold):
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(3)
    n = 200
    xy = rng.uniform(0, 80, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (n, 2))], axis=1)
    scores = rng.permutation(n) / n  # distinct, so the order is defined
    label_ids = rng.integers(0, 3, n)
    detections = Detections(boxes, scores, [CLASSES[i] for i in label_ids])
    kept = per_label_nms(detections, threshold)
    reference = batched_nms(
        torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), torch.from_numpy(label_ids), threshold
    ).numpy()
    np.testing.assert_array_equal(kept.boxes_xyxy, boxes[reference])
    np.testing.assert_array_equal(kept.scores, scores[reference])
    assert kept.labels == [CLASSES[i] for i in label_ids[reference]]
