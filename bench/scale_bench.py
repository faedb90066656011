"""Corpus scale: the driver's memory and start, resume over a large output, the worker-side writer.

    python bench/scale_bench.py                         # all three, default sizes
    python bench/scale_bench.py --driver-sizes 100000,1000000,10000000 --resume-rows 1000000

The model is not what is measured here, so the annotate stage is the tests' stand-in generator
(``tests/pipeline/standin.py``: two masks per image made from its pixels); everything else is
the real job (``pipeline.run.run``, local Ray).

1. **Driver** (``--driver-sizes``): for each N, a `.txt` manifest of N URIs (a few small JPEGs,
   named again and again) is annotated by a fresh driver process. It reports the time from the
   ``run()`` call to the first committed unit, the planning time (before Ray is joined), and the
   driver's peak RSS (``VmHWM``) at the first commit and ``--hold-s`` seconds later; then the
   driver is stopped: a 10M-image corpus is not annotated on 2 cores.
2. **Resume** (``--resume-rows``): an output of that many rows is written through the real
   writer and committer (``pipeline.output.sink.write_parts`` and ``Committer``, without Ray), then the
   same command is run again: the time until it returns, having found nothing to do, in process
   and as a whole ``python -m jobs.annotate`` command.
3. **Prompted** (``--prompted-sizes``): the driver case in prompted mode, a manifest of N distinct
   images and a prompts table of N boxes (and 1 % more for images the manifest lacks): planning now
   includes sorting the table into the output and finding those orphans, both in bounded memory.
4. **Writer** (``--writer-rows``): ``write_parts`` rows/s and MB/s on local disk for SA-1B-like
   rows (``--masks`` masks a row, COCO RLE strings of ``--rle-chars`` characters).

Prints one JSON document; ``--json`` also writes it to a file.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from report import cpu_model, emit  # noqa: E402  (bench/ is the script directory)

DRIVER = r"""
import json, os, sys, threading, time
from pathlib import Path
import ray
from pipeline.config import AnnotateConfig
from pipeline.run import run
from tests.pipeline.standin import StandInAnnotator, StandInPromptedAnnotator

manifest, output, hold_s, prompts = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] or None
figures = {}

def rss_mib(field="VmHWM"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)

def connect():
    figures["plan_s"] = round(time.perf_counter() - started, 3)
    figures["rss_after_plan_mib"] = rss_mib("VmRSS")
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1"}})

def watch():
    commits = Path(output, "_commits")
    while not (commits.exists() and any(commits.iterdir())):
        time.sleep(0.02)
    figures["first_commit_s"] = round(time.perf_counter() - started, 3)
    figures["peak_rss_at_first_commit_mib"] = rss_mib()
    time.sleep(hold_s)
    figures["peak_rss_after_hold_mib"] = rss_mib()
    figures["units_committed_after_hold"] = len(list(commits.iterdir()))
    print("FIGURES " + json.dumps(figures), flush=True)
    os._exit(0)

figures["rss_before_run_mib"] = rss_mib("VmRSS")
config = AnnotateConfig(input=manifest, output=output, checkpoint="unused", num_actors=2, batch_size=4,
                        prompts=prompts)
threading.Thread(target=watch, daemon=True).start()
started = time.perf_counter()
stand_in = StandInPromptedAnnotator if prompts else StandInAnnotator
run(config, progress=False, stage=(stand_in, {"config": config.to_dict()}), connect=connect)
watch()
"""


def sample_images(folder: Path, count: int = 16) -> list:
    from tests.pipeline.bad_inputs import jpeg, photo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:02d}.jpg"
        path.write_bytes(jpeg(photo(48, 64, seed=i)))
        paths.append(str(path))
    return paths


def write_manifest(path: Path, images: list, count: int) -> None:
    with open(path, "w") as handle:
        for start in range(0, count, 100_000):
            handle.write("".join(f"{images[i % len(images)]}\n" for i in range(start, min(count, start + 100_000))))


def write_prompted_corpus(work: Path, images: list, count: int) -> tuple:
    """A manifest of ``count`` distinct image URIs and a prompts table of ``count`` boxes, one for each,
    plus one box in every 100 for an image the manifest lacks. Only the first images exist (hard
    links to the samples): the rest become read-error rows, which the driver handles the same way."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / f"prompted-{count}"
    folder.mkdir()
    for i in range(min(count, 4096)):
        os.link(images[i % len(images)], folder / f"{i:09d}.jpg")
    manifest = work / f"prompted-manifest-{count}.txt"
    prompts = work / f"prompts-{count}.parquet"
    box = [[1.0, 1.0, 20.0, 20.0]]
    prompts_schema = pa.schema([("uri", pa.string()), ("boxes", pa.list_(pa.list_(pa.float64())))])
    with open(manifest, "w") as handle, pq.ParquetWriter(prompts, prompts_schema) as writer:
        for start in range(0, count, 100_000):
            uris = [f"{folder}/{i:09d}.jpg" for i in range(start, min(count, start + 100_000))]
            handle.write("".join(f"{uri}\n" for uri in uris))
            table_uris = uris + [f"{folder}/missing-{i:09d}.jpg" for i in range(start, start + len(uris), 100)]
            writer.write_table(pa.table({"uri": table_uris, "boxes": [box] * len(table_uris)}))
    return manifest, prompts, folder


def driver_figures(work: Path, images: list, count: int, hold_s: float, prompted: bool = False) -> dict:
    prompts = folder = None
    if prompted:
        manifest, prompts, folder = write_prompted_corpus(work, images, count)
    else:
        manifest = work / f"manifest-{count}.txt"
        write_manifest(manifest, images, count)
    output = work / f"out-{count}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-c", DRIVER, str(manifest), str(output), str(hold_s),
                            str(prompts or "")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = job.communicate(timeout=1200)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)  # the driver's local Ray goes with it
        except ProcessLookupError:
            pass
    line = next((l for l in log.splitlines() if l.startswith("FIGURES ")), None)
    if line is None:
        raise RuntimeError(f"driver for {count} inputs printed no figures:\n{log[-3000:]}")
    figures = {"inputs": count, "manifest_mib": round(manifest.stat().st_size / 2**20, 1), **json.loads(line[8:])}
    if prompted:
        figures["prompts_mib"] = round(prompts.stat().st_size / 2**20, 1)
        figures["prompts_folder_mib"] = round(sum(p.stat().st_size for p in (output / "_prompts").rglob("*")
                                                  if p.is_file()) / 2**20, 1)
        prompts.unlink()
        shutil.rmtree(folder, ignore_errors=True)
    manifest.unlink()
    shutil.rmtree(output, ignore_errors=True)
    return figures


def resume_figures(work: Path, images: list, rows: int) -> dict:
    """Write an output of ``rows`` rows with the real writer and committer, then rerun on it."""
    import numpy as np
    import pyarrow as pa

    from pipeline.output import schema
    from pipeline.config import AnnotateConfig
    from pipeline.inputs.read import unit_uris
    from pipeline.run import run
    from pipeline.output.sink import LAYOUT, Committer, Output, write_parts
    from pipeline.inputs.units import plan_units

    manifest = work / f"resume-{rows}.txt"
    write_manifest(manifest, images, rows)
    output = work / f"resume-out-{rows}"
    config = AnnotateConfig(input=str(manifest), output=str(output), checkpoint="unused")
    planned = plan_units(str(manifest), {}, set(), unit_size=config.unit_size, limit=None, output=None,
                         run_index=1).units
    target = Output(str(output))
    committer = Committer(target, planned, run_index=1)
    started = time.perf_counter()
    template = schema.ok_row("", 64, 48, [], "0" * 64)
    for unit in planned:
        uris = list(unit_uris(unit, {}))
        table = schema.rows_to_table([{**template, "uri": uri} for uri in uris])
        table = (table.append_column("unit", pa.array([unit.id] * len(uris)))
                      .append_column("unit_index", pa.array(np.arange(len(uris), dtype=np.int64)))
                      .append_column("unit_last", pa.array(np.arange(len(uris)) == len(uris) - 1)))
        for start in range(0, len(uris), config.rows_per_file):
            committer.add(write_parts(table.slice(start, config.rows_per_file), output=str(output),
                                      storage_options={}, row_schema=schema.OUTPUT_SCHEMA))
    build_s = time.perf_counter() - started
    assert not committer.pending
    target.write_manifest({"layout": LAYOUT, "run_index": 1, "status": "complete", "config": config.to_public_dict()})

    def no_ray():
        raise AssertionError("a rerun of a complete output must not start Ray")

    started = time.perf_counter()
    summary = run(config, progress=False, connect=no_ray)
    in_process_s = time.perf_counter() - started
    started = time.perf_counter()
    command = subprocess.run([sys.executable, "-m", "jobs.annotate", "--input", str(manifest), "--output",
                              str(output), "--checkpoint", "unused", "--no-progress"], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    command_s = time.perf_counter() - started
    figures = {
        "rows": rows, "units": len(planned), "data_files": len(target.data_files()),
        "build_s": round(build_s, 2), "rerun_in_process_s": round(in_process_s, 3),
        "rerun_command_s": round(command_s, 3), "rerun_planned_units": summary.units_planned,
        "rerun_exit_code": command.returncode, "rerun_summary": command.stdout.strip().splitlines()[-1:],
    }
    manifest.unlink()
    shutil.rmtree(output, ignore_errors=True)
    return figures


def writer_figures(work: Path, rows: int, masks: int, rle_chars: int) -> dict:
    """``write_parts`` throughput on SA-1B-like rows (local disk)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.output import schema
    from pipeline.output.sink import write_parts

    rng = np.random.default_rng(0)

    def counts() -> str:  # random characters of the range COCO compressed RLE uses: no two alike
        return rng.integers(48, 112, rle_chars, dtype=np.uint8).tobytes().decode("ascii")

    def mask(k: int) -> dict:
        return {"segmentation": {"size": [1500, 2250], "counts": counts()},
                "area": 1000 + k, "bbox": [1.0, 2.0, 30.0, 40.0], "predicted_iou": 0.9,
                "point_coords": [[10.0, 20.0]], "stability_score": 0.95, "crop_box": [0.0, 0.0, 2250.0, 1500.0]}

    batch = 256
    template = [{**schema.ok_row(f"s3://sa1b/sa_{i}.jpg", 2250, 1500, [], "0" * 64),
                 "masks": [mask(k) for k in range(masks)], "num_masks": masks} for i in range(batch)]
    table = schema.rows_to_table(template)
    table = (table.append_column("unit", pa.array(["txt-0123456789ab-0-1024"] * batch))
                  .append_column("unit_index", pa.array(np.arange(batch, dtype=np.int64)))
                  .append_column("unit_last", pa.array(np.zeros(batch, dtype=bool))))
    output = work / "writer-out"
    written = 0
    started = time.perf_counter()
    while written < rows:
        shifted = table.set_column(table.schema.get_field_index("unit_index"), "unit_index",
                                   pa.array(np.arange(written, written + batch, dtype=np.int64)))
        write_parts(shifted, output=str(output), storage_options={}, row_schema=schema.OUTPUT_SCHEMA)
        written += batch
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in output.iterdir())
    shutil.rmtree(output, ignore_errors=True)
    return {"rows": written, "masks_per_row": masks, "rle_chars": rle_chars, "seconds": round(seconds, 2),
            "rows_per_s": round(written / seconds, 1), "mib_per_s": round(size / 2**20 / seconds, 1),
            "mib_written": round(size / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver-sizes", default="100000,1000000,10000000")
    parser.add_argument("--hold-s", type=float, default=20.0, help="keep the driver running after its first commit")
    parser.add_argument("--resume-rows", type=int, default=1_000_000)
    parser.add_argument("--writer-rows", type=int, default=2048)
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--rle-chars", type=int, default=800)
    parser.add_argument("--prompted-sizes", default="100000,10000000",
                        help="prompted mode's driver: a manifest of N images and a prompts table of N boxes")
    parser.add_argument("--parts", default="driver,resume,writer,prompted")
    parser.add_argument("--json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    images = sample_images(work / "images")
    figures = {"cpu": cpu_model(), "cores": os.cpu_count()}
    parts = args.parts.split(",")
    try:
        if "writer" in parts:
            figures["writer"] = writer_figures(work, args.writer_rows, args.masks, args.rle_chars)
            print(json.dumps({"writer": figures["writer"]}), flush=True)
        if "resume" in parts:
            figures["resume"] = resume_figures(work, images, args.resume_rows)
            print(json.dumps({"resume": figures["resume"]}), flush=True)
        if "driver" in parts:
            figures["driver"] = []
            for size in (int(s) for s in args.driver_sizes.split(",") if s):
                figures["driver"].append(driver_figures(work, images, size, args.hold_s))
                print(json.dumps({"driver": figures["driver"][-1]}), flush=True)
        if "prompted" in parts:
            figures["prompted"] = []
            for size in (int(s) for s in args.prompted_sizes.split(",") if s):
                figures["prompted"].append(driver_figures(work, images, size, args.hold_s, prompted=True))
                print(json.dumps({"prompted": figures["prompted"][-1]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
