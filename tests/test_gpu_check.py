"""idgbr gpu-check --smoke: every stage runs (tiny sizes, CPU) and lands in the table."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "idgbr", "gpu-check", "--smoke", "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 1 + 2 + 1 + 2  # training, inference (batch x NFE), sd15 training, sd15 inference x 2
    assert not any("skipped" in row for row in rows)
    assert "steps/s" in rows[0] and "s/step" in rows[3] and all("ms/tile" in row for row in rows[1:3] + rows[4:])
