"""The sieve: a minimum mapping unit for refined maps.

Refined maps fragment along boundaries: on Dubai the lite refiner's maps had 3-7 connected components per
ground-truth component against 0.7-5 for the coarse maps, and users who vectorise maps (building footprints, road
graphs) pay for every fragment. The sieve merges every region smaller than ``min_area`` pixels (4-connected and per
class, as :class:`idgbr.metrics.BoundaryPR` counts components) into its largest neighbour, with GDAL's sieve
(:func:`rasterio.features.sieve`). Nodata (``IGNORE_INDEX``) pixels are left as they are and do not count as
neighbours. The lite preset's ``sieve`` was chosen on validation (docs/results/pretrained_refiner.md).

:func:`keep_unsure` is the flip margin: the refined label only where the refiner is surer of it than of the coarse
label by a margin (``RefinerConfig.flip_margin``).
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
