"""Every GPU check in one short run (< 10 min on one H200), with a small report.

    python bench/gpu_check.py --out gpu-report          # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry-run --out /tmp/r    # the same steps on CPU, tiny shapes (~1 min)

Steps, each with its own time limit so that one failure or hang does not cost the others:
1. ``tests``: the CUDA variants of the parity and bf16 tests (tests/sam_core/test_device_parity.py,
   tests/sam_core/test_bf16.py). A dry run only collects them (they would run on CPU).
2. ``amg``: AMG images/s for ViT-B- and ViT-H-shaped random weights (tiny in a dry run) on the
   same photos: segment-anything's generator, ours in fp32 and ours with ``fast=True``, ours at
   encoder batch 1, 4 and 8 (``generate_batch``), each with its masks matched against the official.
3. ``job``: ``python -m jobs.annotate`` with one actor on the GPU on a small corpus, while
   ``nvidia-smi`` utilisation is sampled every half second (a stand-in command in a dry run).
4. ``text``: ``bench/text_bench.py``, text mode's batched actor against the notebooks' one-image
   Grounded-SAM loop, Grounding DINO's published tiny shapes and ViT-B (tiny ones in a dry run),
   fp32 then ``--fast``, outputs checked equal.
5. ``report.json`` and ``report.md`` in ``--out``, with each step's log.

The dry run goes through the same code (only the shapes, the device, the image count and the
sampled command differ), and tests/bench/test_gpu_check.py runs it, so the one GPU run cannot
fail on a typo.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEST_FILES = ("tests/sam_core/test_device_parity.py", "tests/sam_core/test_bf16.py")
SMI_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


def plan(dry_run: bool) -> dict:
    """What each step runs: real shapes on the GPU, tiny ones on CPU for a dry run."""
    if dry_run:
        return dict(device="cpu", encoders=("tiny",), images=2, side=128, points_per_side=4,
                    encoder_batches=(1, 2), job_images=4, job_points=4, job_model="tiny",
                    text=dict(detector="tiny", sam="tiny", images=4, batch_size=2),
                    limits=dict(tests=120, amg=240, job=240, text=240))
    return dict(device="cuda", encoders=("vit_b", "vit_h"), images=8, side=512, points_per_side=32,
                encoder_batches=(1, 4, 8), job_images=64, job_points=32, job_model="vit_b",
                text=dict(detector="gdino-tiny", sam="vit_b", images=16, batch_size=8),
                limits=dict(tests=120, amg=210, job=120, text=150))


def run_logged(command: list[str], log: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run ``command`` with its output in ``log``; returns exit status and seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                                cwd=REPO, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"command": " ".join(command), "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "log": log.name}


def step_tests(out: Path, setup: dict, dry_run: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES]
    if dry_run:
        command.append("--collect-only")
    else:
        command += ["-k", "cuda"]
    result = run_logged(command, out / "tests.log", setup["limits"]["tests"])
    result["tail"] = (out / "tests.log").read_text(errors="replace").strip().splitlines()[-1:]
    return result


def step_amg(out: Path, setup: dict) -> dict:
    """In a child process (its own time limit); figures come back as JSON."""
    figures = out / "amg.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--amg-child", json.dumps(setup), str(figures)]
    result = run_logged(command, out / "amg.log", setup["limits"]["amg"])
    if figures.exists():
        result["rows"] = json.loads(figures.read_text())
    return result


def amg_child(setup: dict, figures_path: Path) -> None:
    """Step 2 proper: img/s of each generator, written row by row (a timeout keeps what was done)."""
    import torch

    from bench.amg_bench import models, photo
    from segment_anything import SamAutomaticMaskGenerator
    from sam_core import AutomaticMaskGenerator
    from tests.sam_core.amg.amg_parity import matched_fraction

    device = setup["device"]
    images = [photo(setup["side"], square=bool(i % 2)) for i in range(setup["images"])]
    kwargs = dict(points_per_side=setup["points_per_side"], pred_iou_thresh=0.0, stability_score_thresh=0.0)
    rows = []

    def timed(name, encoder, run, reference=None, min_iou=0.99):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        run(images[:1])  # warm-up: CUDA context, kernels, cuDNN choices, the CPU tuning
        sync()
        start = time.perf_counter()
        records = run(images)
        sync()
        seconds = time.perf_counter() - start
        row = {"model": encoder, "generator": name, "images": len(images), "seconds": round(seconds, 3),
               "img_per_s": round(len(images) / seconds, 3), "masks": sum(map(len, records))}
        if reference is not None:
            same = min_iou >= 0.99
            row["matched"] = round(statistics.mean(
                matched_fraction(r, o, min_iou=min_iou, iou_pred_atol=1e-4 if same else None,
                                 stability_atol=2e-3 if same else None, same_box=same)
                for r, o in zip(reference, records)), 4)
        rows.append(row)
        figures_path.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)
        return records

    with torch.no_grad():
        for encoder in setup["encoders"]:
            ref_model, our_model = models(encoder)
            ref_model, our_model = ref_model.to(device), our_model.to(device)
            official = SamAutomaticMaskGenerator(ref_model, **kwargs)
            reference = timed("official", encoder, lambda batch: [official.generate(i) for i in batch])
            del official, ref_model
            for fast in (False, True):
                for batch_size in setup["encoder_batches"]:
                    ours = AutomaticMaskGenerator(our_model, fast=fast, encoder_batch_size=batch_size, **kwargs)
                    name = f"ours {'fast' if fast else 'fp32'} encoder batch {batch_size}"
                    timed(name, encoder, ours.generate_batch, reference, min_iou=0.95 if fast else 0.99)
            del our_model
            if device == "cuda":
                torch.cuda.empty_cache()


class Sampler:
    """Samples a ``utilization, memory`` CSV line from ``command`` every ``interval_s`` in a thread."""

    def __init__(self, command: list[str], interval_s: float = 0.5):
        self.command, self.interval_s = command, interval_s
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = subprocess.run(self.command, capture_output=True, text=True, timeout=5).stdout
                utilization, memory = (float(v) for v in line.strip().splitlines()[0].split(","))
                self.samples.append((utilization, memory))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                self.errors += 1
            self._stop.wait(self.interval_s)

    def summary(self) -> dict:
        util = [u for u, _ in self.samples]
        return {"samples": len(util), "errors": self.errors,
                "utilization_mean": round(statistics.mean(util), 1) if util else None,
                "utilization_max": max(util) if util else None,
                "memory_max_mib": max((m for _, m in self.samples), default=None)}


def step_job(out: Path, setup: dict, dry_run: bool) -> dict:
    """The annotate CLI on a generated corpus, one actor (on the GPU unless a dry run)."""
    import torch

    from bench.amg_bench import SIZES
    from bench.pipeline_bench import make_images
    from tests.sam_factory import make_official_sam, save_official_checkpoint

    work = Path(tempfile.mkdtemp(prefix="gpu-check-job-"))
    (work / "images").mkdir()
    make_images(work / "images", setup["job_images"])
    with torch.no_grad():
        checkpoint = save_official_checkpoint(make_official_sam(seed=0, **SIZES[setup["job_model"]]), work / "sam.pth")
    command = [
        sys.executable, "-m", "jobs.annotate", "--input", str(work / "images"), "--output", str(work / "out"),
        "--checkpoint", str(checkpoint), "--num-actors", "1", "--gpus-per-actor", "0" if dry_run else "1",
        "--points-per-side", str(setup["job_points"]), "--fast", "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    # A dry run has no nvidia-smi: a stand-in prints a line in its format, so the parsing runs too.
    smi = [sys.executable, "-c", "print('0, 0')"] if dry_run else SMI_QUERY
    with Sampler(smi) as sampler:
        result = run_logged(command, out / "job.log", setup["limits"]["job"], env=env)
    result["gpu"] = sampler.summary()
    result["images"] = setup["job_images"]
    if isinstance(result["rc"], int) and result["rc"] == 0:
        result["img_per_s_with_startup"] = round(setup["job_images"] / result["seconds"], 3)
    return result


def step_text(out: Path, setup: dict) -> dict:
    """Text mode's img/s against the one-image loop, fp32 then --fast, each run checking its outputs."""
    text = setup["text"]
    rows, result = [], {"rc": 0, "seconds": 0.0, "log": "text-*.log"}
    for fast in (False, True):
        figures = out / f"text-{'fast' if fast else 'fp32'}.json"
        command = [sys.executable, str(REPO / "bench" / "text_bench.py"), "--detector", text["detector"],
                   "--sam", text["sam"], "--images", str(text["images"]), "--batch-size", str(text["batch_size"]),
                   "--repeats", "1", "--json", str(figures)] + (["--fast"] if fast else [])
        step = run_logged(command, out / f"text-{'fast' if fast else 'fp32'}.log", setup["limits"]["text"] / 2)
        result["seconds"] = round(result["seconds"] + step["seconds"], 1)
        if step["rc"] != 0:
            result["rc"] = step["rc"]
        if figures.exists():
            rows.append(json.loads(figures.read_text()))
    result["rows"] = rows
    return result


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CUDA NOT AVAILABLE"
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    env = report["environment"]
    lines = [f"# GPU check{' (dry run, CPU, tiny shapes)' if report['dry_run'] else ''}", "",
             f"{env.get('gpu', env['device'])}; CPU {env['cpu']}; torch {env['torch']}", ""]
    for name, step in report["steps"].items():
        lines.append(f"- {name}: rc {step.get('rc')}, {step.get('seconds')} s ({step.get('log')})")
    rows = report["steps"].get("amg", {}).get("rows", [])
    if rows:
        lines += ["", "| model | generator | img/s | masks | matched |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['generator']} | {r['img_per_s']} | {r['masks']} | {r.get('matched', '')} |"
                  for r in rows]
    text_rows = report["steps"].get("text", {}).get("rows", [])
    if text_rows:
        lines += ["", "| text mode | job img/s | loop img/s | speed-up | outputs equal |", "|---|---|---|---|---|"]
        lines += [f"| {r['detector']} + {r['sam']}{' fast' if r['fast'] else ''}, batch {r['batch_size']} | "
                  f"{r['job_img_per_s']} | {r['loop_img_per_s']} | {r['speedup']} | {r['outputs']['equal']} |"
                  for r in text_rows]
    job = report["steps"].get("job")
    if job:
        lines += ["", f"job: {job.get('images')} images, {job.get('seconds')} s with start-up; "
                      f"GPU utilisation {job['gpu']}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check-report", help="report folder (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script itself")
    parser.add_argument("--steps", default="tests,amg,job,text", help="comma-separated subset of the steps")
    parser.add_argument("--amg-child", nargs=2, metavar=("SETUP", "FIGURES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.amg_child:
        amg_child(json.loads(args.amg_child[0]), Path(args.amg_child[1]))
        return 0

    setup = plan(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "environment": environment(setup["device"]), "steps": {}}
    steps = {"tests": lambda: step_tests(out, setup, args.dry_run), "amg": lambda: step_amg(out, setup),
             "job": lambda: step_job(out, setup, args.dry_run), "text": lambda: step_text(out, setup)}
    for name in args.steps.split(","):
        print(f"[gpu_check] {name} ...", flush=True)
        report["steps"][name] = steps[name]()
        print(f"[gpu_check] {name}: rc {report['steps'][name]['rc']} in {report['steps'][name]['seconds']} s",
              flush=True)
        write_report(out, report)
    failed = [name for name, step in report["steps"].items() if step["rc"] != 0]
    print(f"[gpu_check] report in {out}/report.md; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
