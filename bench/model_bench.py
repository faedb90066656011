"""Benchmark: our image encoder and prompt->mask decoding against segment-anything's, same weights.

    python bench/model_bench.py                          # ViT-B-shaped random model, 1024 input, 64 prompts
    python bench/model_bench.py --encoder tiny --repeat 3  # a quick check
    python bench/model_bench.py --device cuda --bf16     # adds our bf16 path (checked against bf16 bounds)

Both models run in this process: the official model from tests/sam_factory.py (every parameter
perturbed), ours loaded from its state dict through ``load_sam``. Every timed output is compared:
fp32 must agree within 1e-3 (embeddings relative to their scale), bf16 within the bounds that
tests/sam_core/test_bf16.py asserts. Prints best-of-``repeat`` seconds and the speed ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.sam_factory import make_official_sam, real_photos, save_official_checkpoint  # noqa: E402

VIT_B = dict(
    embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14,
    image_size=1024, patch_size=16, prompt_embed_dim=256, mask_in_chans=16, decoder_depth=2,
    decoder_heads=8, decoder_mlp_dim=2048, iou_head_hidden_dim=256,
)


def best_time(fn, repeat: int, device: str):
    best, result = float("inf"), None
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, rel_tol: float) -> float:
    error = (ours.float() - theirs.float()).abs().max().item()
    scale = theirs.float().abs().max().item()
    if error > rel_tol * max(scale, 1e-6):
        raise SystemExit(f"{name}: outputs differ: max abs error {error:.3g} > {rel_tol} x {scale:.3g}")
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "vit_b"], default="vit_b")
    parser.add_argument("--batch", type=int, default=1, help="images per encoder call")
    parser.add_argument("--prompts", type=int, default=64, help="point prompts per decoder call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also time our load_sam(dtype=bf16) path")
    args = parser.parse_args()

    from segment_anything import SamPredictor as ReferencePredictor

    from sam_core import SamPredictor, load_sam

    sizes = VIT_B if args.encoder == "vit_b" else {}
    reference = make_official_sam(seed=0, **sizes).to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_official_checkpoint(reference, Path(tmp) / "model.pth")
        ours = load_sam(path, device=args.device)
        ours_bf16 = load_sam(path, device=args.device, dtype=torch.bfloat16) if args.bf16 else None

    size = reference.image_encoder.img_size
    photo = real_photos()[0]
    theirs_p, ours_p = ReferencePredictor(reference), SamPredictor(ours)
    theirs_p.set_image(photo)
    resized = theirs_p.transform.apply_image(photo)
    image = torch.as_tensor(resized, device=args.device).permute(2, 0, 1).float()
    batch = reference.preprocess(image)[None].repeat(args.batch, 1, 1, 1)
    print(f"device={args.device} threads={torch.get_num_threads()} encoder={args.encoder} input={size} "
          f"batch={args.batch} prompts={args.prompts} torch={torch.__version__}")

    with torch.no_grad():
        t_ref, emb_ref = best_time(lambda: reference.image_encoder(batch), args.repeat, args.device)
        t_ours, emb = best_time(lambda: ours.image_encoder(batch), args.repeat, args.device)
        err = check("encoder", emb, emb_ref, 1e-3)
        print(f"encoder  reference {t_ref:8.3f}s  ours {t_ours:8.3f}s  speedup x{t_ref / t_ours:5.2f}  "
              f"max|diff| {err:.2e}")
        if ours_bf16 is not None:
            t_bf, emb_bf = best_time(lambda: ours_bf16.image_encoder(batch.to(torch.bfloat16)), args.repeat,
                                     args.device)
            err = check("encoder bf16", emb_bf, emb_ref, 0.03)
            print(f"encoder  reference {t_ref:8.3f}s  ours-bf16 {t_bf:8.3f}s  speedup x{t_ref / t_bf:5.2f}  "
                  f"max|diff| {err:.2e}")

    h, w = photo.shape[:2]
    generator = torch.Generator().manual_seed(0)
    coords = theirs_p.transform.apply_coords_torch(
        torch.rand(args.prompts, 1, 2, generator=generator) * torch.tensor([w, h]), (h, w)).to(args.device)
    labels = torch.ones(args.prompts, 1, dtype=torch.int, device=args.device)
    with torch.no_grad():
        def decode(model):
            sparse, dense = model.prompt_encoder((coords, labels), None, None)
            return model.mask_decoder(theirs_p.features, model.prompt_encoder.get_dense_pe(), sparse, dense, True)

        t_ref, out_ref = best_time(lambda: decode(reference), args.repeat, args.device)
        t_ours, out = best_time(lambda: decode(ours), args.repeat, args.device)
        err = max(check("mask decoder", a, b, 1e-3) for a, b in zip(out, out_ref))
        print(f"mask decoder (low-res)  reference {t_ref:8.3f}s  ours {t_ours:8.3f}s  speedup x{t_ref / t_ours:5.2f}  "
              f"max|diff| {err:.2e}")

    ours_p.set_image(photo)
    t_ref, out_ref = best_time(lambda: theirs_p.predict_torch(coords, labels, return_logits=True), args.repeat,
                               args.device)
    t_ours, out = best_time(lambda: ours_p.predict_torch(coords, labels, return_logits=True), args.repeat,
                            args.device)
    err = max(check("decoder " + name, a, b, 1e-3) for name, a, b in zip(("masks", "iou", "low_res"), out, out_ref))
    print(f"predict_torch (+ upscale to photo)  reference {t_ref:8.3f}s  ours {t_ours:8.3f}s  "
          f"speedup x{t_ref / t_ours:5.2f}  max|diff| {err:.2e}")


if __name__ == "__main__":
    main()
