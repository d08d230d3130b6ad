"""The paper's training augmentations, on sample dicts, for any number of bands and any dtype.

A sample is ``{"image": (H, W, C) array, "mask": (H, W) uint8, "coarse": (H, W) uint8 (optional), ...}``.
Geometric transforms move ``image`` bilinearly and every label key (``mask``, ``coarse``) with nearest
neighbour, so label values are never invented; they drop ``geo`` because the pixels no longer match it. A
``coarse_probs`` (H, W, K) map (soft coarse input) moves bilinearly with :class:`RandomResizedCrop`, the flip and the
rotation (0 outside the image).

Every transform is called as ``transform(sample, rng)`` with a :class:`numpy.random.Generator`; nothing touches
global random state. :class:`Compose` can own a generator so that it also works as a one-argument
``SegmentationDataset(transform=...)``; inside DataLoader workers it re-seeds per worker.

The paper's pipeline (mmseg-style; issue 2 §3): random resize with ratio 0.5-2.0, a random crop in which no class
exceeds 75 % of the pixels, horizontal flip with p = 0.5, and photometric (brightness/contrast/saturation) jitter.
:func:`paper_train_transform` does the resize and the crop as one :class:`RandomResizedCrop`, which resamples only
the crop window instead of the whole tile.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from .dataset import IGNORE_INDEX
from ..metrics import label_edges

Sample = dict[str, Any]
LABEL_KEYS = ("mask", "coarse")
# Per-pixel float maps that move with the labels but resample like the image (linear; 0 outside it): the coarse
# model's (H, W, K) class probabilities for soft coarse input.
SOFT_KEYS = ("coarse_probs",)
_CV2_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _label_keys(sample: Sample) -> list[str]:
    return [key for key in LABEL_KEYS if sample.get(key) is not None]


def _moved_keys(sample: Sample) -> list[str]:
    """Every key a flip or rotation moves with the image: the labels and the soft maps."""
    return _label_keys(sample) + [key for key in SOFT_KEYS if sample.get(key) is not None]


def _cast_back(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``out`` (computed in a cv2 dtype) back in ``dtype``: integers rounded and clipped to their range."""
    if out.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(dtype)
    return out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, C) image of any dtype and band count to ``size = (height, width)``."""
    height, width = size
    dtype = image.dtype
    work = image if dtype in _CV2_DTYPES else image.astype(np.float64)
    # cv2 handles up to 512 channels; split larger stacks.
    parts = [work[..., i:i + 512] for i in range(0, work.shape[-1], 512)]
    out = np.concatenate([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, -1)
                          for p in parts], axis=-1)
    return _cast_back(out, dtype)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) label map to ``size = (height, width)``; values are preserved."""
    height, width = size
    return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


class RandomResize:
    """Scale image and labels by one random ratio in ``[low, high]`` (aspect ratio kept)."""

    def __init__(self, low: float = 0.5, high: float = 2.0):
        if not 0 < low <= high:
            raise ValueError(f"need 0 < low <= high, got {low}, {high}")
        self.low, self.high = low, high

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        ratio = rng.uniform(self.low, self.high)
        height, width = sample["image"].shape[:2]
        size = (max(1, int(round(height * ratio))), max(1, int(round(width * ratio))))
        out = dict(sample)
        out.pop("geo", None)
        out["image"] = resize_image(sample["image"], size)
        for key in _label_keys(sample):
            out[key] = resize_label(sample[key], size)
        return out


class RandomCrop:
    """A random ``size`` x ``size`` crop in which no class exceeds ``cat_max_ratio`` of the labelled pixels.

    Like mmseg's ``RandomCrop``: up to 10 tries, keeping the last one when none qualifies; a crop with a single
    class never qualifies (unless ``cat_max_ratio >= 1``). Images smaller than the crop are padded (bottom/right)
    with 0 for the image and ``ignore_index`` for labels.
    """

    def __init__(self, size: int | tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 max_tries: int = 10):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _pad(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[:2]
        pad_h, pad_w = max(0, self.size[0] - height), max(0, self.size[1] - width)
        if not pad_h and not pad_w:
            return sample
        out = dict(sample)
        out["image"] = np.pad(sample["image"], ((0, pad_h), (0, pad_w), (0, 0)))
        for key in _label_keys(sample):
            out[key] = np.pad(sample[key], ((0, pad_h), (0, pad_w)), constant_values=self.ignore_index)
        return out

    def _ok(self, label: np.ndarray) -> bool:
        values, counts = np.unique(label, return_counts=True)
        counts = counts[values != self.ignore_index]
        if self.cat_max_ratio >= 1:
            return True
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample = self._pad(sample)
        height, width = sample["image"].shape[:2]
        crop_h, crop_w = self.size
        mask = sample.get("mask")
        for _ in range(self.max_tries):
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            if mask is None or self._ok(mask[top:top + crop_h, left:left + crop_w]):
                break
        out = dict(sample)
        out.pop("geo", None)
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        out["image"] = np.ascontiguousarray(sample["image"][window])
        for key in _label_keys(sample):
            out[key] = np.ascontiguousarray(sample[key][window])
        return out


def _warp(array: np.ndarray, matrix: np.ndarray, size: tuple[int, int], nearest: bool, fill: float) -> np.ndarray:
    """``out[y, x] = array[matrix @ (x, y, 1)]`` for an (H, W) or (H, W, C) array, output ``size = (h, w)``."""
    flags = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    dtype = array.dtype
    work = array if dtype in _CV2_DTYPES else array.astype(np.float64)
    height, width = size
    if work.ndim == 2:
        return cv2.warpAffine(work, matrix, (width, height), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=fill).astype(dtype, copy=False)
    parts = [cv2.warpAffine(np.ascontiguousarray(work[..., i:i + 4]), matrix, (width, height), flags=flags,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * 4).reshape(height, width, -1)
             for i in range(0, work.shape[-1], 4)]
    out = np.concatenate(parts, axis=-1)
    return _cast_back(out, dtype)


class RandomResizedCrop:
    """:class:`RandomResize` then :class:`RandomCrop` in one step that resamples only the crop window.

    The ratio and the crop position are drawn as the two transforms draw them (a crop of the image scaled by
    ``ratio``, no class above ``cat_max_ratio``, up to ``max_tries``), but only the ``size / ratio`` source window
    is resampled, by one affine warp with the same pixel-centre mapping as ``cv2.resize``; outside the scaled image
    the crop is 0 (image) and ``ignore_index`` (labels), as :class:`RandomCrop` pads.

    ``boundary_share``: that share of crops is centred on a random pixel of ``sample["boundary"]`` (flat indices
    into the source (H, W) grid, e.g. from :func:`boundary_pixels`); the others, and all when the key is absent
    or empty, are drawn uniformly.
    """

    def __init__(self, size: int, ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 ignore_index: int = IGNORE_INDEX, max_tries: int = 10, boundary_share: float = 0.0):
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"need 0 < low <= high, got {ratio_range}")
        self.size, self.ratio_range, self.max_tries = size, ratio_range, max_tries
        self.boundary_share = boundary_share
        self._check = RandomCrop(size, cat_max_ratio, ignore_index)

    def _window(self, scaled: tuple[int, int], ratio: float, boundary: np.ndarray | None, width: int,
                rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of the crop in scaled coordinates."""
        room = [max(0, side - self.size) for side in scaled]
        if boundary is None:
            return int(rng.integers(0, room[0] + 1)), int(rng.integers(0, room[1] + 1))
        y, x = divmod(int(boundary[rng.integers(len(boundary))]), width)
        centre = ((y + 0.5) * ratio, (x + 0.5) * ratio)
        return tuple(int(np.clip(round(c - self.size / 2), 0, r)) for c, r in zip(centre, room))  # type: ignore

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        ratio = rng.uniform(*self.ratio_range)
        height, width = sample["image"].shape[:2]
        scaled = (max(1, int(round(height * ratio))), max(1, int(round(width * ratio))))
        scale_y, scale_x = height / scaled[0], width / scaled[1]  # cv2.resize's source step per output pixel
        boundary = sample.get("boundary")
        if boundary is None or len(boundary) == 0 or not self.boundary_share or rng.random() >= self.boundary_share:
            boundary = None
        out = {k: v for k, v in sample.items() if k not in ("geo", "boundary")}
        keys = _label_keys(sample)
        size, fill = (self.size, self.size), self._check.ignore_index
        for _ in range(self.max_tries):  # only the mask is resampled until a window qualifies
            top, left = self._window(scaled, ratio, boundary, width, rng)
            matrix = np.array([[scale_x, 0, (left + 0.5) * scale_x - 0.5],
                               [0, scale_y, (top + 0.5) * scale_y - 0.5]])
            if "mask" not in keys:
                break
            out["mask"] = _warp(sample["mask"], matrix, size, True, fill)
            if self._check._ok(out["mask"]):
                break
        for key in keys:
            if key != "mask":
                out[key] = _warp(sample[key], matrix, size, True, fill)
        for key in SOFT_KEYS:
            if sample.get(key) is not None:
                out[key] = _warp(sample[key], matrix, size, False, 0)
        out["image"] = _warp(sample["image"], matrix, size, False, 0)
        return out


def boundary_pixels(*labels: np.ndarray | None, ignore_index: int | None = IGNORE_INDEX) -> np.ndarray:
    """Flat indices of pixels whose 4-neighbourhood holds another class in any of the (H, W) ``labels``
    (``None`` entries are skipped; both sides of each boundary count; edges to ``ignore_index`` do not)."""
    edges = [label_edges(label, ignore_index) for label in labels if label is not None]
    return np.flatnonzero(np.logical_or.reduce(edges)) if edges else np.empty(0, np.int64)


class RandomHorizontalFlip:
    """Mirror image and labels left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        out = dict(sample)
        out.pop("geo", None)
        out["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
        for key in _moved_keys(sample):
            out[key] = np.ascontiguousarray(sample[key][:, ::-1])
        return out


class RandomRotate90:
    """Rotate image and labels by k x 90 degrees, k uniform in {0, 1, 2, 3} (with :class:`RandomHorizontalFlip`:
    the 8 orientations of the dihedral group D4)."""

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        k = int(rng.integers(4))
        if k == 0:
            return sample
        out = dict(sample)
        out.pop("geo", None)
        out["image"] = np.ascontiguousarray(np.rot90(sample["image"], k, axes=(0, 1)))
        for key in _moved_keys(sample):
            out[key] = np.ascontiguousarray(np.rot90(sample[key], k, axes=(0, 1)))
        return out


class ColorJitter:
    """Photometric jitter on the image only, for N bands of any dtype.

    Each of brightness, contrast and saturation is applied with probability ``p`` (mmseg's
    ``PhotoMetricDistortion`` style), by a factor drawn from ``[1 - x, 1 + x]``:
    brightness scales every band; contrast blends every band with its own mean; saturation blends the first three
    bands with their luminance (skipped for fewer than three bands; further bands, e.g. NIR, are untouched).
    Integer images are clipped to their dtype's range; float images are not clipped.
    """

    def __init__(self, brightness: float = 0.2, contrast: float = 0.5, saturation: float = 0.5, p: float = 0.5):
        self.brightness, self.contrast, self.saturation, self.p = brightness, contrast, saturation, p

    def _factor(self, amount: float, rng: np.random.Generator) -> float | None:
        apply = rng.random() < self.p
        factor = rng.uniform(max(0.0, 1 - amount), 1 + amount)
        return factor if apply and amount > 0 else None

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image = sample["image"]
        # draw all numbers first so the stream does not depend on the image
        brightness = self._factor(self.brightness, rng)
        contrast = self._factor(self.contrast, rng)
        saturation = self._factor(self.saturation, rng)
        if brightness is None and contrast is None and (saturation is None or image.shape[-1] < 3):
            return sample
        work = image.astype(np.float32)
        if brightness is not None:
            work *= brightness
        if contrast is not None:
            mean = work.reshape(-1, work.shape[-1]).mean(axis=0)
            work = (work - mean) * contrast + mean
        if saturation is not None and work.shape[-1] >= 3:
            rgb = work[..., :3]
            grey = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])[..., None]
            work[..., :3] = (rgb - grey) * saturation + grey
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            work = np.clip(np.rint(work), info.min, info.max)
        out = dict(sample)
        out["image"] = work.astype(image.dtype)
        return out


def _worker_id() -> int:
    """The torch DataLoader worker id (-1 outside workers); torch is not imported here if nobody else did."""
    torch_data = sys.modules.get("torch.utils.data")
    if torch_data is None:
        return -1
    info = torch_data.get_worker_info()
    return -1 if info is None else int(info.id)


class Compose:
    """Apply transforms in order: ``compose(sample, rng)``, or ``compose(sample)`` with the compose's own generator.

    The own generator is seeded with ``seed`` (fresh OS entropy when None) and, inside a DataLoader worker, with
    the worker id too, so workers do not repeat each other's augmentations.
    """

    def __init__(self, transforms: Sequence[Callable[[Sample, np.random.Generator], Sample]], seed: int | None = None):
        self.transforms = list(transforms)
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_worker: int | None = None

    def _own_rng(self) -> np.random.Generator:
        worker = _worker_id()
        if self._rng is None or worker != self._rng_worker:
            entropy = None if self.seed is None else [self.seed, worker + 1]
            self._rng = np.random.default_rng(entropy)
            self._rng_worker = worker
        return self._rng

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = self._own_rng() if rng is None else rng
        for transform in self.transforms:
            sample = transform(sample, rng)
        return sample

    def __repr__(self) -> str:
        return f"Compose({[type(t).__name__ for t in self.transforms]}, seed={self.seed})"


def paper_train_transform(crop_size: int = 512, seed: int | None = None, cat_max_ratio: float = 0.75,
                          ratio_range: tuple[float, float] = (0.5, 2.0), boundary_share: float = 0.0,
                          dihedral: bool = False) -> Compose:
    """The paper's training augmentation: resize 0.5-2.0, ``crop_size`` crop (no class > 75 %), flip, jitter.

    The resize and the crop are one :class:`RandomResizedCrop` (only the crop window is resampled). ``dihedral``
    adds a :class:`RandomRotate90` after the flip (ours, not the paper's).
    """
    return Compose([
        RandomResizedCrop(crop_size, ratio_range, cat_max_ratio=cat_max_ratio, boundary_share=boundary_share),
        RandomHorizontalFlip(0.5),
        *([RandomRotate90()] if dihedral else []),
        ColorJitter(),
    ], seed=seed)


__all__ = ["RandomResize", "RandomCrop", "RandomResizedCrop", "boundary_pixels", "RandomHorizontalFlip", "RandomRotate90", "ColorJitter", "Compose", "paper_train_transform",
           "resize_image", "resize_label"]
