"""Prompted-mode throughput: prompts/s, next to AMG images/s, on the same model and images.

    OMP_NUM_THREADS=2 python bench/prompted_bench.py --model tiny --prompts 32
    python bench/prompted_bench.py --model vit_b --images 2 --prompts 64 --points-per-side 16

Runs, on the same random weights and photos:
1. ours: ``pipeline.modes.prompted.prompted_row`` (encode once per image, prompts decoded in batches
   through our ``SamPredictor.predict_torch``);
2. the reference: segment-anything's ``SamPredictor``, ``set_image`` once per image, then one
   ``predict`` call per prompt (how its README uses it), with the same multimask choice;
3. our ``AutomaticMaskGenerator.generate`` on the same images, for images/s.
It checks that (1) and (2) give the same masks, then prints prompts/s for both, the ratio, and AMG
images/s. Random weights: the masks are meaningless, the timings are not.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipeline.output import schema  # noqa: E402
from pipeline.modes.prompted import prompted_row, wants_multimask  # noqa: E402
from pipeline.modes.prompts import ImagePrompts, Prompt  # noqa: E402


# Batched and one-at-a-time decoding round differently; a logit at the threshold may flip a pixel.
MAX_DIFFERING_FRACTION = 1e-5


def build_models(model: str, seed: int):
    """(ours, reference) ``Sam`` modules holding identical random weights."""
    from sam_core import SamConfig, build_sam

    if model == "tiny":
        from tests.sam_factory import make_official_sam, tiny_config

        reference, config = make_official_sam(seed=seed), tiny_config()
    else:
        from segment_anything import sam_model_registry
        from tests.sam_factory import perturb_parameters

        torch.manual_seed(seed)
        reference = perturb_parameters(sam_model_registry[model](), seed).eval()
        config = SamConfig.preset(model)
    ours = build_sam(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.eval(), reference.eval()


def photos(count: int, long_side: int) -> list[np.ndarray]:
    """``count`` real RGB photos, resized so the long side is ``long_side`` pixels."""
    import skimage.data
    from PIL import Image

    sources = [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.rocket()]
    images = []
    for k in range(count):
        image = Image.fromarray(sources[k % len(sources)])
        scale = long_side / max(image.size)
        images.append(np.asarray(image.resize((round(image.width * scale), round(image.height * scale)))))
    return images


def random_prompts(image: np.ndarray, count: int, rng: np.random.Generator) -> list[Prompt]:
    """Half boxes, half single foreground clicks, inside the image."""
    height, width = image.shape[:2]
    prompts = []
    for index in range(count):
        if index % 2 == 0:
            x0, x1 = sorted(rng.uniform(0, width, 2))
            y0, y1 = sorted(rng.uniform(0, height, 2))
            prompts.append(Prompt(index, box_xyxy=(x0, y0, x1 + 1, y1 + 1)))
        else:
            prompts.append(Prompt(index, point_coords=((rng.uniform(0, width), rng.uniform(0, height)),),
                                  point_labels=(1,)))
    return prompts


def reference_masks(predictor, image, prompts) -> list[np.ndarray]:
    predictor.set_image(image)
    masks = []
    for prompt in prompts:
        multimask = wants_multimask(prompt)
        box = None if prompt.box_xyxy is None else np.array(prompt.box_xyxy)
        coords = None if prompt.point_coords is None else np.array(prompt.point_coords)
        labels = None if prompt.point_labels is None else np.array(prompt.point_labels)
        out, ious, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                         multimask_output=multimask)
        masks.append(out[int(np.argmax(ious))])
    return masks


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_b"])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per image (half boxes, half clicks)")
    parser.add_argument("--prompts-per-batch", type=int, default=64)
    parser.add_argument("--points-per-side", type=int, default=16, help="AMG grid for the images/s figure")
    parser.add_argument("--long-side", type=int, default=None, help="photo size (default: the model's input size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from segment_anything import SamPredictor as ReferencePredictor
    from sam_core import AutomaticMaskGenerator, SamPredictor

    torch.set_grad_enabled(False)
    ours_model, reference_model = build_models(args.model, args.seed)
    images = photos(args.images, args.long_side or ours_model.image_encoder.img_size)
    rng = np.random.default_rng(args.seed)
    prompt_sets = [random_prompts(image, args.prompts, rng) for image in images]
    total_prompts = sum(len(p) for p in prompt_sets)

    ours = SamPredictor(ours_model)
    prompted_row(ours, "warmup", images[0], ImagePrompts("warmup", prompt_sets[0][:2]))  # first-call costs
    rows, ours_s = timed(lambda: [
        prompted_row(ours, f"image-{k}", image, ImagePrompts(f"image-{k}", prompts),
                     prompts_per_batch=args.prompts_per_batch)
        for k, (image, prompts) in enumerate(zip(images, prompt_sets))])
    reference = ReferencePredictor(reference_model)
    expected, reference_s = timed(lambda: [reference_masks(reference, image, prompts)
                                           for image, prompts in zip(images, prompt_sets)])

    differing_pixels, pixels = 0, 0
    for row, masks in zip(rows, expected):
        for record, mask in zip(row["masks"], masks):
            differing_pixels += int((schema.decode_rle(record["segmentation"]) != mask).sum())
            pixels += mask.size
    generator = AutomaticMaskGenerator(ours_model, points_per_side=args.points_per_side)
    _, amg_s = timed(lambda: [generator.generate(image) for image in images])

    encode_s = timed(lambda: [ours.set_image(image) for image in images])[1]
    print(f"model={args.model} images={len(images)} ({images[0].shape[1]}x{images[0].shape[0]} first) "
          f"prompts/image={args.prompts} threads={torch.get_num_threads()} device=cpu")
    equal = differing_pixels <= MAX_DIFFERING_FRACTION * pixels
    print(f"masks {'equal' if equal else 'NOT equal'} to the reference: {differing_pixels} of {pixels} pixels differ"
          f" (allowed: float-rounding flips at the threshold, {MAX_DIFFERING_FRACTION:g} of pixels)")
    print(f"ours      prompted: {total_prompts / ours_s:8.2f} prompts/s  ({ours_s:.2f}s, incl. "
          f"{encode_s:.2f}s encoding)")
    print(f"reference prompted: {total_prompts / reference_s:8.2f} prompts/s  ({reference_s:.2f}s)")
    print(f"speed-up (ours / reference): {reference_s / ours_s:.2f}x")
    print(f"ours AMG ({args.points_per_side}x{args.points_per_side} grid): {len(images) / amg_s:8.2f} images/s "
          f"({amg_s:.2f}s); prompted mode: {len(images) / ours_s:.2f} images/s at {args.prompts} prompts/image")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
