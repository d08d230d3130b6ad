"""The paper's metrics: confusion-matrix scores, boundary WFm and the repair analysis (and, as a second look at
WFm, boundary precision / recall and fragmentation: :class:`BoundaryPR`).

Everything follows ``reference-idgbr.md`` §9 (the authors' ``evaluation/`` package), with three deliberate
differences, each documented where it happens:

* a prediction outside the class set (a value >= K, including 255 nodata) counts as an error; the authors'
  code silently drops such pixels (§9.2), which flatters a model that predicts e.g. Potsdam clutter;
* mIoU / mF1 average over the classes present in the split's ground truth (the authors average over all K);
* a perfect prediction has Kappa 1 even when a single class fills the split (the raw formula gives 0 there).

All accumulators are streaming: ``update`` one image at a time, ``compute`` / ``result`` at the end.
:func:`evaluate_maps` wires them together and returns the JSON-ready dict used by ``idgbr evaluate``.

The code: :mod:`idgbr.metrics.maps` (confusion matrix, repair analysis, :func:`evaluate_maps`) and
:mod:`idgbr.metrics.boundary` (boundary band, WFm, :class:`BoundaryPR`).
"""

from .boundary import (EPS, IGNORE_INDEX, BoundaryPR, BoundaryWFm, boundary_band, label_edges, weighted_fmeasure,
                       wfm_band_scores)
from .maps import ConfusionMatrix, MapEvaluator, RepairAnalysis, evaluate_maps

__all__ = ["EPS", "IGNORE_INDEX", "BoundaryPR", "BoundaryWFm", "ConfusionMatrix", "MapEvaluator", "RepairAnalysis",
           "boundary_band", "evaluate_maps", "label_edges", "weighted_fmeasure", "wfm_band_scores"]
