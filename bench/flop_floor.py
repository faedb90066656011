"""Benchmark: how far our AMG is from this machine's FLOP floor, in fp32 and with ``fast=True``.

    python bench/flop_floor.py                       # ViT-B-shaped random model, 512x384 photo, 32x32 grid
    python bench/flop_floor.py --encoder tiny --points-per-side 8   # a quick check

The floor is the time the matrix products our generator performs would take at this machine's
measured matrix-product peak: FLOPs counted by ``torch.utils.flop_counter`` over one
``generate`` (and over the image encoder alone), divided by the best GFLOPS of a few SAM-sized
linears, each timed through both PyTorch's default and oneDNN, in that dtype. The generator is
then timed without the counter. ``ratio`` = measured time / floor: 1.0 would mean every second
went to matrix products at peak; element-wise passes, RLE and NMS are what lies above it.
Settings as ``bench/amg_bench.py``'s first README row (NMS off, filters 0: every mask decoded,
upsampled and encoded).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from amg_bench import models, photo, timed  # noqa: E402  (bench/amg_bench.py)
from report import cpu_model, emit  # noqa: E402
from sam_core.timing import best_times  # noqa: E402

# (rows, in, out) of the linears that carry SAM's FLOPs: ViT-B's qkv and MLP, the decoder's MLP.
PEAK_SHAPES = ((4096, 768, 2304), (4096, 768, 3072), (4096, 3072, 768), (4096, 256, 2048))


def _linear_flops(x, weight, *args, out_val=None, **kwargs) -> int:
    return 2 * x.numel() * weight.shape[0]


def _attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    batch_heads = query.numel() // (query.shape[-2] * query.shape[-1])
    return 2 * batch_heads * query.shape[-2] * key.shape[-2] * (query.shape[-1] + value.shape[-1])


# Ops the counter has no formula for: oneDNN's linear (sam_core.modeling.cpu_linear) and the CPU
# flash-attention kernel that scaled_dot_product_attention takes on a CPU.
for _formula in (_linear_flops, _attention_flops):
    _formula._get_raw = True
EXTRA_FORMULAS = {
    torch.ops.mkldnn._linear_pointwise: _linear_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
}


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def peak_gflops(dtype: torch.dtype) -> float:
    """The best rate of the ``PEAK_SHAPES`` linears in ``dtype``, through ``F.linear`` and oneDNN."""
    best = 0.0
    generator = torch.Generator().manual_seed(0)
    for rows, n_in, n_out in PEAK_SHAPES:
        x = torch.randn(rows, n_in, generator=generator).to(dtype)
        weight = torch.randn(n_out, n_in, generator=generator).to(dtype)
        ways = {"aten": lambda: F.linear(x, weight)}
        if torch.backends.mkldnn.is_available():
            ways["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        seconds = min(best_times(ways, rounds=5).values())
        best = max(best, 2 * rows * n_in * n_out / seconds / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "vit_b"], default="vit_b")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--image-side", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sam_core import AutomaticMaskGenerator

    _, model = models(args.encoder)
    # The counter's module tracker hooks every output that requires a gradient, and some outputs
    # are parameters themselves (the prompt encoder's no-mask embedding): inference needs none.
    model.requires_grad_(False)
    image = photo(args.image_side)
    settings = dict(points_per_side=args.points_per_side, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    box_nms_thresh=1.0)
    side = model.image_encoder.img_size
    encoder_input = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    figures = {"cpu": cpu_model(), "encoder": args.encoder, "threads": args.threads,
               "image": f"{image.shape[1]}x{image.shape[0]}", "points_per_side": args.points_per_side}
    print(f"cpu={figures['cpu']} encoder={args.encoder} threads={args.threads} image={figures['image']}", flush=True)

    for name, fast in (("fp32", False), ("fast", True)):
        generator = AutomaticMaskGenerator(model, fast=fast, **settings)
        dtype = torch.bfloat16 if generator.uses_bfloat16 else torch.float32

        def encode():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                model.image_encoder(encoder_input)

        with torch.no_grad():
            generator.generate(image)  # warm-up: per-process tuning, kernel set-up
            amg_flops, encoder_flops = counted_flops(lambda: generator.generate(image)), counted_flops(encode)
            amg_s, encoder_s = timed(lambda: generator.generate(image), 1)[0], timed(encode, 2)[0]
        peak = peak_gflops(dtype)
        amg_floor, encoder_floor = amg_flops / peak / 1e9, encoder_flops / peak / 1e9
        figures[name] = {
            "dtype": str(dtype).removeprefix("torch."), "peak_gflops": round(peak, 1),
            "amg_gflop": round(amg_flops / 1e9, 1), "amg_s": round(amg_s, 2), "amg_floor_s": round(amg_floor, 2),
            "amg_ratio": round(amg_s / amg_floor, 2),
            "encoder_gflop": round(encoder_flops / 1e9, 1), "encoder_s": round(encoder_s, 2),
            "encoder_floor_s": round(encoder_floor, 2), "encoder_ratio": round(encoder_s / encoder_floor, 2),
        }
        print(f"{name:5s} ({figures[name]['dtype']}) peak {peak:6.1f} GFLOPS | AMG {amg_flops / 1e9:8.1f} GFLOP "
              f"{amg_s:7.2f} s, floor {amg_floor:6.2f} s, {amg_s / amg_floor:4.2f}x the floor | encoder "
              f"{encoder_flops / 1e9:7.1f} GFLOP {encoder_s:6.2f} s, floor {encoder_floor:5.2f} s, "
              f"{encoder_s / encoder_floor:4.2f}x", flush=True)
    emit(figures, args.json)


if __name__ == "__main__":
    main()
