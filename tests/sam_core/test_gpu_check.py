"""bench/gpu_check.py --dry-run: every step of the one GPU run goes through on CPU with tiny shapes,
so that run cannot fail on a typo (a wrong flag, path or name)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_completes_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] and set(report["steps"]) == {"tests", "amg", "job", "text"}
    assert all(step["rc"] == 0 for step in report["steps"].values())
    assert "collected" in " ".join(report["steps"]["tests"]["tail"])  # the test files were found
    rows = report["steps"]["amg"]["rows"]
    generators = [row["generator"] for row in rows]
    assert generators[0] == "official" and len(generators) == 5  # official, fp32 and fast at two batches
    assert all(row["img_per_s"] > 0 and row["matched"] >= 0.95 for row in rows[1:])
    job = report["steps"]["job"]
    assert job["gpu"]["samples"] > 0 and job["gpu"]["errors"] == 0  # the sampler parsed its command
    text = report["steps"]["text"]["rows"]
    assert [row["fast"] for row in text] == [False, True] and all(row["outputs"]["equal"] for row in text)
    assert all(row["job_img_per_s"] > 0 and row["loop_img_per_s"] > 0 for row in text)
    assert (out / "report.md").read_text().startswith("# GPU check (dry run")
