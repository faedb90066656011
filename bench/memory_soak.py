"""Memory soak: peak memory of the real job (`python -m jobs.annotate`) as the corpus grows.

Writes N small synthetic JPEGs (and a tiny random-weight SAM checkpoint) to a local folder,
then, for each corpus size, runs the CLI on a `.txt` manifest of the first n images in a fresh
process group with its own Ray, sampling every ``--interval-s``:

- ``tree_pss``: the proportional set size (PSS, from /proc/<pid>/smaps_rollup) summed over the
  driver and all its descendants (Ray's daemons, decode workers, annotator actors). PSS splits
  shared pages (Ray's object store, shared libraries) between the processes that map them, so
  the sum is what the job costs the machine, without double counting;
- ``driver_rss`` and ``annotator_rss``: resident set of the driver and of the largest
  annotator actor.

Memory is bounded if the peak stays flat as n doubles. ``--huge`` adds a run over large
images (under and over ``--max-pixels``) to show that decoded pixels are bounded by the limit.

    python bench/memory_soak.py                       # 250, 500, 1000, 2000 images
    python bench/memory_soak.py --sizes 100,200 --huge
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from proctree import descendants, is_annotator  # noqa: E402  (bench/ is the script directory)

MIB = 1024 * 1024


def _kib_field(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Polls the memory of a process tree until stopped; keeps the peaks (bytes)."""

    def __init__(self, root_pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.root_pid, self.interval_s = root_pid, interval_s
        self.peak = {"tree_pss": 0, "driver_rss": 0, "annotator_rss": 0, "processes": 0}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = descendants(self.root_pid)
            tree = sum(_kib_field(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids)
            driver = _kib_field(f"/proc/{self.root_pid}/status", "VmRSS")
            annotator = max((_kib_field(f"/proc/{p}/status", "VmRSS") for p in pids if is_annotator(p)), default=0)
            for key, value in (("tree_pss", tree), ("driver_rss", driver), ("annotator_rss", annotator),
                               ("processes", len(pids))):
                self.peak[key] = max(self.peak[key], value)
            self.samples += 1
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def make_corpus(folder: Path, count: int, seed: int = 0) -> list:
    """`count` small synthetic JPEGs (48-160 px sides, mixed aspect), written once and reused."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:05d}.jpg"
        if not path.exists():
            height, width = int(rng.integers(48, 160)), int(rng.integers(48, 160))
            yy, xx = np.mgrid[0:height, 0:width]
            image = np.stack([(xx * 3 + i) % 256, (yy * 5) % 256, (xx * yy + 11 * i) % 256], axis=-1)
            Image.fromarray(image.astype(np.uint8)).save(path, "JPEG", quality=85)
        paths.append(str(path))
    return paths


def make_huge_corpus(folder: Path, max_pixels: int) -> list:
    """Large smooth JPEGs: four just under ``max_pixels`` and two four times over it."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    side_ok = int((max_pixels * 0.9) ** 0.5)
    side_over = int((max_pixels * 4) ** 0.5)
    paths = []
    for i, side in enumerate([side_ok] * 4 + [side_over] * 2):
        path = folder / f"huge_{i}_{side}.jpg"
        if not path.exists():
            ramp = np.linspace(0, 255, side, dtype=np.float32)
            image = np.empty((side, side, 3), np.uint8)
            image[..., 0] = ramp[None, :]
            image[..., 1] = ramp[:, None]
            image[..., 2] = (i * 40) % 256
            Image.fromarray(image).save(path, "JPEG", quality=80)
        paths.append(str(path))
    return paths


def run_job(name: str, uris: list, work: Path, checkpoint: Path, extra: list, interval_s: float) -> dict:
    manifest = work / f"{name}.txt"
    manifest.write_text("\n".join(uris) + "\n")
    output = work / f"out-{name}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rms", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    args = [sys.executable, "-m", "jobs.annotate", "--input", str(manifest), "--output", str(output),
            "--checkpoint", str(checkpoint), "--points-per-side", "2", "--pred-iou-thresh", "0",
            "--stability-score-thresh", "0", "--num-actors", "1", "--no-progress", "--overwrite", *extra]
    log_path = work / f"{name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        sampler = Sampler(process.pid, interval_s)
        sampler.start()
        code = process.wait()
        sampler.stop()
    seconds = time.monotonic() - started
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything of this job's group still left
    except ProcessLookupError:
        pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = statuses = None
    if code == 0:
        import pyarrow.parquet as pq

        table = pq.read_table(str(output), columns=["status"])
        rows = table.num_rows
        statuses = {s: table.column("status").to_pylist().count(s) for s in ("ok", "error")}
    summary = next((l for l in log_path.read_text(errors="replace").splitlines() if l.startswith("sam-annotate:")), "")
    shutil.rmtree(output, ignore_errors=True)
    return {
        "run": name,
        "images": len(uris),
        "exit": code,
        "rows": rows,
        "statuses": statuses,
        "seconds": round(seconds, 1),
        "peak_tree_pss_mib": round(sampler.peak["tree_pss"] / MIB, 1),
        "peak_driver_rss_mib": round(sampler.peak["driver_rss"] / MIB, 1),
        "peak_annotator_rss_mib": round(sampler.peak["annotator_rss"] / MIB, 1),
        "max_processes": sampler.peak["processes"],
        "samples": sampler.samples,
        "summary": summary,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,500,1000,2000", help="corpus sizes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--interval-s", type=float, default=0.25)
    parser.add_argument("--huge", action="store_true", help="also a run over images near/over --max-pixels")
    parser.add_argument("--max-pixels", type=int, default=16_000_000)
    parser.add_argument("--work", help="folder for corpus and outputs (default: a temporary one, removed)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from tests.sam_factory import make_official_sam, save_official_checkpoint

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="memory-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    try:
        checkpoint = save_official_checkpoint(make_official_sam(seed=0), work / "tiny.pth")
        corpus = make_corpus(work / "images", max(sizes))
        common = ["--batch-size", str(args.batch_size), "--max-pixels", str(args.max_pixels)]
        for n in sizes:
            results.append(run_job(f"n{n}", corpus[:n], work, checkpoint, common, args.interval_s))
            print(json.dumps(results[-1]), flush=True)
        if args.huge:
            huge = make_huge_corpus(work / "huge", args.max_pixels)
            extra = ["--batch-size", "2", "--max-pixels", str(args.max_pixels)]
            results.append(run_job("huge", huge, work, checkpoint, extra, args.interval_s))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print("\nrun     images  exit  rows   ok/err     seconds  img/s  peak tree PSS  driver RSS  annotator RSS")
    for r in results:
        ok_err = f"{r['statuses']['ok']}/{r['statuses']['error']}" if r["statuses"] else "-"
        rate = r["images"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['run']:<7} {r['images']:>6} {r['exit']:>5} {str(r['rows']):>5} {ok_err:>9} {r['seconds']:>9} "
              f"{rate:>6.1f} {r['peak_tree_pss_mib']:>11} MiB {r['peak_driver_rss_mib']:>7} MiB "
              f"{r['peak_annotator_rss_mib']:>9} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["exit"] == 0 and r["rows"] == r["images"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
