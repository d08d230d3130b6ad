"""Writing a dataset in the canonical layout (:mod:`idgbr.data.dataset`): :class:`DatasetWriter` builds it in a
hidden sibling folder and renames it into place only when complete; with the helpers the converters share.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .dataset import SPLITS, ClassMap, find_file, write_splits
from ..errors import IdgbrError, file_error
from .io import IMAGE_EXTS, atomic_path, read_image, write_geotiff, write_label


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


def _resolve(raw: Path, given: str) -> Path:
    """A path given as an option: as is when it exists (absolute or relative to the working folder), else under RAW."""
    return Path(given) if Path(given).exists() else raw / given


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
                   encode: Callable[[Path], np.ndarray], progress: Progress, desc: str, scale: float = 1.0) -> None:
    """Copy each image (after checking it decodes) and write its encoded mask; ``scale`` < 1 resamples both
    (images area-averaged, labels nearest) and writes PNG images."""
    if not 0 < scale <= 1:
        raise IdgbrError(f"--scale must be in (0, 1], got {scale}")
    for stem, image_path, mask_path in progress(pairs, len(pairs), desc):
        image, _ = read_image(image_path)  # decodes: catches truncated files now, not at training time
        mask = encode(mask_path)
        _check_same_size(image.shape, mask.shape, mask_path, image_path)
        if scale == 1:
            writer.copy_image(image_path, stem)
            writer.write_mask(stem, mask)
            continue
        import cv2

        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        writer.write_image(stem, small.reshape(size[1], size[0], -1))
        writer.write_mask(stem, cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
