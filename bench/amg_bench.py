"""Benchmark: our AutomaticMaskGenerator against segment-anything's, same weights, same photo.

    python bench/amg_bench.py                       # ViT-B-shaped random model, 512x384 photo, 32x32 grid
    python bench/amg_bench.py --square              # the same on a 512x512 photo
    python bench/amg_bench.py --encoder tiny --points-per-side 8 --repeat 2   # a quick check

Both generators run in this process on identical random weights (the official model built by
tests/sam_factory.py, ours loaded from its state dict). Outputs are checked: the fp32 path must
give the same number of masks with >= 98% of the official masks matched at mask IoU >= 0.99
with equal boxes and scores; the fast (bf16 autocast) path >= 95% matched at IoU >= 0.95.
Filters default to 0 (every candidate mask is upsampled, scored and encoded), the heaviest case
for our generator, which otherwise skips upsampling masks that fail the predicted-IoU filter.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import cpu_model  # noqa: E402  (bench/report.py)
from sam_core.amg.presets import PRESET_NAMES, preset_parameters  # noqa: E402
from tests.sam_core.amg.amg_parity import LOGIT_GAIN, amg_model_pair, matched_fraction  # noqa: E402

VIT_B = dict(
    embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14,
    image_size=1024, patch_size=16, prompt_embed_dim=256, mask_in_chans=16, decoder_depth=2,
    decoder_heads=8, decoder_mlp_dim=2048, iou_head_hidden_dim=256,
)

VIT_H = dict(VIT_B, embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
SIZES = {"tiny": {}, "vit_b": VIT_B, "vit_h": VIT_H}


def photo(side: int, square: bool = False) -> np.ndarray:
    """scikit-image's coffee photo resized to side x (3/4 side), its own 4:3 shape, or with
    ``square`` its centre square resized to side x side."""
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.coffee())
    if square:
        width, height = image.size
        left = (width - height) // 2
        return np.asarray(image.crop((left, 0, left + height, height)).resize((side, side), Image.BILINEAR))
    return np.asarray(image.resize((side, side * 3 // 4), Image.BILINEAR))


def models(encoder: str, logit_gain: float = LOGIT_GAIN, iou_shift: float = 0.0):
    """(official Sam, our Sam) with the same random weights of the ``SIZES[encoder]`` shape; logits
    spread so that stability scores are not all ~0 (see tests/sam_core/amg/amg_parity.py)."""
    return amg_model_pair(0, logit_gain, iou_shift, **SIZES[encoder])


def timed(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "vit_b"], default="vit_b")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--image-side", type=int, default=512)
    parser.add_argument("--square", action="store_true", help="a side x side photo instead of 4:3")
    parser.add_argument("--repeat", type=int, default=1, help="runs per generator; the best time is reported")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-thresh", type=float, default=0.0)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--preset", choices=PRESET_NAMES,
                        help="a named setting instead of the filter options above (sa1b: the paper's automatic stage)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-fast", action="store_true", help="skip the bf16 fast path")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of our fp32 run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from segment_anything import SamAutomaticMaskGenerator

    from sam_core import AutomaticMaskGenerator

    image = photo(args.image_side, args.square)
    if args.preset:
        # Random weights predict IoUs near 0 and stability near 0.7: as in the preset's parity test,
        # shifted IoUs and 10x the logit gain let masks through 0.88 / 0.95 on both sides, and the
        # inner-crop-edge filter (which random masks spanning whole crops never pass) is off in
        # both generators, so that all 21 crops' masks are decoded, merged and cleaned up.
        import segment_anything.automatic_mask_generator as official_module

        import sam_core.amg.generator as our_module

        def never_near(boxes, *rest, **options):
            return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)

        official_module.is_box_near_crop_edge = our_module.is_box_near_crop_edge = never_near
        ref_model, our_model = models(args.encoder, logit_gain=10 * LOGIT_GAIN, iou_shift=1.0)
    else:
        ref_model, our_model = models(args.encoder)
    kwargs = dict(
        points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
        box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers,
    )
    if args.preset:
        kwargs = {**preset_parameters(args.preset), "points_per_batch": args.points_per_batch}
    # The official generator runs first, so it runs without the glibc malloc settings that ours
    # makes process-wide (sam_core/amg/heap.py) on its first call.
    print(f"cpu={cpu_model()} encoder={args.encoder} image={image.shape[1]}x{image.shape[0]} threads={args.threads} "
          f"{kwargs} (official first, without our malloc settings)", flush=True)

    with torch.no_grad():
        ref_time, ref_records = timed(lambda: SamAutomaticMaskGenerator(ref_model, **kwargs).generate(image), args.repeat)
        print(f"official         {ref_time:8.2f} s  {len(ref_records)} masks", flush=True)

        ours = AutomaticMaskGenerator(our_model, **kwargs)
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
        our_time, our_records = timed(lambda: ours.generate(image), args.repeat)
        if args.profile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        matched = matched_fraction(ref_records, our_records)
        parity = len(our_records) == len(ref_records) and matched >= 0.98
        print(
            f"ours fp32        {our_time:8.2f} s  {len(our_records)} masks  matched {matched:.1%}  "
            f"parity {'OK' if parity else 'FAILED'}  speed-up {ref_time / our_time:.2f}x",
            flush=True,
        )

        fast_ok = True
        if not args.no_fast:
            fast = AutomaticMaskGenerator(our_model, fast=True, **kwargs)
            fast_time, fast_records = timed(lambda: fast.generate(image), args.repeat)
            fast_matched = matched_fraction(
                ref_records, fast_records, min_iou=0.95, iou_pred_atol=None, stability_atol=None, same_box=False
            )
            fast_ok = fast_matched >= 0.95
            print(
                f"ours fast (bf16) {fast_time:8.2f} s  {len(fast_records)} masks  matched@0.95 {fast_matched:.1%}  "
                f"{'OK' if fast_ok else 'FAILED'}  speed-up {ref_time / fast_time:.2f}x",
                flush=True,
            )
    sys.exit(0 if parity and fast_ok else 1)


if __name__ == "__main__":
    main()
