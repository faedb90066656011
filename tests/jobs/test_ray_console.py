"""What a run prints: our progress and summary, not the notices Ray gave on every run (issue 13).

Each run is the real command in a fresh process with its own local Ray, as a user runs it: the
notices come from Ray starting up and Ray Data planning, once per process, so they cannot be seen
from inside the shared test session. One input makes Ray Data warn that the write stage may run more
tasks at once than it has inputs.
"""
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

# A line of each notice, as Ray 2.60 prints it.
RAY_NOTICES = {
    "auth token": "Token authentication is enabled for this Ray cluster",
    "local start": "Started a local Ray instance",
    "Ray Data plan": "Starting execution of Dataset",
    "progress bars": "Progress bars disabled",
    "write concurrency": "The maximum number of concurrent tasks",
}


def run_demo(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.annotate", "--demo", "--output", str(output), "--limit", "1",
         "--num-actors", "2", "--gpus-per-actor", "0", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sam-annotate: 1 ok, 0 failed" in result.stdout
    assert (output / "_SUCCESS").exists()
    return result


def test_a_run_shows_our_progress_and_summary_without_rays_notices(tmp_path):
    result = run_demo(tmp_path)
    shown = {name: line for name, line in RAY_NOTICES.items() if line in result.stderr}
    assert not shown, f"Ray notices still printed: {sorted(shown)}\n{result.stderr[-3000:]}"
    # stderr is a pipe here, so progress comes as log lines, the last one once every image is in
    assert "annotating: 1/1 images" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("annotating:") == 1  # the final progress line, once


def test_verbose_brings_rays_own_lines_back(tmp_path):
    result = run_demo(tmp_path, "--verbose")
    missing = {name for name, line in RAY_NOTICES.items() if line not in result.stderr}
    assert not missing, f"--verbose should show them: {sorted(missing)}\n{result.stderr[-3000:]}"
