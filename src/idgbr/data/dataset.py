"""The canonical dataset layout and its reader.

```
DATA/
  images/<stem>.png|jpg|tif     3-band or N-band (a GeoTIFF keeps CRS/transform in the sample)
  masks/<stem>.png|tif          label maps, index- or colour-coded (see classes.json)
  classes.json                  {"classes": [{"name": ..., "value": 0 | [r, g, b]}, ...], "ignore": [255, ...]}
  splits/train.txt, val.txt, test.txt   stems, one per line (optional: else 80/20 by stem)
  coarse/<source>/<stem>.png    optional coarse maps (class indices 0..K-1) from any model
```

Samples are dicts: ``image`` (H, W, C) array, ``mask`` (H, W) uint8 class indices with ``IGNORE_INDEX`` for
ignored pixels, ``coarse`` (when asked), ``stem``, and ``geo`` (CRS, transform) for GeoTIFFs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import IdgbrError, file_error
from .io import IMAGE_EXTS, read_image, read_label

IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")


@dataclass
class ClassMap:
    """Class names, their raw values in the mask files (an int or an RGB triple) and the ignored raw values."""

    names: list[str]
    values: list[Any]
    ignore: list[Any] = field(default_factory=lambda: [IGNORE_INDEX])

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def colour_coded(self) -> bool:
        return any(isinstance(v, (list, tuple)) for v in self.values)

    @classmethod
    def load(cls, path: str | Path) -> "ClassMap":
        path = Path(path)
        if not path.exists():
            raise file_error(path, "classes.json not found", 'write {"classes": [{"name": ..., "value": ...}], "ignore": [...]}')
        try:
            spec = json.loads(path.read_text())
            names = [str(c["name"]) for c in spec["classes"]]
            values = [c["value"] for c in spec["classes"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise file_error(path, f"malformed classes.json ({exc})", 'expected {"classes": [{"name": "...", "value": 0}, ...]}') from None
        if not names:
            raise file_error(path, "no classes listed", "list at least one class")
        if len(names) > 254:
            raise file_error(path, f"{len(names)} classes", "at most 254 classes are supported")
        return cls(names, values, list(spec.get("ignore", [IGNORE_INDEX])))

    @classmethod
    def indexed(cls, names: Sequence[str], ignore: Sequence[Any] = (IGNORE_INDEX,)) -> "ClassMap":
        return cls(list(names), list(range(len(names))), list(ignore))

    def save(self, path: str | Path) -> None:
        """Write classes.json atomically."""
        from .io import atomic_path

        spec = {"classes": [{"name": n, "value": v} for n, v in zip(self.names, self.values)], "ignore": self.ignore}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(spec, indent=2) + "\n")

    def encode(self, raw: np.ndarray, path: str | Path = "<mask>") -> np.ndarray:
        """Map a raw mask (H, W) or (H, W, 3) to (H, W) uint8 class indices; ignored values become IGNORE_INDEX.

        A value that is neither a class nor ignored is an error naming the file and the allowed values.
        """
        if self.colour_coded:
            if raw.ndim != 3 or raw.shape[-1] < 3:
                raise file_error(path, f"expected an RGB colour-coded mask, got shape {raw.shape}",
                                 "convert the mask to RGB or use index values in classes.json")
            codes = _rgb_code(raw[..., :3])
            lut_keys = [int(_rgb_code(np.asarray(v, dtype=np.int64).reshape(1, 3))[0]) for v in self.values]
            ignore_keys = [int(_rgb_code(np.asarray(v, dtype=np.int64).reshape(1, 3))[0]) for v in self.ignore
                           if isinstance(v, (list, tuple))]
        else:
            if raw.ndim == 3:
                if raw.shape[-1] >= 3 and not (np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])):
                    raise file_error(path, "colour mask but classes.json lists index values",
                                     "give [r, g, b] values in classes.json or save single-band index masks")
                raw = raw[..., 0]
            codes = raw
            lut_keys = [int(v) for v in self.values]
            ignore_keys = [int(v) for v in self.ignore if not isinstance(v, (list, tuple))]
        unknown = _UNKNOWN
        if np.issubdtype(codes.dtype, np.integer) and codes.size and codes.min() >= 0 and codes.max() < 1 << 24:
            # one table look-up: fast for 8-bit, 16-bit and 24-bit RGB codes
            size = int(codes.max()) + 1
            lut = np.full(size, unknown, dtype=np.uint16)
            for key in ignore_keys:
                if key < size:
                    lut[key] = IGNORE_INDEX
            for index, key in reversed(list(enumerate(lut_keys))):
                if 0 <= key < size:
                    lut[key] = index
            mapped = lut[codes]
        else:
            codes = codes.astype(np.int64)
            mapped = np.full(codes.shape, unknown, dtype=np.uint16)
            for key in ignore_keys:
                mapped[codes == key] = IGNORE_INDEX
            for index, key in reversed(list(enumerate(lut_keys))):
                mapped[codes == key] = index
        bad_pixels = mapped == unknown
        if bad_pixels.any():
            bad = np.unique(np.asarray(codes)[bad_pixels])[:5]
            shown = [_code_to_str(int(b), self.colour_coded) for b in bad]
            raise file_error(path, f"mask values {', '.join(shown)} are not in classes.json",
                             f"allowed: {', '.join(_code_to_str(k, self.colour_coded) for k in lut_keys)} (+ ignore {self.ignore})")
        return mapped.astype(np.uint8)


_UNKNOWN = 256  # marks raw values that are neither a class nor ignored, in a uint16 table


def _rgb_code(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64) if rgb.dtype.kind == "i" or rgb.dtype.itemsize > 1 else rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _code_to_str(code: int, colour: bool) -> str:
    if colour:
        return f"({code >> 16}, {(code >> 8) & 255}, {code & 255})"
    return str(code)


def find_file(folder: Path, stem: str) -> Path | None:
    """The file ``folder/<stem>.<ext>`` for the first known image extension, or None."""
    for ext in IMAGE_EXTS:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.exists():
                return candidate
    return None


def _safe_stem(root: Path, stem: str, listing: Path) -> str:
    if not stem or "/" in stem or "\\" in stem or stem in (".", "..") or stem.startswith("."):
        raise file_error(listing, f"invalid stem {stem!r}", "stems are file names without folders or extensions")
    return stem


def default_split(stems: Sequence[str], split: str, fraction: float = 0.8) -> list[str]:
    """Deterministic 80/20 split by a hash of the stem ('train' / 'test'; 'val' is empty)."""
    def bucket(stem: str) -> float:
        return int(hashlib.sha1(stem.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    if split == "train":
        return [s for s in stems if bucket(s) < fraction]
    if split == "test":
        return [s for s in stems if bucket(s) >= fraction]
    return []


def split_stems(stems: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[str]]:
    """Seeded, deterministic random split into train/val/test (e.g. 8:1:1); each list is sorted.

    The result depends only on the set of stems, ``fractions`` and ``seed`` (not on the input order).
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    ordered = sorted(set(stems))
    order = np.random.default_rng(seed).permutation(len(ordered))
    total = float(sum(fractions))
    n_train = int(round(len(ordered) * fractions[0] / total))
    n_val = min(len(ordered) - n_train, int(round(len(ordered) * fractions[1] / total)))
    picked = [ordered[i] for i in order]
    return {"train": sorted(picked[:n_train]), "val": sorted(picked[n_train:n_train + n_val]),
            "test": sorted(picked[n_train + n_val:])}


def write_splits(root: str | Path, splits: dict[str, Sequence[str]]) -> None:
    """Write ``root/splits/{train,val,test}.txt`` (one stem per line) atomically; missing splits are empty."""
    from .io import atomic_path

    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}")
    for split in SPLITS:
        stems = list(splits.get(split, []))
        with atomic_path(Path(root) / "splits" / f"{split}.txt") as tmp:
            tmp.write_text("".join(f"{stem}\n" for stem in stems))


def coarse_folder(root: str | Path, coarse: str | Path) -> Path:
    """Where ``--coarse`` points: the NAME under ``root/coarse/`` if that folder exists, else ``coarse`` as a folder
    path if it exists (e.g. a previous refine's output), else ``root/coarse/NAME`` (for the caller's error)."""
    coarse = Path(coarse)
    named = Path(root) / "coarse" / coarse
    return named if named.is_dir() or not coarse.is_dir() else coarse


class SegmentationDataset:
    """A canonical dataset folder. ``dataset[i]`` is a sample dict (see the module docstring).

    Args:
        root: the DATA folder.
        split: 'train', 'val', 'test' or None (all stems).
        coarse: name of a folder under ``coarse/`` whose maps to load as ``sample["coarse"]``.
        transform: a callable applied to each sample dict.
        load_mask: set False for unlabelled data.
    """

    def __init__(self, root: str | Path, split: str | None = None, coarse: str | Path | None = None,
                 transform: Callable[[dict], dict] | None = None, load_mask: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise file_error(self.root, "dataset folder not found", "run 'idgbr prepare' first or check --data")
        if split is not None and split not in SPLITS:
            raise IdgbrError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.classes = ClassMap.load(self.root / "classes.json")
        self.split = split
        self.transform = transform
        self.load_mask = load_mask
        self.coarse_dir = None
        if coarse is not None:
            self.coarse_dir = coarse_folder(self.root, coarse)
            if not self.coarse_dir.is_dir():
                raise file_error(self.coarse_dir, "coarse-map folder not found", "run 'idgbr predict-coarse' or place maps in coarse/<name>/")
        self.stems = self._list_stems(split)
        if not self.stems:
            raise file_error(self.root, f"split {split!r} has no samples", "check splits/ or the images folder")

    def _all_stems(self) -> list[str]:
        folder = self.root / "images"
        if not folder.is_dir():
            raise file_error(folder, "images folder not found", "the dataset needs images/<stem>.<ext>")
        return sorted({p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")})

    def _list_stems(self, split: str | None) -> list[str]:
        if split is None:
            return self._all_stems()
        listing = self.root / "splits" / f"{split}.txt"
        if (self.root / "splits").is_dir():
            if not listing.exists():
                return []
            stems = [_safe_stem(self.root, line.strip(), listing) for line in listing.read_text().splitlines() if line.strip()]
            for stem in stems:
                if find_file(self.root / "images", stem) is None:
                    raise file_error(listing, f"stem {stem!r} is listed but images/{stem}.* is missing",
                                     "remove it from the split or add the image")
            return stems
        return default_split(self._all_stems(), split)

    def __len__(self) -> int:
        return len(self.stems)

    def image_path(self, stem: str) -> Path:
        path = find_file(self.root / "images", stem)
        if path is None:
            raise file_error(self.root / "images" / stem, "image missing", "add the image or remove the stem from the split")
        return path

    def mask_path(self, stem: str) -> Path:
        path = find_file(self.root / "masks", stem)
        if path is None:
            raise file_error(self.root / "masks" / stem, "mask missing", "add masks/<stem>.png")
        return path

    def coarse_path(self, stem: str) -> Path:
        assert self.coarse_dir is not None
        path = find_file(self.coarse_dir, stem)
        if path is None:
            raise file_error(self.coarse_dir / f"{stem}.png", "coarse map missing", "predict coarse maps for this split first")
        return path

    def read_mask(self, stem: str) -> np.ndarray:
        path = self.mask_path(stem)
        raw, _ = read_label(path, expand_palette=self.classes.colour_coded)
        return self.classes.encode(raw, path)

    def read_coarse(self, stem: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        path = self.coarse_path(stem)
        return read_index_map(path, self.classes.num_classes, shape)

    def read_coarse_probs(self, stem: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The coarse map's (K, H, W) float32 probabilities, from :func:`probs_folder` of the coarse folder."""
        assert self.coarse_dir is not None
        folder = probs_folder(self.coarse_dir)
        path = next((folder / f"{stem}{ext}" for ext in (".npy", ".tif", ".tiff") if (folder / f"{stem}{ext}").exists()),
                    None)
        if path is None:
            raise file_error(folder / f"{stem}.npy", "coarse probabilities missing",
                             "write them with 'idgbr predict-coarse --probs npy' (or train with soft_coarse off)")
        return read_probs(path, self.classes.num_classes, shape)

    def __getitem__(self, index: int) -> dict[str, Any]:
        stem = self.stems[index]
        image_path = self.image_path(stem)
        image, geo = read_image(image_path)
        sample: dict[str, Any] = {"image": image, "stem": stem}
        if geo is not None:
            sample["geo"] = geo
        if self.load_mask:
            mask = self.read_mask(stem)
            if mask.shape != image.shape[:2]:
                raise file_error(self.mask_path(stem), f"mask size {mask.shape} differs from image size {image.shape[:2]}",
                                 f"resize or re-export the mask to match {image_path.name}")
            sample["mask"] = mask
        if self.coarse_dir is not None:
            sample["coarse"] = self.read_coarse(stem, image.shape[:2])
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


def probs_folder(coarse_dir: str | Path) -> Path:
    """Where the probabilities of a coarse-map folder live: ``<folder>_probs/`` beside it (symbolic links resolved,
    so a linked track finds its own), as ``idgbr predict-coarse --probs`` writes them."""
    folder = Path(coarse_dir).resolve()
    return folder.with_name(f"{folder.name}_probs")


def read_probs(path: str | Path, num_classes: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read (K, H, W) class probabilities: a float ``.npy`` (K, H, W) or a K-band float GeoTIFF; checked for shape,
    class count and finite values >= 0. Returns float32."""
    path = Path(path)
    if not path.exists():
        raise file_error(path, "file not found", "check the path")
    if path.suffix.lower() == ".npy":
        try:
            probs = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise file_error(path, f"unreadable .npy ({str(exc)[:100] or type(exc).__name__})",
                             "save a float (K, H, W) array with numpy.save") from None
    else:
        raw, _ = read_image(path)
        probs = np.moveaxis(raw, -1, 0) if raw.ndim == 3 else raw
    want = (num_classes, *shape) if shape is not None else None
    if probs.ndim != 3 or probs.shape[0] != num_classes or (want and probs.shape != want) or probs.dtype.kind != "f":
        size = f"({num_classes}, {shape[0]}, {shape[1]})" if shape is not None else f"({num_classes}, H, W)"
        raise file_error(path, f"expected float probabilities {size}, got {probs.dtype} {probs.shape}",
                         "save class probabilities of the image's size")
    if not np.isfinite(probs).all() or probs.min() < 0:
        raise file_error(path, "NaN/inf or negative probabilities", "give finite class probabilities >= 0")
    return probs.astype(np.float32, copy=False)


def read_index_map(path: str | Path, num_classes: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a coarse/prediction index map (values 0..K-1, IGNORE_INDEX allowed) and check its size and values."""
    raw, _ = read_label(path)
    if raw.ndim == 3:
        raise file_error(path, f"expected a single-band index map, got {raw.shape[-1]} bands",
                         "save class indices as a greyscale/palette PNG or 1-band GeoTIFF")
    if shape is not None and raw.shape != tuple(shape):
        raise file_error(path, f"size {raw.shape} differs from the image size {tuple(shape)}", "predict at the image's full size")
    values = np.unique(raw)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)]
    if bad.size:
        raise file_error(path, f"values {bad[:5].tolist()} are outside the {num_classes} classes",
                         f"use indices 0..{num_classes - 1} (or {IGNORE_INDEX} for nodata)")
    return raw.astype(np.uint8)
