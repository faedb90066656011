"""Pipeline overhead: `pipeline.run` on local Ray vs a bare loop over the generator, same images.

    python bench/pipeline_bench.py --images 16 --cpus 2

Both sides read the same files, decode them with `pipeline.inputs.decode.decode_image`, and run
`sam_core.AutomaticMaskGenerator.generate_batch` in batches of `--batch-size` with the same model
and parameters; the bare loop uses all `--cpus` torch threads in one process, the pipeline its
default actor pool on a local Ray with `--cpus` CPUs (one single-threaded actor per CPU). Both
timings include loading the model. The script checks that both produce the same masks for every
image and prints two ratios: total time (model loading and, for the pipeline, listing, the
driver's model check and actor start-up included) and steady-state time per image (images
delivered after the first batch over the time since it), which is what a long run pays. The
default model is the demo's random-weight model (`jobs.annotate.demo_checkpoint`); pass
`--checkpoint` for real weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_images(directory: Path, count: int) -> list[str]:
    """`count` distinct JPEGs made from the bundled samples (flipped/cropped variants)."""
    from PIL import Image

    samples = sorted((REPO / "jobs" / "samples").glob("*.jpg"))
    paths = []
    for index in range(count):
        image = Image.open(samples[index % len(samples)]).convert("RGB")
        variant = index // len(samples)
        if variant % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        shrink = 4 * (variant // 2)
        image = image.crop((shrink, shrink, image.width - shrink, image.height - shrink))
        path = directory / f"img_{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


class Clock:
    """Total seconds, and the steady rate: images after the first delivery / time since it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.deliveries: list[tuple[float, int]] = []  # (seconds since start, images so far)

    def delivered(self, images: int) -> None:
        done = images + (self.deliveries[-1][1] if self.deliveries else 0)
        self.deliveries.append((time.perf_counter() - self.start, done))

    def figures(self) -> dict:
        total_s, total = self.deliveries[-1]
        first_s, first = self.deliveries[0]
        steady = (total - first) / (total_s - first_s) if total > first and total_s > first_s else None
        return {"total_s": round(total_s, 3), "first_delivery_s": round(first_s, 3),
                "steady_img_per_s": None if steady is None else round(steady, 3)}


def bare_loop(paths: list[str], config, threads: int) -> tuple[dict, dict]:
    """Read, decode and generate in one process; returns (timings, {path: [rle counts]})."""
    import torch

    from pipeline.modes.automatic import make_generator
    from pipeline.inputs.decode import decode_image

    torch.set_num_threads(threads)
    clock = Clock()
    generator = make_generator(config, "cpu")
    masks = {}
    for first in range(0, len(paths), config.batch_size):
        chunk = paths[first: first + config.batch_size]
        images = [decode_image(Path(p).read_bytes(), max_pixels=config.max_pixels) for p in chunk]
        for path, records in zip(chunk, generator.generate_batch(images)):
            masks[path] = [r["segmentation"]["counts"] for r in records]
        clock.delivered(len(chunk))
    return clock.figures(), masks


def pipeline_run(config) -> tuple[dict, dict]:
    import pyarrow.parquet as pq

    from pipeline.run import run

    clock = Clock()
    run(config, progress=False, on_write=lambda results: clock.delivered(sum(results.column("rows").to_pylist())))
    figures = clock.figures()
    figures["total_s"] = round(time.perf_counter() - clock.start, 3)  # manifest and marker included
    rows = pq.read_table(config.output, columns=["uri", "masks"]).to_pylist()
    return figures, {row["uri"]: [m["segmentation"]["counts"] for m in row["masks"]] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--points-per-side", type=int, default=4)
    parser.add_argument("--unit-size", type=int, default=8,
                        help="images per unit: small, so that rows are written (and timed) as they come")
    parser.add_argument("--rows-per-file", type=int, default=4)
    parser.add_argument("--checkpoint", help="default: the demo's random-weight model")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import ray

    from jobs.annotate import DEMO_AMG, demo_checkpoint
    from pipeline.config import AnnotateConfig

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    (work / "images").mkdir()
    paths = make_images(work / "images", args.images)
    amg = {**DEMO_AMG, "points_per_side": args.points_per_side}
    config = AnnotateConfig(
        input=str(work / "images"), output=str(work / "out"), checkpoint=args.checkpoint or str(demo_checkpoint()),
        batch_size=args.batch_size, unit_size=args.unit_size, rows_per_file=args.rows_per_file, **amg,
    )

    bare, bare_masks = bare_loop(paths, config, args.cpus)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        pipe, pipe_masks = pipeline_run(config)
    finally:
        ray.shutdown()

    equal = sum(pipe_masks.get(path) == counts for path, counts in bare_masks.items())
    ratio = pipe["total_s"] / bare["total_s"]
    steady_ratio = None
    if bare["steady_img_per_s"] and pipe["steady_img_per_s"]:
        steady_ratio = bare["steady_img_per_s"] / pipe["steady_img_per_s"]  # time per image, pipeline / bare
    figures = {
        "images": args.images, "cpus": args.cpus, "batch_size": args.batch_size, "amg": amg,
        "bare_loop": bare, "pipeline": pipe,
        "total_time_ratio": round(ratio, 4), "steady_time_per_image_ratio": steady_ratio and round(steady_ratio, 4),
        "images_with_equal_masks": equal,
        "masks_per_image": round(float(np.mean([len(v) for v in bare_masks.values()])), 2),
    }
    print(json.dumps(figures, indent=2))
    print(f"pipeline/bare total time {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%, start-up included); "
          + (f"steady-state time per image {steady_ratio:.3f} (overhead {100 * (steady_ratio - 1):+.1f}%); "
             if steady_ratio else "")
          + f"masks equal on {equal}/{args.images} images")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if equal == args.images else 1


if __name__ == "__main__":
    sys.exit(main())
