"""scripts/profile_train.py runs the lite preset's own defaults (it mirrors the training objective, so it must
follow the model's interface: a broken profiler is how the throughput tables go stale)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_profile_train_runs_lite_defaults() -> None:
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_train.py"), "--preset", "lite",
                             "--batch", "1", "--crop", "64", "--steps", "2", "--warmup", "1", "--log-every", "1",
                             "--device", "cpu", "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    phases = [line for line in result.stdout.splitlines() if line.startswith("| ") and "ms/step" not in line]
    assert [row.split("|")[1].strip() for row in phases] == [
        "data", "encode", "condition", "forward", "backward", "optimiser", "logging", "**total**"]
    assert "steps/s" in result.stdout
