"""Text-prompted box detection, the detector half of Grounded SAM (issue 17), with no Ray.

A Hugging Face zero-shot object detector (Grounding DINO, OWLv2, OWL-ViT) turns a text prompt
such as ``"car. person. dog."`` into boxes; the pipeline then prompts SAM with those boxes.

    from sam_core.detector import ZeroShotDetector, check_detector, parse_text_prompt, per_label_nms

    classes = parse_text_prompt("car. person. dog.")             # ["car", "person", "dog"]
    check_detector("s3://bucket/models/gdino/")                   # driver side: "grounding-dino"
    detector = ZeroShotDetector.load("s3://bucket/models/gdino/", device="cuda")
    per_image = detector.detect([img1, img2], classes)            # one Detections per image
    kept = per_label_nms(per_image[0], iou_threshold=0.5)

transformers is needed for loading and detecting only (``pip install 'sam-annotate[text]'``); it is
imported inside the functions that use it, so ``check_detector`` also runs on a driver without it.

Batching and padding (measured, transformers 5.25, CPU, fp32, random weights)
-----------------------------------------------------------------------------
Grounding DINO's processor resizes each image (shortest edge to ``shortest_edge``, capped by
``longest_edge``) and pads a batch of differently shaped results to a common size with a
``pixel_mask``. The padding is *not* transparent: the Swin backbone's windows and convolutions see
the padded zeros, so a padded image gets other boxes than it gets alone. Tiny model of
``tests/detector_factory.py``, images 64x96, 100x70, 80x80, 64x94 padded together to 91x96: the
i-th box differs by up to 80 px and the i-th score by up to 0.86 (the query order moves too);
order-free (each of an image's 20 best solo boxes against its nearest padded-batch box) still by up
to 18.7 px, and the sorted top-20 scores by up to 0.60. A Grounding-DINO-tiny-sized model (Swin-T, BERT-base, 900 queries) at
320 px, 320x480 / 480x320 / 400x400 / 320x470 padded to 480x480: nearest boxes up to 33 px apart.
Images resized to the same shape (no padding) match their solo runs: boxes 0.0 px, scores <= 5e-7.
So ``detect`` groups the images of a call by their processed shape and runs ONE forward per
group; photos of one camera give one or two groups (landscape, portrait) per batch.
OWLv2 and OWL-ViT resize every image to one fixed square, so a call is always one forward
(batched vs solo on the tiny OWLv2: boxes 0.0 px, scores <= 1e-8).

Speed (2-core Intel Xeon, torch 2.14, 2 threads): on the tiny models a batch of 4 is x1.5-1.7
faster than 4 one-image calls, but the Grounding-DINO-tiny-sized model at 320x480 is *slower*
batched (8.2 s vs 5.3 s for 4 images; one forward 1.5 s at batch 1, 9.7 s at batch 4): in the
profile the element-wise mul/cat/copy of its deformable attention and text-image fusion grow ~6x,
a sign of memory-bound work outgrowing the caches. Keep CPU batches small; GPUs are not measured yet.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from sam_core.amg.nms import box_nms
from sam_core.checkpoint import _display_name  # the one place that strips credentials from URLs

TEXT_EXTRA_HINT = "pip install 'sam-annotate[text]'"

# model_type in config.json -> family whose pre- and post-processing ``detect`` implements.
# All are models of transformers' AutoModelForZeroShotObjectDetection; others there (omdet-turbo,
# mm-grounding-dino) are left out until they are tested.
SUPPORTED_MODEL_TYPES = {"grounding-dino": "grounding-dino", "owlv2": "owl", "owlvit": "owl"}

CONFIG_NAME = "config.json"
SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")  # single file or shards
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Where an image processor's settings live: transformers 4.x writes the first, 5.x may write only
# the second (the whole processor, image processor included).
PREPROCESSOR_NAMES = ("preprocessor_config.json", "processor_config.json")
# A fast tokenizer's one file, or the vocabulary files a slow one (BERT's / CLIP's) is built from.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))

CACHE_ROOT_NAME = "sam-annotate-detectors"


class DetectorError(ValueError):
    """A detector could not be used; the one-line message says why (and never echoes credentials)."""


@dataclass
class Detections:
    """The boxes found in one image.

    boxes_xyxy: (N, 4) float64, x0, y0, x1, y1 in pixels of the original image.
    scores: (N,) float64 confidence in [0, 1].
    labels: N strings: the class name (OWL) or the prompt phrase the box matched (Grounding DINO).
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    labels: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float64), np.zeros(0, np.float64), [])

    def select(self, indices) -> "Detections":
        """The detections at ``indices`` (an int sequence or array), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Detections(self.boxes_xyxy[indices], self.scores[indices], [self.labels[i] for i in indices])


def parse_text_prompt(text: str) -> list[str]:
    """Grounding-DINO style prompt -> class names: ``"Car. person. dog."`` -> ``["car", "person", "dog"]``.

    Lowercased and stripped (Grounding DINO was trained on lowercase phrases); empty pieces and
    repeats are dropped, first occurrence kept, so the classes keep the user's order.
    """
    if not isinstance(text, str) or not text.strip():
        raise DetectorError(f"the text prompt is empty ({text!r}); give classes like 'car. person. dog.'")
    classes: list[str] = []
    for piece in text.split("."):
        name = " ".join(piece.lower().split())  # also folds inner runs of whitespace
        if name and name not in classes:
            classes.append(name)
    if not classes:
        raise DetectorError(f"the text prompt {text!r} names no class; give classes like 'car. person. dog.'")
    return classes


def class_for_phrase(phrase: str, classes: list[str]) -> Optional[str]:
    """The class of ``classes`` that a detector's label names, or None when it names none.

    OWL labels are class names already. Grounding DINO labels are the prompt words whose scores
    passed ``text_threshold``, so a box can be labelled with a fragment (``"traffic"`` for
    ``"traffic light"``), with two classes run together (``"car person"``) or with nothing.
    In that order of preference: the class itself; the class that starts earliest in the phrase
    (the longer one on a tie); the first class the phrase is part of; otherwise None.
    """
    words = [w for w in phrase.lower().replace(".", " ").split() if not (w.startswith("[") and w.endswith("]"))]
    text = " ".join(words)
    if not text:
        return None
    if text in classes:
        return text
    padded = f" {text} "
    starts = [(padded.find(f" {name} "), -len(name), name) for name in classes if f" {name} " in padded]
    if starts:
        return min(starts)[2]
    return next((name for name in classes if f" {text} " in f" {name} "), None)


def check_detector(uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> str:
    """Check, without loading anything, that ``uri`` is a usable detector directory; return its model_type.

    ``uri``: a local directory or an fsspec URL of one (``s3://b/models/gdino/``). It must hold a
    ``config.json`` whose model_type is in ``SUPPORTED_MODEL_TYPES``, safetensors weights, the image
    processor's config and the tokenizer's files. Raises ``DetectorError`` with a one-line message.
    Needs fsspec only (no transformers), so the driver can run it before any actor starts.
    """
    fs, path, shown = _open_dir(uri, storage_options)
    names = _file_names(fs, path, shown)
    return _check_listing(fs, path, names, shown)


def per_label_nms(detections: Detections, iou_threshold: float) -> Detections:
    """Greedy NMS within each label (a car never suppresses a person), highest score first.

    Same rule as ``torchvision.ops.batched_nms``: a box is dropped when its IoU with a kept,
    higher-scored box of the same label exceeds ``iou_threshold``. The result is sorted by score,
    descending (equal scores keep their input order).
    """
    return detections.select(per_label_nms_indices(detections, iou_threshold))


def per_label_nms_indices(detections: Detections, iou_threshold: float, labels=None) -> np.ndarray:
    """The indices ``per_label_nms`` keeps, in its order; ``labels`` (one per detection) replace
    ``detections.labels`` as the groups, e.g. the classes the phrases name."""
    if len(detections) == 0:
        return np.zeros(0, np.int64)
    boxes = torch.from_numpy(np.asarray(detections.boxes_xyxy, dtype=np.float64))
    scores = torch.from_numpy(np.asarray(detections.scores, dtype=np.float64))
    groups = list(detections.labels if labels is None else labels)
    group_of = np.asarray(groups, dtype=object)
    kept = []
    for label in dict.fromkeys(groups):  # unique labels, first-seen order
        members = np.flatnonzero(group_of == label)
        kept.append(members[box_nms(boxes[members], scores[members], iou_threshold).numpy()])
    kept = np.concatenate(kept)
    return kept[np.argsort(-detections.scores[kept], kind="stable")]


class ZeroShotDetector:
    """A transformers zero-shot detector and its processor, in eval mode on one device."""

    def __init__(self, model, processor, model_type: str, device: str | torch.device = "cpu"):
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DetectorError(f"unsupported detector model_type {model_type!r}; supported: {_supported()}")
        self.model = model
        self.processor = processor
        self.model_type = model_type
        self.family = SUPPORTED_MODEL_TYPES[model_type]
        self.device = torch.device(device)

    @classmethod
    def load(
        cls,
        uri: str,
        device: str | torch.device = "cpu",
        storage_options: Optional[Mapping[str, Any]] = None,
        cache_dir: Optional[str] = None,
    ) -> "ZeroShotDetector":
        """Load the detector directory at ``uri`` (checked by ``check_detector`` first).

        A remote directory is copied once per node into ``cache_dir`` (default
        ``<tempdir>/sam-annotate-detectors``) under a name hashed from the URI and its file sizes,
        so every actor on the node loads the same local copy, and a changed model gets a new one.
        Only safetensors weights are read (``use_safetensors=True``); nothing is fetched from the Hub.
        """
        transformers = _import_transformers()
        fs, path, shown = _open_dir(uri, storage_options)
        names = _file_names(fs, path, shown)
        model_type = _check_listing(fs, path, names, shown)
        local_dir = path if _is_local(fs) else _cached_copy(fs, path, names, uri, cache_dir, shown)
        try:
            model = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(
                local_dir, use_safetensors=True, local_files_only=True
            )
            processor = transformers.AutoProcessor.from_pretrained(local_dir, local_files_only=True)
        except Exception as error:  # a config transformers refuses, mis-shaped tensors, ...
            raise DetectorError(f"cannot load detector {shown}: {type(error).__name__}: {_first_line(error)}") from None
        model.eval().to(device)
        return cls(model, processor, model_type, device)

    @torch.inference_mode()
    def detect(
        self,
        images: list[np.ndarray],
        classes: list[str],
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
    ) -> list[Detections]:
        """Boxes for ``classes`` in each image: one ``Detections`` per image, in input order.

        images: HxWx3 uint8 RGB arrays, any sizes.
        classes: class names, e.g. from ``parse_text_prompt``.
        box_threshold: minimum box score. text_threshold: Grounding DINO only, minimum score of a
            prompt token for it to be part of the box's label.
        Images that the processor resizes to the same shape go through the model in ONE forward
        (see the module docstring for why differently shaped ones are not padded together).
        """
        classes = _check_classes(classes)
        for index, image in enumerate(images):
            _check_image(image, index)
        results: list[Optional[Detections]] = [None] * len(images)
        # Each image alone through the processor: exactly the tensors a solo call would use.
        encoded = [self._encode(image, classes) for image in images]
        groups: dict[tuple, list[int]] = {}
        for index, features in enumerate(encoded):
            groups.setdefault(tuple(features["pixel_values"].shape[-2:]), []).append(index)
        for indices in groups.values():
            batch = {key: torch.cat([encoded[i][key] for i in indices]).to(self.device) for key in encoded[indices[0]]}
            outputs = self.model(**batch)
            target_sizes = [tuple(images[i].shape[:2]) for i in indices]  # (H, W) of the originals
            found = self._postprocess(outputs, batch, classes, target_sizes, box_threshold, text_threshold)
            for i, detections in zip(indices, found):
                results[i] = detections
        return results

    def _encode(self, image: np.ndarray, classes: list[str]):
        """Processor tensors for one image: pixel_values (1, 3, h, w), pixel_mask (1, h, w) for
        Grounding DINO, input_ids (1, L) for Grounding DINO or (len(classes), L) for OWL."""
        if self.family == "grounding-dino":
            text = grounding_dino_text(classes)
        else:
            text = classes  # OWL: one query per class
        if not image.flags.writeable:  # Ray's arrays are read-only; torch.from_numpy would warn on each
            image = image.copy()
        features = self.processor(images=image, text=text, return_tensors="pt")
        if self.family == "grounding-dino":
            max_len = getattr(self.model.config, "max_text_len", None)
            if max_len is not None and features["input_ids"].shape[-1] > max_len:
                raise DetectorError(
                    f"the prompt is {features['input_ids'].shape[-1]} tokens, more than this Grounding DINO's "
                    f"max_text_len {max_len}; give fewer classes"
                )
        return dict(features)

    def _postprocess(self, outputs, batch, classes, target_sizes, box_threshold, text_threshold) -> list[Detections]:
        if self.family == "grounding-dino":
            post = self.processor.post_process_grounded_object_detection
            # transformers renamed box_threshold to threshold (4.5x); accept either signature.
            box_arg = "threshold" if "threshold" in inspect.signature(post).parameters else "box_threshold"
            raw = post(
                outputs,
                input_ids=batch["input_ids"],
                text_threshold=text_threshold,
                target_sizes=target_sizes,
                **{box_arg: box_threshold},
            )
            return [_to_detections(r, _grounding_dino_labels(r)) for r in raw]
        post = getattr(self.processor, "post_process_grounded_object_detection", None)
        if post is None:  # older transformers: only the image processor's generic one
            post = self.processor.image_processor.post_process_object_detection
        raw = post(outputs, threshold=box_threshold, target_sizes=target_sizes)
        return [_to_detections(r, [classes[int(i)] for i in r["labels"]]) for r in raw]


def grounding_dino_text(classes: list[str]) -> str:
    """The text Grounding DINO was trained on: lowercase phrases, each ended by a dot: ``"car. dog."``."""
    return " ".join(f"{name}." for name in classes)


# ----------------------------------------------------------------------------- helpers


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise DetectorError(f"text prompts need transformers, which is not installed: {TEXT_EXTRA_HINT}") from None
    return transformers


def _supported() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _open_dir(uri, storage_options) -> tuple[Any, str, str]:
    import fsspec

    shown = _display_name(uri)
    try:
        fs, path = fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))
    except Exception as error:  # unknown protocol, a filesystem package not installed, bad options
        raise DetectorError(f"cannot open detector {shown}: {type(error).__name__}: {_first_line(error)}") from None
    return fs, path.rstrip("/") or path, shown


def _file_names(fs, path: str, shown: str) -> dict[str, int]:
    """Base name -> size of the plain files directly in ``path``."""
    try:
        if not fs.isdir(path):
            if fs.isfile(path):
                raise DetectorError(f"detector {shown} is a file; give the model directory holding {CONFIG_NAME}")
            raise DetectorError(f"detector directory not found: {shown}")
        entries = fs.ls(path, detail=True)
    except DetectorError:
        raise
    except Exception as error:  # network, permissions
        raise DetectorError(f"cannot list detector {shown}: {type(error).__name__}: {_first_line(error)}") from None
    return {
        posixpath.basename(entry["name"].rstrip("/")): int(entry.get("size") or 0)
        for entry in entries
        if entry.get("type") == "file"
    }


def _check_listing(fs, path: str, names: Mapping[str, int], shown: str) -> str:
    if CONFIG_NAME not in names:
        raise DetectorError(
            f"{shown} is not a detector directory: no {CONFIG_NAME} (expected a Hugging Face zero-shot "
            f"object detection model saved with save_pretrained: {_supported()})"
        )
    try:
        config = json.loads(fs.cat_file(posixpath.join(path, CONFIG_NAME)))
        model_type = config.get("model_type") if isinstance(config, dict) else None
    except Exception as error:
        raise DetectorError(f"{shown}: {CONFIG_NAME} is not readable JSON ({_first_line(error)})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DetectorError(
            f"{shown} is not a zero-shot object detector: its {CONFIG_NAME} has model_type {model_type!r}; "
            f"supported: {_supported()}"
        )
    if not any(name in names for name in SAFETENSORS_NAMES):
        pickles = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise DetectorError(
                f"{shown} has only pickled weights ({', '.join(pickles)}), which are never loaded because "
                "unpickling can run code; convert them to model.safetensors (save_pretrained(..., safe_serialization=True))"
            )
        raise DetectorError(f"{shown} has no weights: expected model.safetensors next to {CONFIG_NAME}")
    if not any(name in names for name in PREPROCESSOR_NAMES):
        raise DetectorError(
            f"{shown} has no image processor config ({' or '.join(PREPROCESSOR_NAMES)}); save the processor "
            "too: AutoProcessor.from_pretrained(...).save_pretrained(dir)"
        )
    if not any(all(name in names for name in file_set) for file_set in TOKENIZER_FILE_SETS):
        raise DetectorError(
            f"{shown} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json + merges.txt); "
            "save the processor with its tokenizer: AutoProcessor.from_pretrained(...).save_pretrained(dir)"
        )
    return model_type


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _cached_copy(fs, path: str, names: Mapping[str, int], uri: str, cache_dir: Optional[str], shown: str) -> str:
    """A local copy of the remote directory, made once per node and shared by concurrent loaders.

    The files are downloaded into a private temporary directory that is then renamed into place:
    a rename is atomic, so another process sees either no copy or a complete one, and the loser of
    a race drops its own copy and uses the winner's. Pickled weights are not copied (never loaded).
    """
    wanted = {name: size for name, size in names.items() if not name.endswith(PICKLE_SUFFIXES)}
    # Keyed by the URI and the files' sizes, never by storage_options (they may hold credentials).
    fingerprint = json.dumps([str(uri), sorted(wanted.items())])
    root = cache_dir or os.path.join(tempfile.gettempdir(), CACHE_ROOT_NAME)
    final = os.path.join(root, hashlib.sha256(fingerprint.encode()).hexdigest()[:24])
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".partial-", dir=root)
    try:
        for name in wanted:
            fs.get_file(posixpath.join(path, name), os.path.join(partial, name))
        try:
            os.rename(partial, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race: a real failure
                raise
    except Exception as error:
        raise DetectorError(f"cannot copy detector {shown} to {root}: {type(error).__name__}: {_first_line(error)}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename
    return final


def _check_classes(classes) -> list[str]:
    if isinstance(classes, str) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise DetectorError(f"classes must be a non-empty list of names (see parse_text_prompt), got {classes!r}")
    if any("." in c for c in classes):
        # A dot ends a phrase in Grounding DINO's prompt; inside a name it would split the class.
        raise DetectorError(f"class names must not contain '.': {classes!r}")
    return list(classes)


def _check_image(image, index: int) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise DetectorError(f"image {index} must be an HxWx3 uint8 RGB array, got shape {shape} dtype {dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DetectorError(f"image {index} is empty: shape {image.shape}")


def _grounding_dino_labels(result) -> list[str]:
    # "text_labels" since transformers 4.51; before, "labels" held the strings.
    labels = result["text_labels"] if "text_labels" in result else dict.__getitem__(result, "labels")
    return [str(label) for label in labels]


def _to_detections(result, labels: list[str]) -> Detections:
    boxes = result["boxes"].detach().float().cpu().numpy().astype(np.float64).reshape(-1, 4)
    scores = result["scores"].detach().float().cpu().numpy().astype(np.float64).reshape(-1)
    return Detections(boxes, scores, list(labels))
