"""Converters from the layouts datasets are distributed in to the canonical layout (see :mod:`idgbr.data`).

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
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .data import SPLITS, ClassMap, default_split, find_file, split_stems, write_splits
from .errors import IdgbrError, file_error
from .io import IMAGE_EXTS, atomic_path, read_image, read_label, write_geotiff, write_label

Progress = Callable[[Iterable, int, str], Iterable]


def _no_progress(items: Iterable, total: int, desc: str) -> Iterable:
    return items


# ----------------------------------------------------------------------------------------------------------------
# writing a dataset: staged, then renamed into place
# ----------------------------------------------------------------------------------------------------------------
def is_dataset(folder: Path) -> bool:
    """True when ``folder`` holds a finished canonical dataset (classes.json or splits/)."""
    return (folder / "classes.json").exists() or (folder / "splits").is_dir()


class DatasetWriter:
    """Builds a canonical dataset in a hidden folder next to ``out``; :meth:`commit` moves it into place.

    Use as a context manager: leaving the block with an exception deletes everything written so far.
    """

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        if self.out.exists():
            if not self.out.is_dir():
                raise file_error(self.out, "exists and is not a folder", "choose a new folder for OUT")
            if any(self.out.iterdir()):
                if not is_dataset(self.out):
                    raise file_error(self.out, "folder is not empty and is not an idgbr dataset",
                                     "choose a new or empty folder for OUT")
                if not overwrite:
                    raise file_error(self.out, "already holds a prepared dataset", "pass --overwrite to replace it")
        self.stage = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.splits: dict[str, list[str]] = {split: [] for split in SPLITS}
        self.committed = False

    def __enter__(self) -> "DatasetWriter":
        if self.stage.exists():
            shutil.rmtree(self.stage)
        try:
            (self.stage / "images").mkdir(parents=True)
            (self.stage / "masks").mkdir()
        except OSError as exc:
            raise file_error(self.out.parent, f"cannot create the output folder ({exc.strerror})",
                             "choose a writable OUT") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.stage.exists():
            shutil.rmtree(self.stage, ignore_errors=True)

    def copy_image(self, src: Path, stem: str) -> Path:
        """Copy an image file byte for byte (keeps JPEG quality and GeoTIFF tags)."""
        dst = self.stage / "images" / f"{stem}{src.suffix.lower()}"
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return dst

    def write_image(self, stem: str, image: np.ndarray, geo: dict[str, Any] | None = None) -> Path:
        """Write an (H, W, C) image: PNG for plain 1/3-band uint8, else a GeoTIFF (keeping ``geo``)."""
        plain = geo is None or not geo.get("crs")
        if plain and image.dtype == np.uint8 and image.shape[-1] in (1, 3):
            from PIL import Image

            dst = self.stage / "images" / f"{stem}.png"
            with atomic_path(dst) as tmp:
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
        else:
            dst = self.stage / "images" / f"{stem}.tif"
            with atomic_path(dst) as tmp:
                write_geotiff(tmp, np.ascontiguousarray(np.moveaxis(image, -1, 0)), None if plain else geo)
        return dst

    def write_mask(self, stem: str, mask: np.ndarray, geo: dict[str, Any] | None = None) -> Path:
        """Write an (H, W) uint8 index mask: PNG, or GeoTIFF when ``geo`` has a CRS."""
        ext = ".tif" if geo and geo.get("crs") else ".png"
        dst = self.stage / "masks" / f"{stem}{ext}"
        write_label(dst, mask, geo if ext == ".tif" else None)
        return dst

    def add(self, stem: str, split: str) -> None:
        self.splits[split].append(stem)

    def commit(self, classes: ClassMap, splits: dict[str, Sequence[str]] | None = None) -> dict[str, int]:
        """Write classes.json and the splits, then move the staged dataset to ``out``."""
        splits = {k: sorted(v) for k, v in (splits or self.splits).items()}
        if not any(splits.values()):
            raise IdgbrError("no samples were converted; check RAW against the layout in 'idgbr prepare --help'")
        classes.save(self.stage / "classes.json")
        write_splits(self.stage, splits)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return {split: len(splits.get(split, [])) for split in SPLITS}


# ----------------------------------------------------------------------------------------------------------------
# helpers shared by converters
# ----------------------------------------------------------------------------------------------------------------
def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise file_error(path, f"{what} folder not found", "check RAW against the converter's expected layout")
    return path


def _check_same_size(image_shape: tuple[int, ...], mask_shape: tuple[int, ...], mask_path: Path, image_path: Path) -> None:
    if tuple(image_shape[:2]) != tuple(mask_shape[:2]):
        raise file_error(mask_path, f"mask size {tuple(mask_shape[:2])} differs from image size {tuple(image_shape[:2])}",
                         f"re-export the mask at the size of {image_path.name}")


def _binary(raw: np.ndarray) -> np.ndarray:
    """(H, W[, C]) raw label -> (H, W) uint8: 1 where any band is non-zero, else 0."""
    return (raw.reshape(*raw.shape[:2], -1) != 0).any(axis=-1).astype(np.uint8)


def grid_positions(length: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` px, the last window aligned to the edge (mmseg style).

    A length shorter than ``patch`` gives one window at 0 (the crop is then smaller than ``patch``).
    """
    if patch <= 0 or stride <= 0:
        raise IdgbrError(f"patch size and stride must be positive, got {patch}, {stride}")
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def _pairs_by_stem(images: Path, masks: Path, image_suffix: str = "", mask_suffix: str = "") -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image; ``*_suffix`` are name endings removed to form the stem."""
    pairs = []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")):
        stem = image.stem[: len(image.stem) - len(image_suffix)] if image_suffix and image.stem.endswith(image_suffix) else image.stem
        mask = find_file(masks, stem + mask_suffix)
        if mask is None:
            raise file_error(masks / f"{stem}{mask_suffix}.png", f"mask for {image.name} is missing",
                             "add the mask or remove the image")
        pairs.append((stem, image, mask))
    if not pairs:
        raise file_error(images, "no images found", f"expected files with one of {', '.join(IMAGE_EXTS)}")
    return pairs


def _convert_pairs(writer: DatasetWriter, pairs: Sequence[tuple[str, Path, Path]],
                   encode: Callable[[Path], np.ndarray], progress: Progress, desc: str) -> None:
    """Copy each image (after checking it decodes) and write its encoded mask."""
    for stem, image_path, mask_path in progress(pairs, len(pairs), desc):
        image, _ = read_image(image_path)  # decodes: catches truncated files now, not at training time
        mask = encode(mask_path)
        _check_same_size(image.shape, mask.shape, mask_path, image_path)
        writer.copy_image(image_path, stem)
        writer.write_mask(stem, mask)


# ----------------------------------------------------------------------------------------------------------------
# dubai
# ----------------------------------------------------------------------------------------------------------------
DUBAI_CLASSES = ("Building", "Land", "Road", "Vegetation", "Water", "Unlabeled")
DUBAI_COLOURS = ([60, 16, 152], [132, 41, 246], [110, 193, 228], [254, 221, 58], [226, 169, 41], [155, 155, 155])


def convert_dubai(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress) -> dict[str, Any]:
    """``raw/images/tileT_partKK.jpg`` + colour-coded ``raw/masks/tileT_partKK.png``; tiles 1-6 train, 7-8 test."""
    colours = ClassMap(list(DUBAI_CLASSES), [list(c) for c in DUBAI_COLOURS], ignore=[[0, 0, 0]])
    pairs = _pairs_by_stem(_need_dir(raw / "images", "images"), _need_dir(raw / "masks", "masks"))

    def encode(path: Path) -> np.ndarray:
        mask, _ = read_label(path, expand_palette=True)  # 18 masks are palette PNGs
        return colours.encode(mask, path)

    for stem, image_path, _ in pairs:
        if not stem.startswith("tile") or not stem[4:].split("_")[0].isdigit():
            raise file_error(image_path, "name does not start with tile<N>_", "keep the Dubai file names (tileT_partKK)")
        writer.add(stem, "train" if int(stem[4:].split("_")[0]) <= 6 else "test")
    _convert_pairs(writer, pairs, encode, progress, "dubai")
    writer.commit(ClassMap.indexed(DUBAI_CLASSES))
    return {}


CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "dubai": convert_dubai,
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


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
