"""Text mode throughput: the job's batched stage against the one-image-at-a-time Grounded-SAM loop.

    OMP_NUM_THREADS=2 python bench/text_bench.py                       # tiny detector and SAM
    python bench/text_bench.py --detector gdino-tiny --sam vit_b --images 8 --long-side 480 --json out.json

Both sides use the same random weights and the same photos:
1. ours: the job's actor, ``pipeline.modes.text.TextAnnotator``, fed batches of ``--batch-size``
   decoded images: one detector call per batch (``sam_core.detector``), one SAM encoder batch,
   box prompts decoded in batches; rows with COCO RLE masks out;
2. the loop the Grounded-SAM notebooks run: per image, transformers' processor, model and
   ``post_process_grounded_object_detection``, then segment-anything's ``SamPredictor.set_image`` and one
   ``predict_torch`` over all of the image's boxes (``multimask_output=False``).
It checks that both find the same boxes, scores and labels and the same masks, then prints img/s
for both and the ratio, with the CPU it ran on. Random weights: the boxes are meaningless, the timings
are not. ``--detector gdino-tiny`` builds Grounding DINO's published tiny shapes (Swin-T, BERT-base,
900 queries); ``--shortest-edge``/``--longest-edge`` set its processor (800/1333 as published).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.prompted_bench import build_models, photos, timed  # noqa: E402
from bench.report import cpu_model, emit  # noqa: E402
from pipeline.config import AnnotateConfig  # noqa: E402
from pipeline.output import schema  # noqa: E402

TEXT = "car. person. dog."
# Batched and one-at-a-time runs round differently; a logit at the threshold may flip a pixel.
MAX_DIFFERING_FRACTION = 1e-5
# --fast (bf16 encoder): near-identical masks, counted as the AMG bench counts them.
FAST_MIN_IOU, FAST_MATCHED = 0.95, 0.95
QUERY_NORM_SCALE = 0.1


def build_detector(kind: str, path: Path, shortest_edge: int, longest_edge: int) -> Path:
    from tests.detector_factory import GDINO_TINY_SIZES, make_grounding_dino_dir

    if kind == "tiny":
        return make_grounding_dino_dir(path, seed=0)
    make_grounding_dino_dir(path, seed=0, sizes=GDINO_TINY_SIZES, shortest_edge=shortest_edge,
                            longest_edge=longest_edge)
    # At these depths random weights put most of the 900 queries' scores at 1.0: every query would be
    # a box. Shrinking the decoder's output norm (whose output is dotted with the text to score a
    # query) spreads the scores, so that a threshold (--boxes-per-image) leaves a trained model's
    # handful of boxes per image.
    from safetensors.torch import load_file, save_file

    weights_path = path / "model.safetensors"
    weights = load_file(str(weights_path))
    for name in ("model.decoder.layer_norm.weight", "model.decoder.layer_norm.bias"):
        weights[name] = weights[name] * QUERY_NORM_SCALE
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    return path


def threshold_for(detector_dir: Path, images, boxes_per_image: int, device: str = "cpu") -> float:
    """The box score that leaves about ``boxes_per_image`` boxes per image (the median image's)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(str(detector_dir), use_safetensors=True)
    model = model.eval().to(device)
    processor = AutoProcessor.from_pretrained(str(detector_dir))
    kth = []
    for image in images:
        outputs = model(**processor(images=image, text=TEXT, return_tensors="pt").to(device))
        scores = outputs.logits.sigmoid().max(-1).values[0].sort(descending=True).values
        kth.append(float(scores[min(boxes_per_image, len(scores) - 1)]))
    return float(np.median(kth))


def notebook_loop(detector_dir: Path, reference_sam, images, box_threshold: float, text_threshold: float,
                  device: str = "cpu"):
    """Grounded SAM as its notebooks run it, one image at a time; per image (boxes, scores, phrases, masks)."""
    from segment_anything import SamPredictor
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(str(detector_dir), use_safetensors=True)
    model = model.eval().to(device)
    processor = AutoProcessor.from_pretrained(str(detector_dir))
    predictor = SamPredictor(reference_sam.to(device))

    def run():
        results = []
        for image in images:
            inputs = processor(images=image, text=TEXT, return_tensors="pt").to(device)
            outputs = model(**inputs)
            found = processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=box_threshold, text_threshold=text_threshold,
                target_sizes=[image.shape[:2]])[0]
            found = {key: value.cpu() if hasattr(value, "cpu") else value for key, value in found.items()}
            boxes = found["boxes"]
            masks = np.zeros((0,) + image.shape[:2], bool)
            if len(boxes):
                predictor.set_image(image)
                clipped = boxes.clamp(min=0)
                clipped[:, 0::2] = clipped[:, 0::2].clamp(max=image.shape[1])
                clipped[:, 1::2] = clipped[:, 1::2].clamp(max=image.shape[0])
                transformed = predictor.transform.apply_boxes_torch(clipped, image.shape[:2]).to(device)
                masks, _, _ = predictor.predict_torch(None, None, boxes=transformed, multimask_output=False)
                masks = masks[:, 0].cpu().numpy()
            results.append((clipped.numpy() if len(boxes) else boxes.numpy(), found["scores"].numpy(),
                            list(found["text_labels"]), masks))
        return results

    return run


def job_stage(detector_dir: Path, ours_sam, images, batch_size: int, box_threshold: float, text_threshold: float,
              fast: bool = False):
    """The job's actor over the images in batches of ``batch_size``; returns a callable giving the rows."""
    from pipeline.modes.text import TextAnnotator
    from sam_core import SamPredictor

    config = AnnotateConfig(input="bench", output="bench", checkpoint="bench", text=TEXT,
                            detector=str(detector_dir), box_threshold=box_threshold,
                            text_threshold=text_threshold, batch_size=batch_size, fast=fast).to_dict()
    # The actor puts the detector on CUDA when it sees one (pick_device); SAM goes where ours_sam is.
    actor = TextAnnotator(config, predictor_factory=lambda _: SamPredictor(ours_sam))

    def run():
        rows = []
        for start in range(0, len(images), batch_size):
            chunk = images[start: start + batch_size]
            batch = {"uri": np.array([f"image-{start + k}" for k in range(len(chunk))], dtype=object),
                     "image": np.array(chunk + [None], dtype=object)[:-1],
                     "status": np.array(["ok"] * len(chunk), dtype=object),
                     "error": np.array([None] * len(chunk), dtype=object)}
            rows += actor(batch).to_pylist()
        return rows

    return run


def compare(rows, expected, fast: bool = False) -> dict:
    """How far the job's rows are from the notebook loop's results.

    Boxes, scores and labels must agree (the detector is the same fp32 model on both sides). Masks:
    within float rounding in fp32; with ``fast`` (bf16 encoder) at least FAST_MATCHED of them at
    IoU >= FAST_MIN_IOU, as the AMG bench counts its fast path.
    """
    box_diff, score_diff, differing, pixels, labels_equal, ious = 0.0, 0.0, 0, 0, True, []
    for row, (boxes, scores, phrases, reference_masks) in zip(rows, expected):
        order = np.argsort(-scores, kind="stable")
        if row["num_masks"] != len(boxes):
            return {"equal": False, "why": f"{row['uri']}: {row['num_masks']} masks, the loop {len(boxes)}"}
        got_boxes = np.array([m["prompt_box"] for m in row["masks"]]).reshape(-1, 4)
        if len(boxes):
            box_diff = max(box_diff, float(np.abs(got_boxes - boxes[order]).max()))
            score_diff = max(score_diff, float(np.abs(np.array([m["detector_score"] for m in row["masks"]])
                                                      - scores[order]).max()))
        labels_equal &= [m["detector_phrase"] for m in row["masks"]] == [phrases[i] for i in order]
        for mask, k in zip(row["masks"], order):
            ours, theirs = schema.decode_rle(mask["segmentation"]), reference_masks[k]
            differing += int((ours != theirs).sum())
            pixels += theirs.size
            union = int((ours | theirs).sum())
            ious.append(1.0 if union == 0 else int((ours & theirs).sum()) / union)
    matched = float(np.mean(np.array(ious) >= FAST_MIN_IOU)) if ious else 1.0
    masks_agree = matched >= FAST_MATCHED if fast else differing <= MAX_DIFFERING_FRACTION * pixels
    equal = labels_equal and box_diff <= 1e-3 and score_diff <= 1e-4 and masks_agree
    return {"equal": bool(equal), "masks": len(ious), "max_box_diff_px": box_diff, "max_score_diff": score_diff,
            "labels_equal": bool(labels_equal), "differing_pixels": differing, "pixels": pixels,
            f"matched_at_iou_{FAST_MIN_IOU}": round(matched, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", default="tiny", choices=["tiny", "gdino-tiny"])
    parser.add_argument("--sam", default="tiny", choices=["tiny", "vit_b"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor batch (the job's --batch-size)")
    parser.add_argument("--long-side", type=int, default=320, help="photo size")
    parser.add_argument("--shortest-edge", type=int, default=800, help="gdino-tiny processor (default as published)")
    parser.add_argument("--longest-edge", type=int, default=1333, help="gdino-tiny processor (default as published)")
    parser.add_argument("--box-threshold", type=float, default=0.35,
                        help="tiny detector; gdino-tiny takes it from --boxes-per-image")
    parser.add_argument("--boxes-per-image", type=int, default=10,
                        help="gdino-tiny: the threshold is the median image's score of this rank; random "
                        "scores bunch, so more boxes pass (686 for 8 photos at the default)")
    parser.add_argument("--text-threshold", type=float, default=0.25)
    parser.add_argument("--fast", action="store_true",
                        help="the job's --fast: SAM's encoder in bf16 where bf16 is faster on this CPU")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side; the best is kept")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours_sam, reference_sam = build_models(args.sam, seed=0)
    ours_sam = ours_sam.to(device)
    images = photos(args.images, args.long_side)
    with tempfile.TemporaryDirectory(prefix="text-bench-") as tmp:
        detector_dir = build_detector(args.detector, Path(tmp) / "detector", args.shortest_edge, args.longest_edge)
        if args.detector == "gdino-tiny":
            args.box_threshold = threshold_for(detector_dir, images, args.boxes_per_image, device)
        ours = job_stage(detector_dir, ours_sam, images, args.batch_size, args.box_threshold, args.text_threshold,
                         args.fast)
        loop = notebook_loop(detector_dir, reference_sam, images, args.box_threshold, args.text_threshold, device)
        ours(), loop()  # first-call costs (allocator, kernels) on both sides
        ours_s = min(timed(ours)[1] for _ in range(args.repeats))
        loop_s = min(timed(loop)[1] for _ in range(args.repeats))
        check = compare(ours(), loop(), args.fast)
    figures = {
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "detector": args.detector, "sam": args.sam, "images": len(images), "long_side": args.long_side,
        "batch_size": args.batch_size, "fast": args.fast, "box_threshold": args.box_threshold, "outputs": check,
        "job_img_per_s": round(len(images) / ours_s, 3), "loop_img_per_s": round(len(images) / loop_s, 3),
        "speedup": round(loop_s / ours_s, 2),
    }
    emit(figures, args.json)
    return 0 if check["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
