"""idgbr: diffusion-based boundary refinement of remote-sensing segmentation maps.

    >>> from idgbr import Refiner
    >>> refiner = Refiner.from_pretrained("runs/lite")
    >>> refined = refiner.refine(image, coarse, steps=2, strength=0.4, guidance=1.0)

Heavy modules are imported lazily, so ``import idgbr`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IdgbrError": "idgbr.errors",
    "ClassMap": "idgbr.data.dataset",
    "SegmentationDataset": "idgbr.data.dataset",
    "Refiner": "idgbr.inference.pipeline",
    "RefinerConfig": "idgbr.nn.config",
    "IDGBRModel": "idgbr.nn.model",
    "LabelEmbedding": "idgbr.nn.labelembed",
    "evaluate_maps": "idgbr.metrics",
    "ConfusionMatrix": "idgbr.metrics",
    "weighted_fmeasure": "idgbr.metrics",
    "CoarseModel": "idgbr.nn.coarse_model",
    "train_coarse": "idgbr.training.coarse",
    "predict_coarse": "idgbr.training.coarse",
    "train_refiner": "idgbr.training.loop",
    "refine_scene": "idgbr.inference.scene",
    "prepare": "idgbr.data.prepare",
    "read_image": "idgbr.data.io",
    "read_label": "idgbr.data.io",
    "write_label": "idgbr.data.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'idgbr' has no attribute {name!r}")
