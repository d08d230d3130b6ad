"""Trained models that ship with idgbr, and how a model name becomes a folder.

The package carries small trained models under ``idgbr/models/<name>/``, each a folder that rebuilds its model on its
own (``config.json`` + safetensors) with a model card (``README.md``: what it is, how it was made, its test figures;
``card.json``: the same figures, machine-readable). ``idgbr build-models`` rebuilds them.

:func:`resolve_model` turns what a user typed after ``--model`` (or passed to ``from_pretrained``) into a folder:

1. an existing local folder, as given;
2. a shipped name (``dubai-lite``, ``dubai-coarse``);
3. a Hugging Face repo id (``owner/name``), fetched with ``huggingface_hub`` where the network allows it; offline it
   fails with a one-line error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import IdgbrError, file_error

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"  # src/idgbr/models: package data, see pyproject.toml

# name -> (kind, what it is): the kind is the loader that reads it ("refiner": Refiner.from_pretrained,
# "coarse": CoarseModel.load)
SHIPPED: dict[str, tuple[str, str]] = {
    "dubai-lite": ("refiner", "the lite IDGBR refiner for the 6 Dubai aerial classes"),
    "dubai-coarse": ("coarse", "a cheap DeepLabV3+ coarse model for the 6 Dubai aerial classes"),
}
DEFAULT_REFINER = "dubai-lite"
DEFAULT_COARSE = "dubai-coarse"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def shipped_path(name: str) -> Path:
    """The folder of the shipped model ``name``."""
    if name not in SHIPPED:
        raise IdgbrError(f"unknown shipped model {name!r}; shipped models: {', '.join(SHIPPED)}")
    path = MODELS_DIR / name
    if not (path / "config.json").exists():
        raise file_error(path, "shipped model missing from this installation",
                         "reinstall idgbr from a full clone, or rebuild it with 'idgbr build-models'")
    return path


def card(name: str) -> dict[str, Any]:
    """The machine-readable model card (``card.json``) of a shipped model."""
    return json.loads((shipped_path(name) / "card.json").read_text())


def resolve_model(name: str | Path, kind: str, fix: str) -> Path:
    """The folder behind ``name``: a local folder, a shipped model of this ``kind``, or a Hugging Face repo id.

    ``fix`` is what the error message tells the user to do when nothing matches (e.g. how to train a model)."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if text in SHIPPED:
        shipped_kind = SHIPPED[text][0]
        if shipped_kind != kind:
            names = [n for n, (k, _) in SHIPPED.items() if k == kind]
            raise IdgbrError(f"{text}: a shipped {shipped_kind} model, not a {kind} model; shipped {kind} models: "
                             f"{', '.join(names)}")
        return shipped_path(text)
    if _REPO_ID.match(text):
        return _from_hub(text, fix)
    raise file_error(path, "model folder not found", fix)


def _from_hub(repo_id: str, fix: str) -> Path:
    """Download (or find in the local cache) a Hugging Face model repo; offline, a one-line error."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of diffusers and transformers
        raise IdgbrError(f"{repo_id}: not a local folder, and huggingface_hub is not installed to fetch it; "
                         "pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, no such repo, no network: one line, with the reason
        from huggingface_hub.constants import HF_HUB_OFFLINE

        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if HF_HUB_OFFLINE else \
            f"could not be fetched from the Hugging Face Hub ({type(exc).__name__})"
        raise IdgbrError(f"{repo_id}: no such local folder, not a shipped model ({', '.join(SHIPPED)}), and {why}; "
                         f"{fix}") from None


# --- which shipped refiner fits the user's data ----------------------------------------------------------------

def shipped_refiner(coarse: Path | None = None, data: str | Path | None = None, split: str = "test",
                    announce: bool = True) -> str:
    """The name of the shipped refiner when the classes of a dataset (``data``/``split``) or of one ``coarse`` map
    fit it; else a one-line :class:`IdgbrError` that says how to train one. ``announce`` prints which model runs
    (also used per scene by ``idgbr refine-archive``, quietly)."""
    import sys

    info = card(DEFAULT_REFINER)
    classes = info["classes"]
    train = (f"the shipped refiner '{DEFAULT_REFINER}' knows {len(classes)} classes ({', '.join(classes)}); train one "
             "for your classes with 'idgbr train --preset lite --data DATA --out RUN' and pass --model RUN")
    if data is not None:
        from ..data.dataset import SegmentationDataset

        dataset = SegmentationDataset(data, split, load_mask=False)
        if dataset.classes.num_classes != len(classes):
            raise IdgbrError(f"{dataset.root / 'classes.json'}: {dataset.classes.num_classes} classes, but {train}")
    elif coarse is not None:
        largest = _largest_class(Path(coarse))
        if largest >= len(classes):
            raise IdgbrError(f"{coarse}: holds class {largest}, but {train}")
    if announce:
        print(f"refining with the shipped refiner '{DEFAULT_REFINER}' ({info['summary']}); pass --model RUN for your own",
              file=sys.stderr)
    return DEFAULT_REFINER


def _largest_class(path: Path) -> int:
    """The largest class index in a coarse map (255 = nodata does not count), or K - 1 for (K, H, W) .npy
    probabilities; an unreadable file is left to the normal checks (returns -1)."""
    import numpy as np

    from ..data.dataset import IGNORE_INDEX
    from ..data.io import read_label

    try:
        if path.suffix.lower() == ".npy":
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0]) - 1
        label, _ = read_label(path)
    except Exception:  # the refine path reports it with its own one-line error
        return -1
    if label.ndim != 2:  # colour-coded: the normal checks explain it
        return -1
    valid = label[label != IGNORE_INDEX]
    return int(valid.max()) if valid.size else -1
