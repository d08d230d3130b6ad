"""Boundary metrics: the boundary band, the weighted F-measure (WFm, in the band of each tolerance) and, as a second
look at boundaries, boundary precision / recall and fragmentation (:class:`BoundaryPR`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import cv2
import numpy as np


IGNORE_INDEX = 255
EPS = float(np.finfo(np.float64).eps)  # MATLAB's eps, as in Margolin's code
_WFM_SIGMA = 5.0
_WFM_RADIUS = 3  # 7x7 Gaussian (scipy truncate = 3 / sigma)
_WFM_KERNEL = cv2.getGaussianKernel(2 * _WFM_RADIUS + 1, _WFM_SIGMA, cv2.CV_64F)  # normalised; separable = fspecial
_WFM_KERNEL_2D = (_WFM_KERNEL @ _WFM_KERNEL.T).ravel()
_B_SLOPE = math.log(0.5) / 5.0
# Offsets (dy, dx) to search for a non-GT pixel's nearest GT pixel, in the order scipy's exact feature transform
# (Maurer et al. 2003, used by pysodmetrics) resolves ties: nearest first, then smallest column, then smallest row.
# Pixels within Chebyshev distance 3 of the GT (all that the 7x7 Gaussian can reach) have it within sqrt(18).
_NEAR_OFFSETS = sorted(((dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx <= 18),
                       key=lambda o: (o[0] ** 2 + o[1] ** 2, o[1], o[0]))
# Offsets by increasing distance, to find the distance to the GT of false positives near it without a full EDT.
_DIST_RADIUS = 6
_DIST_OFFSETS = sorted(((dy, dx) for dy in range(-_DIST_RADIUS, _DIST_RADIUS + 1)
                        for dx in range(-_DIST_RADIUS, _DIST_RADIUS + 1) if 0 < dy * dy + dx * dx <= _DIST_RADIUS ** 2),
                       key=lambda o: o[0] ** 2 + o[1] ** 2)
_PAD = _DIST_RADIUS


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


# ------------------------------------------------------------------------------------------------- boundary WFm
def _edges(label: np.ndarray) -> np.ndarray:
    """Sobel-magnitude > 0 on the uint8 map (ksize 3, float64, BORDER_REFLECT_101): §9.4 step 1.1-1.2."""
    image = np.ascontiguousarray(np.asarray(label).astype(np.uint8))
    gx = cv2.Sobel(image, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(image, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    return ((gx != 0) | (gy != 0)).astype(np.uint8)  # sqrt(gx^2 + gy^2) > 0


def _band_from_edges(edges: np.ndarray, label_u8: np.ndarray, tolerance: int) -> np.ndarray:
    if tolerance < 1:
        raise ValueError("tolerance must be >= 1 pixel")
    band = cv2.dilate(edges, np.ones((tolerance, tolerance), np.uint8), iterations=1) if tolerance > 1 else edges
    return (band > 0) & (label_u8 != 255)  # binarise 'lt255'


def boundary_band(label: np.ndarray, tolerance: int) -> np.ndarray:
    """The binarised boundary band of an index map, (H, W) bool, exactly as §9.4 steps 1-2.

    The map is cast to uint8, Sobel x/y (ksize 3) mark every pixel with a label change in its 3x3
    neighbourhood, the edge map is dilated once with ``ones((tolerance, tolerance))`` and binarised with the
    reference's ``lt255`` rule. As in the reference, ignore pixels (255) take part: their borders with labelled
    pixels are boundaries, and a 255 pixel inside the band is read as outside it.
    """
    label_u8 = np.asarray(label).astype(np.uint8)
    return _band_from_edges(_edges(label_u8), label_u8, tolerance)


def _rings(offsets: list[tuple[int, int]]) -> list[list[int]]:
    """Group positions in ``offsets`` (already in priority order) by equal squared distance."""
    rings: dict[int, list[int]] = {}
    for position, (dy, dx) in enumerate(offsets):
        rings.setdefault(dy * dy + dx * dx, []).append(position)
    return [rings[key] for key in sorted(rings)]


_NEAR_RINGS, _DIST_RINGS = _rings(_NEAR_OFFSETS), _rings(_DIST_OFFSETS)


def _first_hit(mask_flat: np.ndarray, flat: np.ndarray, offsets: list[tuple[int, int]], rings: list[list[int]],
               width: int) -> np.ndarray:
    """For each flat index, the position in ``offsets`` of the first offset landing on a True pixel (-1: none).

    Offsets are tried ring by ring (equal distance), all offsets of a ring at once; within a ring the first hit
    in ``offsets`` order wins.
    """
    steps = np.asarray([dy * width + dx for dy, dx in offsets], dtype=np.int32)
    found = np.full(flat.size, -1, dtype=np.intp)
    todo = np.arange(flat.size, dtype=np.int32)
    todo_flat = flat.astype(np.int32)
    for ring in rings:
        ring_positions = np.asarray(ring)
        hits = mask_flat[todo_flat[:, None] + steps[ring_positions][None, :]]
        first = hits.argmax(axis=1)
        hit = np.take_along_axis(hits, first[:, None], axis=1)[:, 0]
        done = np.flatnonzero(hit)
        found[todo[done]] = ring_positions[first[done]]
        left = np.flatnonzero(~hit)
        if not left.size:
            break
        todo, todo_flat = todo[left], todo_flat[left]
    return found


def _crop_distances(gt: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Exact distance to the GT at pixels (ys, xs), from an exact EDT (cv2, Felzenszwalb) on as small a crop
    as proves exact: a distance <= margin inside the crop (bbox + margin) is the true one."""
    height, width = gt.shape
    dist = np.full(ys.size, np.inf)
    todo = np.arange(ys.size)
    for margin in (16, 64, max(height, width)):
        y0, y1 = max(int(ys[todo].min()) - margin, 0), min(int(ys[todo].max()) + margin + 1, height)
        x0, x1 = max(int(xs[todo].min()) - margin, 0), min(int(xs[todo].max()) + margin + 1, width)
        crop = np.ascontiguousarray(~gt[y0:y1, x0:x1]).view(np.uint8)
        local = cv2.distanceTransform(crop, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[ys[todo] - y0, xs[todo] - x0]
        exact = (local <= margin) | ((y0, x0, y1, x1) == (0, 0, height, width))
        dist[todo[exact]] = local[exact]
        todo = todo[~exact]
        if not todo.size:
            break
    return dist


def _fp_distances(gt: np.ndarray, gt_flat: np.ndarray, flat: np.ndarray, width: int) -> np.ndarray:
    """Exact Euclidean distance to the GT of the given (padded flat) non-GT pixels."""
    squared = np.asarray([dy * dy + dx * dx for dy, dx in _DIST_OFFSETS], dtype=np.float64)
    position = _first_hit(gt_flat, flat, _DIST_OFFSETS, _DIST_RINGS, width)
    dist = np.sqrt(np.take(squared, position))
    far = position < 0
    if far.any():  # farther than the search radius
        ys, xs = np.divmod(flat[far], width)
        dist[far] = _crop_distances(gt, ys - _PAD, xs - _PAD)
    return dist


def weighted_fmeasure(pred: np.ndarray, gt: np.ndarray, beta: float = 1.0) -> float:
    """Margolin et al.'s weighted F-beta (CVPR 2014) of a map ``pred`` in [0, 1] against a binary ``gt``.

    Follows §9.4 (and pysodmetrics' ``WeightedFmeasure``) exactly: E = |D - G|; off G, E is replaced by E at
    the nearest G pixel (Euclidean, scipy's tie order); a normalised 7x7 Gaussian (sigma 5, zero padding);
    min(E, EA) on G; weights 2 - exp(ln(0.5)/5 * dist) off G; Q = (1 + beta^2) R P / (eps + R + beta P), the
    authors' ``beta * P`` (identical for beta = 1). Only the pixels that can change the result are computed:
    the nearest-GT search runs only around G pixels with E > 0, distances only where E > 0 off G.

    An empty ``gt`` returns 0, as pysodmetrics and the MATLAB original do; the band metric never asks for it
    (a class absent from an image's ground truth is not scored there).
    """
    gt = np.ascontiguousarray(np.asarray(gt).astype(bool))
    pred = np.asarray(pred)
    if pred.shape != gt.shape or gt.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be equal (H, W) shapes")
    num_gt = int(np.count_nonzero(gt))
    if num_gt == 0:
        return 0.0
    gt_pad = cv2.copyMakeBorder(gt.view(np.uint8), _PAD, _PAD, _PAD, _PAD, cv2.BORDER_CONSTANT, value=0).view(bool)
    width = gt_pad.shape[1]
    gt_flat = gt_pad.ravel()
    if pred.dtype == bool:
        err = (pred != gt).view(np.uint8)
    else:
        pred = pred.astype(np.float64)
        if pred.size and (pred.min() < 0 or pred.max() > 1):
            raise ValueError("pred values must lie in [0, 1]")
        err = np.abs(pred - gt)
    err_pad = cv2.copyMakeBorder(err, _PAD, _PAD, _PAD, _PAD, cv2.BORDER_CONSTANT, value=0)
    err_flat = err_pad.ravel()
    wrong_pad = err_pad > 0

    def err_value(index: np.ndarray) -> np.ndarray:
        return np.take(err_flat, index).astype(np.float64, copy=False)

    missed_pad = wrong_pad & gt_pad  # G pixels where min(E, EA) can be non-zero
    sum_gt_weighted = 0.0
    missed = np.flatnonzero(missed_pad)
    if missed.size:
        # Et: E on G and, off G within reach of the 7x7 Gaussian of a missed pixel, E at the nearest G pixel.
        err_t = np.zeros(err_flat.shape, err_flat.dtype)
        err_t[missed] = err_flat[missed]
        region = cv2.dilate(missed_pad.view(np.uint8), np.ones((7, 7), np.uint8)).view(bool) & ~gt_pad
        region[:_PAD], region[-_PAD:], region[:, :_PAD], region[:, -_PAD:] = False, False, False, False  # E = 0 outside
        near = np.flatnonzero(region)
        if near.size:
            position = _first_hit(gt_flat, near, _NEAR_OFFSETS, _NEAR_RINGS, width)
            steps = np.asarray([dy * width + dx for dy, dx in _NEAR_OFFSETS], dtype=np.intp)
            err_t[near] = err_flat[near + steps[position]]
        # EA = Gaussian(Et), zero padding; only its values on the missed pixels are needed.
        if missed.size * 49 < err_t.size * 4:
            window = np.asarray([dy * width + dx for dy in range(-_WFM_RADIUS, _WFM_RADIUS + 1)
                                 for dx in range(-_WFM_RADIUS, _WFM_RADIUS + 1)], dtype=np.intp)
            err_a = (np.take(err_t, missed[:, None] + window[None, :]) * _WFM_KERNEL_2D).sum(axis=1)  # no BLAS: deterministic
        else:
            err_a = cv2.sepFilter2D(err_t.reshape(gt_pad.shape).astype(np.float64), cv2.CV_64F, _WFM_KERNEL,
                                    _WFM_KERNEL, borderType=cv2.BORDER_CONSTANT).ravel()[missed]
        sum_gt_weighted = float(np.minimum(err_value(missed), err_a).sum())
    false_pos = np.flatnonzero(wrong_pad & ~gt_pad)
    fp_weighted = 0.0
    if false_pos.size:
        weight = 2.0 - np.exp(_B_SLOPE * _fp_distances(gt, gt_flat, false_pos, width))
        fp_weighted = float((err_value(false_pos) * weight).sum())
    tp_weighted = num_gt - sum_gt_weighted
    recall = 1.0 - sum_gt_weighted / num_gt
    precision = tp_weighted / (EPS + tp_weighted + fp_weighted)
    return float((1 + beta**2) * recall * precision / (EPS + recall + beta * precision))


def wfm_band_scores(pred: np.ndarray, gt: np.ndarray, tolerance: int) -> dict[int, float]:
    """Per-image ``MultiClassWFmeasure`` of the boundary bands (§9.4 step 3).

    Returns {class: Q} for the band classes present in the GT band map (0 = non-band, 1 = band); an image
    without a true boundary has only class 0.
    """
    return _band_scores(boundary_band(pred, tolerance), boundary_band(gt, tolerance))


def _band_scores(pred_band: np.ndarray, gt_band: np.ndarray) -> dict[int, float]:
    scores: dict[int, float] = {}
    num_band = int(np.count_nonzero(gt_band))
    if num_band < gt_band.size:
        scores[0] = weighted_fmeasure(~pred_band, ~gt_band)
    if num_band:
        scores[1] = weighted_fmeasure(pred_band, gt_band)
    return scores


class BoundaryWFm:
    """Streaming boundary WFm at several tolerances (§9.4 steps 3-4).

    ``aggregate='min'`` (the paper's "WFm (e px B)"): per band class the mean of Q over the images in which it
    occurs in the GT band, class means <= 0 discarded, then the minimum (``'mean'``: their mean; 0 when none
    is left). ``result()['band']`` also gives the plain mean of the band-class score over images that have a
    true boundary, which is what the min normally reduces to.
    """

    def __init__(self, tolerances: Sequence[int] = (1, 3, 5), aggregate: Literal["min", "mean"] = "min"):
        if aggregate not in ("min", "mean"):
            raise ValueError("aggregate must be 'min' or 'mean'")
        self.tolerances = tuple(int(t) for t in tolerances)
        for t in self.tolerances:
            if t < 1:
                raise ValueError("tolerances must be >= 1 pixel")
        self.aggregate = aggregate
        self.sums = {t: np.zeros(2) for t in self.tolerances}
        self.counts = {t: np.zeros(2, dtype=np.int64) for t in self.tolerances}

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image pair of (H, W) index maps. Sobel runs once per map, the dilation once per tolerance."""
        gt_u8, pred_u8 = np.asarray(gt).astype(np.uint8), np.asarray(pred).astype(np.uint8)
        if gt_u8.shape != pred_u8.shape:
            raise ValueError(f"gt {gt_u8.shape} and pred {pred_u8.shape} differ in shape")
        gt_edges, pred_edges = _edges(gt_u8), _edges(pred_u8)
        for t in self.tolerances:
            scores = _band_scores(_band_from_edges(pred_edges, pred_u8, t), _band_from_edges(gt_edges, gt_u8, t))
            for cls, q in scores.items():
                self.sums[t][cls] += q
                self.counts[t][cls] += 1

    def result(self) -> dict[str, dict[str, float]]:
        """{'wfm': {tol: aggregate}, 'band': {tol: band-class mean}, 'classes': {tol: [non-band, band]}}."""
        out: dict[str, dict[str, Any]] = {"wfm": {}, "band": {}, "classes": {}}
        for t in self.tolerances:
            means = _safe_div(self.sums[t], self.counts[t].astype(np.float64))
            kept = means[(self.counts[t] > 0) & (means > 0)]
            value = 0.0 if not kept.size else float(kept.min() if self.aggregate == "min" else kept.mean())
            out["wfm"][str(t)] = value
            out["band"][str(t)] = float(means[1])
            out["classes"][str(t)] = [float(v) for v in means]
        return out


# ------------------------------------------------------------------------- boundary precision / recall (BF score)
def label_edges(label: np.ndarray, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """(H, W) bool: pixels whose 4-neighbourhood holds another class (both sides of each boundary; borders with
    ``ignore_index`` pixels do not count)."""
    label = np.asarray(label)
    edge = np.zeros(label.shape, bool)
    valid = np.ones(label.shape, bool) if ignore_index is None else label != ignore_index
    vertical = (label[1:] != label[:-1]) & valid[1:] & valid[:-1]
    horizontal = (label[:, 1:] != label[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


class BoundaryPR:
    """Boundary precision, recall and F at pixel tolerances, pooled over images (the BF score of Csurka et al.,
    BMVC 2013, with pooled counts), and fragmentation: connected components per ground-truth component.

    Not one of the paper's metrics: a second look at WFm, which scores dilated boundary bands per image and cannot
    tell a boundary moved onto the true one from boundary pixels added near it. Precision: the share of the map's
    boundary pixels (:func:`label_edges`) within ``tolerance`` px (Euclidean) of a ground-truth boundary pixel;
    recall: the share of ground-truth boundary pixels within ``tolerance`` of the map's. Pixels that are ignore in
    the ground truth are left out of the map too. Components are 4-connected, per class.
    """

    def __init__(self, tolerances: Sequence[int] = (1, 3, 5), ignore_index: int = IGNORE_INDEX):
        self.tolerances = tuple(int(t) for t in tolerances)
        self.ignore_index = ignore_index
        self.hits_pred = {t: 0 for t in self.tolerances}
        self.hits_gt = {t: 0 for t in self.tolerances}
        self.n_pred = self.n_gt = self.components_pred = self.components_gt = 0

    @staticmethod
    def _distance_to(edges: np.ndarray) -> np.ndarray:
        if not edges.any():
            return np.full(edges.shape, np.inf)
        return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)

    def _components(self, label: np.ndarray, valid: np.ndarray) -> int:
        total = 0
        for k in np.unique(label[valid]):
            total += cv2.connectedComponents(((label == k) & valid).astype(np.uint8), connectivity=4)[0] - 1
        return total

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        gt, pred = np.asarray(gt), np.asarray(pred)
        valid = gt != self.ignore_index
        pred = np.where(valid, pred, self.ignore_index)
        gt_edge, pred_edge = label_edges(gt, self.ignore_index), label_edges(pred, self.ignore_index)
        to_gt, to_pred = self._distance_to(gt_edge), self._distance_to(pred_edge)
        for t in self.tolerances:
            self.hits_pred[t] += int(np.count_nonzero(pred_edge & (to_gt <= t)))
            self.hits_gt[t] += int(np.count_nonzero(gt_edge & (to_pred <= t)))
        self.n_pred += int(np.count_nonzero(pred_edge))
        self.n_gt += int(np.count_nonzero(gt_edge))
        self.components_pred += self._components(pred, valid)
        self.components_gt += self._components(gt, valid)

    def result(self) -> dict[str, Any]:
        """{'bf': {tol: {'precision', 'recall', 'f'}}, 'boundary_ratio': map / GT boundary pixels,
        'components_ratio': map / GT components, 'components': the map's}."""
        bf = {}
        for t in self.tolerances:
            precision = self.hits_pred[t] / self.n_pred if self.n_pred else float("nan")
            recall = self.hits_gt[t] / self.n_gt if self.n_gt else float("nan")
            f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            bf[str(t)] = {"precision": precision, "recall": recall, "f": f}
        return {"bf": bf, "boundary_ratio": self.n_pred / self.n_gt if self.n_gt else float("nan"),
                "components_ratio": self.components_pred / self.components_gt if self.components_gt else float("nan"),
                "components": self.components_pred}
