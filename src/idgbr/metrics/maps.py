"""Scores of whole label maps: the confusion matrix (OA, mIoU, mF1, Kappa), the repair analysis, and
:func:`evaluate_maps`, which wires every accumulator together (see :mod:`idgbr.metrics`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from .boundary import IGNORE_INDEX, BoundaryPR, BoundaryWFm, _safe_div


# ----------------------------------------------------------------------------------------------- confusion matrix
class ConfusionMatrix:
    """A dataset-level (micro) confusion matrix, rows = ground truth, columns = prediction (§9.3).

    The matrix has ``num_classes + 1`` columns: the last one counts pixels whose prediction is not a class index
    (>= ``num_classes``, including 255 nodata). Those pixels are errors: they add to the ground-truth total of
    their class (a false negative) but to no class's prediction total. **The authors' code drops such pixels
    instead** (§9.2), which scores e.g. Potsdam pixels predicted as clutter as if they did not exist.
    Pixels whose ground truth is ``ignore_index`` are excluded.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image: ``gt`` and ``pred`` are (H, W) integer index maps of the same shape."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"gt {gt.shape} and pred {pred.shape} differ in shape")
        k = self.num_classes
        gt = gt.ravel().astype(np.int64)
        pred = pred.ravel().astype(np.int64)
        valid = gt != self.ignore_index
        if not valid.all():
            gt, pred = gt[valid], pred[valid]
        if gt.size and (gt.min() < 0 or gt.max() >= k):
            raise ValueError(f"ground-truth values must be 0..{k - 1} or {self.ignore_index}")
        pred = np.where((pred < 0) | (pred >= k), k, pred)
        self.matrix += np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)

    def compute(self) -> dict[str, Any]:
        """Per-class IoU/precision/recall/F1 (lists), and OA, Kappa, FW-IoU, mIoU, mF1 (floats).

        A zero denominator gives 0. Classes absent from the ground truth are reported (``present`` False) but
        left out of mIoU and mF1; with no labelled pixel at all every score is 0.
        """
        m = self.matrix.astype(np.float64)
        tp = np.diag(m[:, : self.num_classes])
        gt_sum = m.sum(axis=1)
        pred_sum = m[:, : self.num_classes].sum(axis=0)
        total = float(m.sum())
        iou = _safe_div(tp, gt_sum + pred_sum - tp)
        precision = _safe_div(tp, pred_sum)
        recall = _safe_div(tp, gt_sum)
        f1 = _safe_div(2 * tp, gt_sum + pred_sum)  # == 2PR / (P + R)
        present = gt_sum > 0
        oa = float(tp.sum() / total) if total else 0.0
        if total and tp.sum() == total:
            kappa = 1.0  # perfect agreement; the raw formula gives 0 when one class fills the split (pe = 1)
        elif total:
            pe = float((pred_sum * gt_sum).sum() / total**2)
            kappa = (oa - pe) / (1.0 - pe + 1e-10)
        else:
            kappa = 0.0
        fwiou = float((gt_sum / total * iou).sum()) if total else 0.0
        return {
            "iou": iou.tolist(), "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "present": present.tolist(), "gt_pixels": gt_sum.astype(np.int64).tolist(),
            "pred_pixels": pred_sum.astype(np.int64).tolist(),
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "mf1": float(f1[present].mean()) if present.any() else 0.0,
            "oa": oa, "kappa": float(kappa), "fwiou": fwiou,
            "num_pixels": int(total), "invalid_pred_pixels": int(self.matrix[:, -1].sum()),
        }


# ----------------------------------------------------------------------------------------------- repair analysis
class RepairAnalysis:
    """Repair capability of a refinement (README of the reference, §9.6; the authors never implemented it).

    Per class c, with M_t = (gt == c), M_r = (coarse == c), M_re = (refined == c) over labelled pixels:
    IoU_RTm = |M_re ∩ M_RTm| / |M_RTm| with M_RTm = M_t ∩ M_r (coarse true positives kept),
    IoU_RFm = |M_t ∩ M_re ∩ M_RFm| / |(M_t ∪ M_re) ∩ M_RFm| with M_RFm = M_t xor M_r (IoU inside the coarse
    errors), IoU_imp = IoU_RFm - k (1 - IoU_RTm). An empty denominator gives NaN, skipped in every mean (so a
    class the coarse map already got right is not scored). ``classes`` defaults to [1] for binary data (the
    README's binary masks) and to every class otherwise. Split-level values pool pixel counts over images;
    the buckets use each image's IoU_imp (mean over its scored classes): complete >= 0.8, partial [0, 0.8),
    error < 0.
    """

    def __init__(self, num_classes: int, k: float = 1.0, classes: Sequence[int] | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.k = float(k)
        self.classes = list(classes) if classes is not None else ([1] if num_classes == 2 else list(range(num_classes)))
        self.ignore_index = ignore_index
        self.counts = np.zeros((len(self.classes), 4), dtype=np.int64)  # rt_num, rt_den, rf_num, rf_den
        self.image_scores: list[float] = []

    def update(self, gt: np.ndarray, coarse: np.ndarray, refined: np.ndarray) -> float:
        """Add one image; returns its IoU_imp (NaN when no class can be scored)."""
        gt, coarse, refined = np.asarray(gt), np.asarray(coarse), np.asarray(refined)
        if not gt.shape == coarse.shape == refined.shape:
            raise ValueError(f"gt {gt.shape}, coarse {coarse.shape} and refined {refined.shape} differ in shape")
        valid = gt != self.ignore_index
        per_image = np.zeros((len(self.classes), 4), dtype=np.int64)
        for row, c in enumerate(self.classes):
            m_t, m_r, m_re = gt == c, (coarse == c) & valid, (refined == c) & valid
            true_kept = m_t & m_r
            wrong = (m_t ^ m_r)
            per_image[row] = (np.count_nonzero(true_kept & m_re), np.count_nonzero(true_kept),
                              np.count_nonzero(wrong & m_t & m_re), np.count_nonzero(wrong & (m_t | m_re)))
        self.counts += per_image
        scores = self._imp(per_image)
        finite = scores[np.isfinite(scores)]
        value = float(finite.mean()) if finite.size else float("nan")
        self.image_scores.append(value)
        return value

    def _imp(self, counts: np.ndarray) -> np.ndarray:
        rt, rf = _nan_div(counts[:, 0], counts[:, 1]), _nan_div(counts[:, 2], counts[:, 3])
        return rf - self.k * (1.0 - rt)

    def result(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Per-class and mean IoU_RTm / IoU_RFm / IoU_imp, and the per-image repair buckets."""
        rt, rf = _nan_div(self.counts[:, 0], self.counts[:, 1]), _nan_div(self.counts[:, 2], self.counts[:, 3])
        imp = rf - self.k * (1.0 - rt)
        names = class_names or [str(c) for c in range(self.num_classes)]
        scores = np.asarray(self.image_scores, dtype=np.float64)
        scored = scores[np.isfinite(scores)]
        buckets = {"complete": int((scored >= 0.8).sum()), "partial": int(((scored >= 0) & (scored < 0.8)).sum()),
                   "error": int((scored < 0).sum())}
        n = max(int(scored.size), 1)
        return {
            "k": self.k,
            "iou_rtm": _nan_mean(rt), "iou_rfm": _nan_mean(rf), "iou_imp": _nan_mean(imp),
            "per_class": [{"name": names[c], "index": c, "iou_rtm": _json_float(a), "iou_rfm": _json_float(b),
                           "iou_imp": _json_float(d)} for c, a, b, d in zip(self.classes, rt, rf, imp)],
            "buckets": buckets,
            "bucket_fractions": {key: value / n if scored.size else 0.0 for key, value in buckets.items()},
            "num_scored_images": int(scored.size),
            "num_unscored_images": int(scores.size - scored.size),
        }


def _nan_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nan_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------- the whole set
class MapEvaluator:
    """Confusion matrix + boundary WFm for one set of predictions (streaming)."""

    def __init__(self, num_classes: int, tolerances: Sequence[int] = (1, 3, 5), ignore_index: int = IGNORE_INDEX,
                 aggregate: Literal["min", "mean"] = "min"):
        self.confusion = ConfusionMatrix(num_classes, ignore_index)
        self.boundary = BoundaryWFm(tolerances, aggregate)
        self.boundary_pr = BoundaryPR(tolerances, ignore_index)
        self.num_images = 0

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        self.confusion.update(gt, pred)
        self.boundary.update(gt, pred)
        self.boundary_pr.update(gt, pred)
        self.num_images += 1

    def result(self, class_names: Sequence[str]) -> dict[str, Any]:
        cm = self.confusion.compute()
        wfm = self.boundary.result()
        per_class = [{"name": name, "index": i, "iou": cm["iou"][i], "precision": cm["precision"][i],
                      "recall": cm["recall"][i], "f1": cm["f1"][i], "present": cm["present"][i],
                      "gt_pixels": cm["gt_pixels"][i], "pred_pixels": cm["pred_pixels"][i]}
                     for i, name in enumerate(class_names)]
        return {"miou": cm["miou"], "mf1": cm["mf1"], "oa": cm["oa"], "kappa": cm["kappa"], "fwiou": cm["fwiou"],
                "wfm": wfm["wfm"], "wfm_band": wfm["band"], "wfm_classes": wfm["classes"],
                "wfm_aggregate": self.boundary.aggregate, **self.boundary_pr.result(), "per_class": per_class,
                "num_pixels": cm["num_pixels"], "invalid_pred_pixels": cm["invalid_pred_pixels"],
                "num_images": self.num_images}


def evaluate_maps(pairs: Iterable[tuple[np.ndarray, ...]], num_classes: int, tolerances: Sequence[int] = (1, 3, 5),
                  k: float = 1.0, class_names: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX,
                  aggregate: Literal["min", "mean"] = "min") -> dict[str, Any]:
    """Score (gt, pred) or (gt, pred, coarse) index maps, one image at a time.

    Returns ``miou``, ``mf1``, ``oa``, ``kappa``, ``fwiou``, ``wfm`` ({"1": .., "3": .., "5": ..}), ``wfm_band``,
    ``bf`` / ``boundary_ratio`` / ``components_ratio`` / ``components`` (:class:`BoundaryPR`), ``per_class``
    (name, iou, precision, recall, f1, present, pixel counts), ``num_images``, ``num_classes``, ``class_names``;
    with coarse maps also ``coarse`` (the same scores for the coarse maps) and ``repair`` (:class:`RepairAnalysis`).
    Scores are fractions in [0, 1], except Kappa (in [-1, 1]; negative only for a prediction worse than chance),
    IoU_imp (which can be negative; ``None`` when undefined) and the ratios (``boundary_ratio``, ``components_ratio``).
    """
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    refined = MapEvaluator(num_classes, tolerances, ignore_index, aggregate)
    coarse_eval: MapEvaluator | None = None
    repair: RepairAnalysis | None = None
    for item in pairs:
        if len(item) not in (2, 3):
            raise ValueError("each item must be (gt, pred) or (gt, pred, coarse)")
        gt, pred = item[0], item[1]
        refined.update(gt, pred)
        if len(item) == 3:
            if coarse_eval is None:
                if refined.num_images > 1:
                    raise ValueError("give a coarse map for every image or for none")
                coarse_eval = MapEvaluator(num_classes, tolerances, ignore_index, aggregate)
                repair = RepairAnalysis(num_classes, k, ignore_index=ignore_index)
            coarse_eval.update(gt, item[2])
            repair.update(gt, item[2], pred)
        elif coarse_eval is not None:
            raise ValueError("give a coarse map for every image or for none")
    result = refined.result(names)
    result.update(num_classes=num_classes, class_names=names, tolerances=[int(t) for t in tolerances])
    if coarse_eval is not None and repair is not None:
        result["coarse"] = coarse_eval.result(names)
        result["repair"] = repair.result(names)
    return result
