"""The sieve: a minimum mapping unit for refined maps.

Refined maps fragment along boundaries: on Dubai the lite refiner's maps had 3-7 connected components per
ground-truth component against 0.7-5 for the coarse maps, and users who vectorise maps (building footprints, road
graphs) pay for every fragment. The sieve merges every region smaller than ``min_area`` pixels (4-connected and per
class, as :class:`idgbr.metrics.BoundaryPR` counts components) into its largest neighbour, with GDAL's sieve
(:func:`rasterio.features.sieve`). Nodata (``IGNORE_INDEX``) pixels are left as they are and do not count as
neighbours. The lite preset's ``sieve`` was chosen on validation (docs/results/pretrained_refiner.md).

:func:`keep_unsure` is the flip margin: the refined label only where the refiner is surer of it than of the coarse
label by a margin (``RefinerConfig.flip_margin``).

:func:`match_areas` is the area match (``RefinerConfig.area_match``): the refined labels are the argmax of the log
probabilities plus one offset per class, fitted so that each class covers as many pixels as in the coarse map
(strength 1) or part of the way there (the geometric mean of the two areas at strength 0.5). A boundary refiner
should move boundaries, not change how much of each class a map holds; on strong coarse maps the lite refiner
painted Building and Road over their neighbours (docs/results/strong_maps.md), and matching the areas removed most
of that mIoU loss at no boundary cost.

:func:`within_reach` is the class reach (``RefinerConfig.class_reach``): a pixel may take only a class that the coarse
map holds within ``reach`` pixels of it, so a boundary moves at most that far and no class appears where the coarse
map has none nearby. On validation the lite refiner's mIoU loss on strong maps came mostly from classes it put where
the coarse map had none (Building and Road between Land and Vegetation); the reach removed it and, unlike the area
match, kept the gain on weak maps (docs/results/strong_maps.md, section 5).
"""

from __future__ import annotations

import numpy as np

from ..data.dataset import IGNORE_INDEX
from ..errors import IdgbrError


def check_sieve(min_area: int) -> int:
    min_area = int(min_area)
    if min_area < 0:
        raise IdgbrError(f"--sieve must be >= 0 pixels (0: off), got {min_area}")
    return min_area


def sieve_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    """``labels`` (H, W) uint8 with regions of fewer than ``min_area`` pixels merged into their largest neighbour
    (a new array; ``min_area`` <= 1 returns the input)."""
    if check_sieve(min_area) <= 1:
        return labels
    from rasterio.features import sieve

    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    valid = labels != IGNORE_INDEX
    out = sieve(labels, min_area, mask=valid, connectivity=4)
    out[~valid] = IGNORE_INDEX
    return out.astype(np.uint8, copy=False)


def keep_unsure(labels: np.ndarray, probs: np.ndarray, coarse: np.ndarray, margin: float) -> np.ndarray:
    """``labels`` where the refined label's probability beats the ``coarse`` label's by more than ``margin``, the
    coarse label elsewhere (nodata pixels of ``coarse`` keep ``labels``). ``probs``: (K, H, W)."""
    valid = coarse != IGNORE_INDEX
    index = np.where(valid, coarse, 0).astype(np.int64)
    lead = probs.max(0) - np.take_along_axis(probs, index[None], 0)[0]
    keep = valid & (lead <= margin)
    return np.where(keep, coarse, labels).astype(labels.dtype)


def area_offsets(log_probs: np.ndarray, coarse: np.ndarray, strength: float, iters: int = 30,
                 step: float = 0.5) -> np.ndarray:
    """(K,) offsets to add to ``log_probs`` (K, N) that pull the class areas of their argmax towards those of
    ``coarse`` (N,) (strength 1), or towards the geometric mean of those and the plain argmax's areas weighted
    ``strength``. Pixels whose coarse label is nodata or out of range are left out.

    ``iters`` damped steps, each adding ``step`` x the log-area gap of every class: a partial match by design. On
    validation the areas matched exactly (steps that grow until they are) cost a third of the boundary gain
    (docs/results/strong_maps.md); these 30 steps of 0.5 were the setting chosen there."""
    k = log_probs.shape[0]
    valid = coarse < k
    log_probs, coarse = log_probs[:, valid], coarse[valid].astype(np.int64)
    offsets = np.zeros(k, np.float32)
    if strength <= 0 or not coarse.size:
        return offsets
    target = np.log(np.bincount(coarse, minlength=k) + 1.0)
    if strength < 1:
        target = strength * target + (1 - strength) * np.log(np.bincount(log_probs.argmax(0), minlength=k) + 1.0)
    for _ in range(iters):
        gap = target - np.log(np.bincount((log_probs + offsets[:, None]).argmax(0), minlength=k) + 1.0)
        if np.abs(gap).max() < 1e-3:
            break
        offsets += (step * gap).astype(np.float32)
    return offsets


def log_probs_of(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, 1e-6, 1.0))


def match_areas(probs: np.ndarray, coarse: np.ndarray, strength: float, stride: int = 4) -> np.ndarray:
    """(H, W) uint8 labels of ``probs`` (K, H, W) with :func:`area_offsets` fitted on every ``stride``-th pixel of
    each row and column against ``coarse`` (H, W); strength 0 is the plain argmax."""
    if check_area_match(strength) <= 0:
        return probs.argmax(0).astype(np.uint8)
    log_probs = log_probs_of(probs)
    k = probs.shape[0]
    sample = log_probs[:, ::stride, ::stride].reshape(k, -1)
    offsets = area_offsets(sample, np.asarray(coarse)[::stride, ::stride].ravel(), strength)
    return (log_probs + offsets[:, None, None]).argmax(0).astype(np.uint8)


def within_reach(probs: np.ndarray, coarse: np.ndarray, reach: int) -> np.ndarray:
    """``probs`` (K, H, W) (or (S, K, H, W)) with each class zeroed, and the rest renormalised, wherever the
    ``coarse`` (H, W) labels hold no pixel of that class within ``reach`` px (a disc). ``reach`` 0 returns ``probs``
    as they are."""
    if check_class_reach(reach) == 0:
        return probs
    return keep_reachable(probs, reach_mask(coarse, reach, probs.shape[-3]))


def reach_mask(coarse: np.ndarray, reach: int, num_classes: int) -> np.ndarray:
    """(K, H, W) bool: the classes that the ``coarse`` (H, W) labels hold within ``reach`` px of each pixel; a
    pixel with none in reach (nodata all around) allows every class."""
    import cv2

    coarse = np.asarray(coarse)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    allowed = np.stack([cv2.dilate((coarse == c).astype(np.uint8), kernel) for c in range(num_classes)]).astype(bool)
    return allowed | ~allowed.any(0, keepdims=True)


def keep_reachable(probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``probs`` (..., K, H, W) zeroed where ``allowed`` (K, H, W) is False and renormalised over the classes (a
    pixel whose allowed classes all have probability 0 keeps its probabilities)."""
    kept = np.where(allowed, probs, 0).astype(probs.dtype, copy=False)
    total = kept.sum(-3, keepdims=True)
    return np.where(total > 0, kept / np.maximum(total, 1e-12), probs).astype(probs.dtype, copy=False)


def finish_labels(probs: np.ndarray, coarse: np.ndarray | None, nodata: np.ndarray | None, sieve: int = 0,
                  margin: float = 0.0, area: float = 0.0, reach: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probs) of refined (K, H, W) probabilities, in the order the refiner applies them: the class reach
    (to the probabilities, which are returned so), the area match (else the argmax), the flip margin (those three
    against the (H, W) ``coarse`` labels, skipped without them), nodata pixels set to ``IGNORE_INDEX``, the sieve."""
    if reach > 0 and coarse is not None:
        probs = within_reach(probs, coarse, reach)
    labels = match_areas(probs, coarse, area) if area > 0 and coarse is not None else probs.argmax(0).astype(np.uint8)
    if margin > 0 and coarse is not None:
        labels = keep_unsure(labels, probs, coarse, margin)
    if nodata is not None:
        labels[nodata] = IGNORE_INDEX
    return sieve_labels(labels, sieve), probs


def check_class_reach(reach: int) -> int:
    if int(reach) != reach or reach < 0:
        raise IdgbrError(f"--class-reach must be a whole number of pixels >= 0 (0: off), got {reach}")
    return int(reach)


def check_flip_margin(margin: float) -> float:
    margin = float(margin)
    if not 0 <= margin < 1:
        raise IdgbrError(f"--flip-margin must lie in [0, 1) (0: plain argmax), got {margin}")
    return margin


def check_area_match(strength: float) -> float:
    strength = float(strength)
    if not 0 <= strength <= 1:
        raise IdgbrError(f"--area-match must lie in [0, 1] (0: off, 1: the coarse map's class areas), got {strength}")
    return strength
