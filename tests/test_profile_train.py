"""scripts/experiments/profile_train.py runs the lite preset's own defaults, for both objectives (it times the training loop's
own RefinerObjective through its phase marks: a broken profiler is how the throughput tables go stale)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("objective", ["diffusion", "deterministic"])
def test_profile_train_runs_lite_defaults(objective: str) -> None:
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "experiments" / "profile_train.py"), "--preset", "lite",
                             "--batch", "1", "--crop", "64", "--steps", "2", "--warmup", "1", "--log-every", "1",
                             "--device", "cpu", "--threads", "1", "--set", f"objective={objective}"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    phases = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert [row.split("|")[1].strip() for row in phases] == [
        "data", "encode", "condition", "forward", "backward", "optimiser", "logging", "**total**"]
    assert "steps/s" in result.stdout
    assert all(float(row.split("|")[2].strip(" *")) > 0 for row in phases[1:4]), result.stdout  # the marks fired
