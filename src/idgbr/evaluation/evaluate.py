"""Evaluate a folder of predicted index maps against a dataset split, and format the result.

``evaluate_folder`` pairs every stem of the split with ``PRED/<stem>.png|.tif`` (and ``COARSE/<stem>.*`` when a
coarse folder is given), scores them with :func:`idgbr.metrics.evaluate_maps` one image at a time, and returns
its dict. ``format_markdown`` / ``format_csv`` / ``format_json`` render that dict; ``compare_markdown`` puts
several results side by side.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..data.dataset import IGNORE_INDEX, SegmentationDataset, coarse_folder, read_index_map
from ..errors import IdgbrError, file_error
from ..metrics import evaluate_maps

PRED_EXTS = (".png", ".tif", ".tiff")  # lossless only: a JPEG prediction would invent classes at edges


def _resolve_folder(data_root: Path, folder: str | Path, what: str, flag: str) -> Path:
    """A folder given as a path, or as a name under ``DATA/coarse/``."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    under = data_root / "coarse" / folder
    if not folder.is_absolute() and under.is_dir():
        return under
    raise file_error(folder, f"{what} folder not found", f"give an existing folder (or a name under {data_root / 'coarse'}) to {flag}")


def _find_map(folder: Path, stem: str, what: str, flag: str) -> Path:
    for ext in PRED_EXTS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    raise file_error(folder / f"{stem}.png", f"{what} missing for test stem {stem!r}",
                     f"write {what}s for every stem of the split (PNG or TIF named <stem>.png) into {flag}")


def _read_map(path: Path, num_classes: int, mask_path: Path, shape: tuple[int, int]) -> np.ndarray:
    label = read_index_map(path, num_classes)
    if label.shape != tuple(shape):
        raise file_error(path, f"size {label.shape[1]}x{label.shape[0]} (WxH) differs from the mask {mask_path} "
                         f"({shape[1]}x{shape[0]})", "predict at the mask's full size")
    return label


def evaluate_folder(data_root: str | Path, pred_dir: str | Path, split: str = "test",
                    coarse_dir: str | Path | None = None, tolerances: Sequence[int] = (1, 3, 5), k: float = 1.0,
                    progress: bool = True, gate_width: int | None = None, sieve: int = 0) -> dict[str, Any]:
    """Score ``pred_dir/<stem>.png|.tif`` against the split's masks; with ``coarse_dir``, also the coarse maps and
    the repair analysis. Returns the :func:`~idgbr.metrics.evaluate_maps` dict plus ``data``, ``pred``, ``split``
    (and ``coarse_dir``). A missing prediction or a size mismatch raises :class:`IdgbrError` naming the file(s).

    ``gate_width`` (needs ``coarse_dir``) scores the "do no harm" gated prediction: the refined label within
    ``gate_width`` px of a coarse boundary, the coarse label elsewhere (what ``idgbr refine --gate`` writes).
    ``sieve`` > 1 scores the prediction (after gating) with regions smaller than ``sieve`` px merged into their
    largest neighbour (what ``idgbr refine --sieve`` writes; :mod:`idgbr.inference.postprocess`).
    """
    from ..inference.postprocess import check_sieve, sieve_labels

    sieve = check_sieve(sieve)
    data_root = Path(data_root)
    tolerances = [int(t) for t in tolerances]
    if not tolerances or min(tolerances) < 1:
        raise IdgbrError(f"--tolerances {tolerances}: give one or more widths >= 1 pixel, e.g. 1 3 5")
    if gate_width is not None and (coarse_dir is None or gate_width < 0):
        raise IdgbrError(f"--gate {gate_width}: gating needs --coarse DIR and a width >= 0 pixels")
    dataset = SegmentationDataset(data_root, split)
    pred = _resolve_folder(data_root, pred_dir, "prediction", "--pred")
    coarse = None
    if coarse_dir is not None:  # as refine reads --coarse: a name under DATA/coarse/ first, then a path
        coarse = _resolve_folder(data_root, coarse_folder(data_root, coarse_dir), "coarse-map", "--coarse")
    num_classes = dataset.classes.num_classes
    for stem in dataset.stems:  # fail before any work if a file is missing
        _find_map(pred, stem, "prediction", str(pred))
        if coarse is not None:
            _find_map(coarse, stem, "coarse map", str(coarse))

    def pairs() -> Iterator[tuple[np.ndarray, ...]]:
        from tqdm.auto import tqdm

        for stem in tqdm(dataset.stems, desc="evaluate", unit="map", disable=not progress, leave=False):
            mask = dataset.read_mask(stem)
            mask_path = dataset.mask_path(stem)
            refined = _read_map(_find_map(pred, stem, "prediction", str(pred)), num_classes, mask_path, mask.shape)
            if coarse is None:
                yield mask, sieve_labels(refined, sieve)
            else:
                coarse_map = _read_map(_find_map(coarse, stem, "coarse map", str(coarse)), num_classes, mask_path,
                                       mask.shape)
                if gate_width is not None:
                    from ..inference.seams import gate_band

                    refined = np.where(gate_band(coarse_map, gate_width), refined, coarse_map)
                yield mask, sieve_labels(refined, sieve), coarse_map

    result = evaluate_maps(pairs(), num_classes, tolerances=tolerances, k=k, class_names=dataset.classes.names,
                           ignore_index=IGNORE_INDEX)
    result.update(data=str(data_root), pred=str(pred), split=split)
    if coarse is not None:
        result["coarse_dir"] = str(coarse)
    if gate_width is not None:
        result["gate_width"] = gate_width
    if sieve > 1:
        result["sieve"] = sieve
    return result


# ----------------------------------------------------------------------------------------------------- formatters
def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _headline(result: dict[str, Any]) -> list[tuple[str, float | None]]:
    rows: list[tuple[str, float | None]] = [("mIoU", result["miou"]), ("mF1", result["mf1"]), ("OA", result["oa"]),
                                            ("Kappa", result["kappa"])]
    rows += [(f"WFm ({tol}px B)", value) for tol, value in result["wfm"].items()]
    rows += [(f"boundary F ({tol}px)", value["f"]) for tol, value in result.get("bf", {}).items()]
    return rows


def format_markdown(result: dict[str, Any], title: str = "Evaluation") -> str:
    """A paper-style report: per-class IoU / F1, then mIoU, mF1, OA, Kappa and WFm per tolerance (percent);
    with coarse maps, a coarse vs refined table and the repair analysis."""
    lines = [f"# {title}", ""]
    if "pred" in result:
        lines += [f"Predictions `{result['pred']}` on split `{result.get('split', '?')}` of `{result.get('data', '?')}`: "
                  f"{result['num_images']} maps, {result['num_pixels']} labelled pixels.", ""]
    lines += ["| class | IoU | F1 | precision | recall |", "|---|---|---|---|---|"]
    for row in result["per_class"]:
        name = row["name"] + ("" if row["present"] else " (absent from GT)")
        lines.append(f"| {name} | {_pct(row['iou'])} | {_pct(row['f1'])} | {_pct(row['precision'])} | {_pct(row['recall'])} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_pct(value)} |" for name, value in _headline(result)]
    lines += ["", "Values in percent. mIoU/mF1 average the classes present in the ground truth; WFm is the minimum "
              "over band classes of the mean weighted F-measure of the boundary bands (reference §9.4). Boundary F "
              "(not a metric of the paper) is the harmonic mean of boundary precision and recall at that tolerance, "
              "pooled over images: a second look at WFm, which also rewards boundary pixels added near the true ones."]
    if "components_ratio" in result:
        lines += ["", f"Connected components per ground-truth component: {result['components_ratio']:.2f}; boundary "
                     f"pixels per ground-truth boundary pixel: {result['boundary_ratio']:.2f}."]
    if result.get("invalid_pred_pixels"):
        lines.append(f"{result['invalid_pred_pixels']} labelled pixels had no valid prediction (nodata) and count "
                     "as errors.")
    if "coarse" in result:
        coarse = dict(_headline(result["coarse"]))
        lines += ["", "## Coarse vs refined", "", "| metric | coarse | refined | Δ |", "|---|---|---|---|"]
        for name, value in _headline(result):
            before = coarse.get(name)
            delta = f"{100 * (value - before):+.2f}" if value is not None and before is not None else "–"
            lines.append(f"| {name} | {_pct(before)} | {_pct(value)} | {delta} |")
        if "components_ratio" in result["coarse"] and "components_ratio" in result:
            lines += ["", f"Connected components per ground-truth component: coarse "
                          f"{result['coarse']['components_ratio']:.2f}, refined {result['components_ratio']:.2f}."]
    if "repair" in result:
        repair = result["repair"]
        lines += ["", f"## Repair analysis (k = {repair['k']:g})", "",
                  "| class | IoU_RTm | IoU_RFm | IoU_imp |", "|---|---|---|---|"]
        for row in repair["per_class"]:
            lines.append(f"| {row['name']} | {_pct(row['iou_rtm'])} | {_pct(row['iou_rfm'])} | {_pct(row['iou_imp'])} |")
        lines.append(f"| mean | {_pct(repair['iou_rtm'])} | {_pct(repair['iou_rfm'])} | {_pct(repair['iou_imp'])} |")
        fractions = repair["bucket_fractions"]
        lines += ["", "| repair (per image) | images | share |", "|---|---|---|"]
        for key, label in (("complete", "complete (IoU_imp ≥ 0.8)"), ("partial", "partial (0 ≤ IoU_imp < 0.8)"),
                           ("error", "error (IoU_imp < 0)")):
            lines.append(f"| {label} | {repair['buckets'][key]} | {_pct(fractions[key])} |")
        if repair["num_unscored_images"]:
            lines.append(f"\n{repair['num_unscored_images']} image(s) had no coarse error region to score.")
    return "\n".join(lines) + "\n"


def format_csv(result: dict[str, Any]) -> str:
    """One ``scope,metric,value`` row per number (fractions): ``all`` / ``coarse`` scopes, then per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scope", "metric", "value"])
    scopes = [("all", result)] + ([("coarse", result["coarse"])] if "coarse" in result else [])
    for scope, res in scopes:
        for key in ("miou", "mf1", "oa", "kappa", "fwiou"):
            writer.writerow([scope, key, res[key]])
        for tol, value in res["wfm"].items():
            writer.writerow([scope, f"wfm{tol}", value])
        for tol, value in res.get("bf", {}).items():
            for key in ("precision", "recall", "f"):
                writer.writerow([scope, f"boundary_{key}{tol}", value[key]])
        for key in ("boundary_ratio", "components_ratio"):
            if key in res:
                writer.writerow([scope, key, res[key]])
        for row in res["per_class"]:
            for key in ("iou", "f1", "precision", "recall"):
                writer.writerow([f"{scope}:{row['name']}" if scope != "all" else row["name"], key, row[key]])
    if "repair" in result:
        repair = result["repair"]
        for key in ("iou_rtm", "iou_rfm", "iou_imp"):
            writer.writerow(["repair", key, "" if repair[key] is None else repair[key]])
        for key, value in repair["buckets"].items():
            writer.writerow(["repair", f"{key}_images", value])
    return buffer.getvalue()


def format_json(result: dict[str, Any]) -> str:
    """Strict JSON (NaN/inf become null)."""
    return json.dumps(_finite(result), indent=2) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def compare_markdown(results: dict[str, dict[str, Any]]) -> str:
    """A multi-row table (percent): one row per named result, columns mIoU, mF1, OA, Kappa, WFm per tolerance."""
    if not results:
        return ""
    tolerances: list[str] = []
    for res in results.values():
        tolerances += [t for t in res["wfm"] if t not in tolerances]
    header = ["mIoU", "mF1", "OA", "Kappa"] + [f"WFm {t}px" for t in tolerances]
    lines = ["| | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for name, res in results.items():
        cells = [_pct(res[key]) for key in ("miou", "mf1", "oa", "kappa")]
        cells += [_pct(res["wfm"].get(t)) for t in tolerances]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FORMATTERS = {"md": lambda result: format_markdown(result), "json": format_json, "csv": format_csv}
