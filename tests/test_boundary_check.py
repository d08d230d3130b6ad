"""scripts/boundary_check.py: boundary precision / recall at a tolerance and fragmentation, on hand-made maps and
through its command line on a generated dataset."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("boundary_check", REPO / "scripts" / "boundary_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _halves(split_at: int) -> np.ndarray:
    label = np.zeros((32, 32), np.uint8)
    label[:, split_at:] = 1
    return label


def test_shifted_boundary_counts_only_within_the_tolerance() -> None:
    check = _module().check
    gt, shifted = _halves(16), _halves(18)  # boundary pixels at x = 15/16 and 17/18: 1-3 px apart
    near = check([gt], [shifted], tolerance=3)
    assert near["precision"] == near["recall"] == near["f"] == 1.0
    far = check([gt], [shifted], tolerance=0.5)
    assert far["precision"] == far["recall"] == 0.0
    same = check([gt], [gt], tolerance=0)
    assert same["f"] == 1.0 and same["boundary_ratio"] == 1.0 and same["component_ratio"] == 1.0


def test_a_speck_far_from_the_boundary_costs_precision_and_adds_components() -> None:
    check = _module().check
    gt = _halves(16)
    speck = gt.copy()
    speck[5:7, 3:5] = 1  # a 2x2 island of class 1, 9 px from the true boundary
    result = check([gt], [speck], tolerance=3)
    assert result["recall"] == 1.0 and result["precision"] < 1.0
    assert result["component_ratio"] == 1.5 and result["boundary_ratio"] > 1.0
    ignored = gt.copy()
    ignored[:, :6] = 255  # borders with ignore pixels are not boundaries, and the speck lies in the ignore area
    assert check([ignored], [speck], tolerance=3)["precision"] == 1.0


def test_command_line_table_json_and_bad_names(tmp_path: Path) -> None:
    from idgbr.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, n=4, size=32, seed=0)
    stems = [p.stem for p in (data / "masks").glob("*.png")]
    pred = tmp_path / "pred"
    pred.mkdir()
    for stem in stems:
        Image.fromarray(np.array(Image.open(data / "masks" / f"{stem}.png"))).save(pred / f"{stem}.png")
    script = [sys.executable, str(REPO / "scripts" / "boundary_check.py"), "--data", str(data), "--split", "train"]
    env = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(script + [f"truth={pred}", "--json", str(tmp_path / "b.json")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| truth | 100.0 | 100.0 | 100.0 | 1.00 | 1.0 |" in out.stdout
    assert json.loads((tmp_path / "b.json").read_text())["rows"]["truth"]["f"] == 1.0
    twice = subprocess.run(script + [f"a={pred}", f"a={pred}"], capture_output=True, text=True, env=env, timeout=300)
    assert twice.returncode == 2 and "given twice" in twice.stderr and len(twice.stderr.strip().splitlines()) == 1
