"""``idgbr evaluate`` end to end on a tiny dataset written in tmp_path, and the report formatters."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idgbr.commands.main import main
from idgbr.errors import IdgbrError
from idgbr.evaluation.evaluate import compare_markdown, evaluate_folder, format_csv, format_json, format_markdown

STEMS = ("a", "b", "c")


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mask(seed: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 3:] = 1
    mask[seed * 3:seed * 3 + 10, size // 2:size - 4] = 2
    mask[-3:, :4] = 255  # ignored
    return mask


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i, stem in enumerate(STEMS):
        write_png(root / "images" / f"{stem}.png", np.full((32, 32, 3), 40 * i, np.uint8))
        write_png(root / "masks" / f"{stem}.png", make_mask(i))
    classes = {"classes": [{"name": "ground", "value": 0}, {"name": "field", "value": 1},
                           {"name": "building", "value": 2}], "ignore": [255]}
    (root / "classes.json").write_text(json.dumps(classes))
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("\n".join(STEMS) + "\n")
    (root / "splits" / "train.txt").write_text("")
    return root


def write_predictions(folder: Path, shift: int = 0) -> Path:
    for i, stem in enumerate(STEMS):
        pred = make_mask(i)  # keeps the GT's 255: ignored by the confusion matrix, but part of the bands (§9.4)
        write_png(folder / f"{stem}.png", np.roll(pred, shift, axis=1))
    return folder


def test_evaluate_json_end_to_end(dataset: Path, tmp_path: Path, capsys) -> None:
    pred = write_predictions(tmp_path / "pred")
    coarse = write_predictions(dataset / "coarse" / "rough", shift=3)
    code = main(["evaluate", "--data", str(dataset), "--pred", str(pred), "--split", "test", "--coarse", "rough",
                 "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    for key in ("miou", "mf1", "oa", "kappa", "wfm", "per_class", "repair", "coarse", "num_images"):
        assert key in result
    assert set(result["wfm"]) == {"1", "3", "5"}
    assert result["num_images"] == 3
    assert result["miou"] == pytest.approx(1.0) and result["wfm"]["3"] == pytest.approx(1.0)
    assert result["coarse"]["miou"] < 1.0
    assert [row["name"] for row in result["per_class"]] == ["ground", "field", "building"]
    assert all(0 <= row["iou"] <= 1 for row in result["per_class"])
    assert result["repair"]["buckets"]["complete"] == 3
    assert result["coarse_dir"] == str(coarse)


def test_coarse_name_comes_before_a_same_named_folder(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """--coarse NAME means DATA/coarse/NAME in evaluate as in refine (SegmentationDataset), even when a folder of that
    name sits in the working directory; --pred stays path first."""
    from idgbr.evaluation.evaluate import evaluate_folder

    named = write_predictions(dataset / "coarse" / "rough", shift=3)
    write_predictions(tmp_path / "rough")  # a perfect map under the same name, in the working directory
    monkeypatch.chdir(tmp_path)
    result = evaluate_folder(dataset, write_predictions(tmp_path / "pred"), "test", coarse_dir="rough", progress=False)
    assert result["coarse_dir"] == str(named) and result["coarse"]["miou"] < 1.0
    only_here = write_predictions(tmp_path / "pass1")
    assert evaluate_folder(dataset, only_here, "test", coarse_dir="pass1", progress=False)["coarse_dir"] == "pass1"


def test_evaluate_markdown_csv_and_out_file(dataset: Path, tmp_path: Path, capsys) -> None:
    pred = write_predictions(tmp_path / "pred", shift=1)
    assert main(["evaluate", "--data", str(dataset), "--pred", str(pred), "--tolerances", "3"]) == 0
    text = capsys.readouterr().out
    assert "| building |" in text and "mIoU" in text and "WFm (3px B)" in text
    out_file = tmp_path / "report" / "metrics.csv"
    assert main(["evaluate", "--data", str(dataset), "--pred", str(pred), "--format", "csv",
                 "--out", str(out_file)]) == 0
    rows = list(csv.reader(io.StringIO(out_file.read_text())))
    assert rows[0] == ["scope", "metric", "value"]
    assert ["all", "wfm5"] == rows[[r[1] for r in rows].index("wfm5")][:2]


def test_missing_prediction_is_one_line_error(dataset: Path, tmp_path: Path, capsys) -> None:
    pred = write_predictions(tmp_path / "pred")
    (pred / "b.png").unlink()
    code = main(["evaluate", "--data", str(dataset), "--pred", str(pred), "--format", "json"])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "b.png" in lines[0] and "Traceback" not in captured.err


def test_size_mismatch_names_both_files(dataset: Path, tmp_path: Path) -> None:
    pred = write_predictions(tmp_path / "pred")
    write_png(pred / "c.png", np.zeros((16, 32), np.uint8))
    with pytest.raises(IdgbrError) as info:
        evaluate_folder(dataset, pred, "test", progress=False)
    message = str(info.value)
    assert "c.png" in message and str(dataset / "masks" / "c.png") in message and "\n" not in message


def test_missing_pred_folder_and_bad_tolerance(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(IdgbrError, match="--pred"):
        evaluate_folder(dataset, tmp_path / "nowhere", "test", progress=False)
    with pytest.raises(IdgbrError, match="tolerances"):
        evaluate_folder(dataset, write_predictions(tmp_path / "pred"), "test", tolerances=(0,), progress=False)


def test_formatters(dataset: Path, tmp_path: Path) -> None:
    refined = evaluate_folder(dataset, write_predictions(tmp_path / "pred"), "test",
                              coarse_dir=write_predictions(tmp_path / "coarse", shift=2), progress=False)
    md = format_markdown(refined, "Tiny")
    assert md.startswith("# Tiny") and "Coarse vs refined" in md and "complete (IoU_imp ≥ 0.8)" in md
    assert "| boundary F (3px) | 100.00 |" in md and "coarse 1.67, refined 1.00" in md  # the roll splits a region
    assert "boundary_precision3" in format_csv(refined)
    assert json.loads(format_json(refined))["miou"] == pytest.approx(1.0)
    table = compare_markdown({"coarse": refined["coarse"], "refined": refined})
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "WFm 5px" in lines[0] and lines[3].startswith("| refined | 100.00")
    assert "repair,iou_imp" in format_csv(refined)


def test_gated_evaluation_keeps_coarse_outside_the_band(dataset: Path, tmp_path: Path) -> None:
    """Gate 0 scores (almost) the coarse map, a wide gate the refined map; a mid gate lies between."""
    pred = write_predictions(tmp_path / "pred")
    write_predictions(dataset / "coarse" / "rough", shift=3)
    plain = evaluate_folder(dataset, pred, "test", coarse_dir="rough", progress=False)
    wide = evaluate_folder(dataset, pred, "test", coarse_dir="rough", gate_width=40, progress=False)
    none = evaluate_folder(dataset, pred, "test", coarse_dir="rough", gate_width=0, progress=False)
    # (the coarse maps' nodata pixels stay nodata under any gate, hence not exactly equal)
    assert wide["miou"] == pytest.approx(plain["miou"], abs=0.02) and wide["gate_width"] == 40
    assert none["miou"] < plain["miou"]  # gate 0: only the coarse boundary pixels themselves are refined
    assert none["miou"] > plain["coarse"]["miou"]
    with pytest.raises(IdgbrError, match="--gate"):
        evaluate_folder(dataset, pred, "test", gate_width=3, progress=False)
