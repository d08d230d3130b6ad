"""scripts/experiments/boundary_check.py: one table of boundary precision / recall / F and fragmentation for several folders
(metrics.BoundaryPR is tested in test_metrics.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_command_line_table_json_and_bad_names(tmp_path: Path) -> None:
    from idgbr.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, n=4, size=32, seed=0)
    stems = [p.stem for p in (data / "masks").glob("*.png")]
    pred = tmp_path / "pred"
    pred.mkdir()
    for stem in stems:
        Image.fromarray(np.array(Image.open(data / "masks" / f"{stem}.png"))).save(pred / f"{stem}.png")
    script = [sys.executable, str(REPO / "scripts" / "experiments" / "boundary_check.py"), "--data", str(data), "--split", "train"]
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(script + [f"truth={pred}", "--json", str(tmp_path / "b.json")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| truth | 100.0 | 100.0 | 100.0 | 1.00 | 1.0 |" in out.stdout
    assert json.loads((tmp_path / "b.json").read_text())["rows"]["truth"]["f"] == 1.0
    twice = subprocess.run(script + [f"a={pred}", f"a={pred}"], capture_output=True, text=True, env=env, timeout=300)
    assert twice.returncode == 2 and "given twice" in twice.stderr and len(twice.stderr.strip().splitlines()) == 1
