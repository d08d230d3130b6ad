"""Converters from the layouts datasets are distributed in to the canonical layout (see :mod:`idgbr.data.dataset`).

``prepare(name, raw, out, **options)`` looks ``name`` up in :data:`CONVERTERS` and returns a summary dict. Every
converter writes index-coded masks (0..K-1, 255 = ignore), ``classes.json`` with index values and
``splits/{train,val,test}.txt``. The dataset is built in a hidden sibling folder and renamed to ``out`` only when
complete, so a failed conversion leaves nothing behind; a finished dataset in ``out`` is replaced only with
``overwrite=True``, and a non-empty folder that is not a dataset is never touched.

Converters (options in brackets):

- ``dubai``: the bundled Dubai aerial set; tiles 1-6 train (54), 7-8 test (18); black = ignore.
- ``potsdam`` [bands=rgb|irrg|rgbir, patch_size=512, stride=patch_size, labels=None]: ISPRS tiles, mmseg split
  (24 train / 14 test tiles), edge-aligned grid: 144 patches per 6000² tile, 3,456 train / 2,016 test.
- ``vaihingen`` [patch_size=512, stride=patch_size, labels=None]: ISPRS areas, mmseg split (16 / 17 areas).
- ``chn6-cug`` [seed=0]: road (any non-zero label) vs background, seeded 8:1:1 over train+val.
- ``fgfd`` [seed=0]: farmland (non-zero) vs background, seeded 8:1:1.
- ``whu-building`` [phase=2012|2016|both, patch_size=512, stride=patch_size, seed=0]: GeoTIFF crops, 8:1:1.
- ``folder`` [images, masks, palette, splits, seed]: any image/mask folders; 80/20 by stem hash by default.
"""

from __future__ import annotations

import difflib
import inspect
import time
from pathlib import Path
from typing import Any, Callable

from .dataset import SPLITS, ClassMap
from ..errors import IdgbrError, file_error
from .converters import (convert_chn6_cug, convert_dubai, convert_fgfd, convert_folder, convert_potsdam,
                         convert_vaihingen, convert_whu_building)
from .writer import DatasetWriter, Progress, _no_progress, _read_lines

CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "dubai": convert_dubai,
    "potsdam": convert_potsdam,
    "vaihingen": convert_vaihingen,
    "chn6-cug": convert_chn6_cug,
    "fgfd": convert_fgfd,
    "whu-building": convert_whu_building,
    "folder": convert_folder,
}


def prepare(name: str, raw: str | Path, out: str | Path, overwrite: bool = False, progress: Progress | None = None,
            **options: Any) -> dict[str, Any]:
    """Convert the dataset ``name`` from its distribution layout in ``raw`` to the canonical layout in ``out``.

    Returns ``{"name", "out", "splits": {split: count}, "classes": [...], "seconds", ...converter extras}``.
    """
    if name not in CONVERTERS:
        close = difflib.get_close_matches(name, list(CONVERTERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IdgbrError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(CONVERTERS)}")
    converter = CONVERTERS[name]
    allowed = [p for p in inspect.signature(converter).parameters if p not in ("raw", "writer", "progress")]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise IdgbrError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in unknown)} do not apply to {name!r}; "
                         f"its options: {', '.join('--' + a.replace('_', '-') for a in allowed) or 'none'}")
    raw = Path(raw)
    if not raw.is_dir():
        raise file_error(raw, "RAW folder not found", f"point RAW at the {name} dataset as distributed")
    start = time.perf_counter()
    with DatasetWriter(out, overwrite) as writer:
        extras = converter(raw, writer, progress or _no_progress, **options) or {}
        if not writer.committed:
            raise RuntimeError(f"converter {name!r} did not commit")
    classes = ClassMap.load(Path(out) / "classes.json")
    counts = {split: len(_read_lines(Path(out) / "splits" / f"{split}.txt")) for split in SPLITS}
    return {"name": name, "out": str(out), "splits": counts, "classes": classes.names,
            "seconds": round(time.perf_counter() - start, 2), **extras}
