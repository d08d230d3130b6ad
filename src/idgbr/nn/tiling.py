"""Tile grids, blending weights and sliding-window prediction.

Used by ``predict-coarse`` (:mod:`idgbr.training.coarse`), by the refiner's tiled sampling (:mod:`idgbr.inference.pipeline`) and by
whole-scene refinement (:mod:`idgbr.inference.scene`). All sizes are in pixels.

* :func:`tile_grid` lays out windows of ``tile`` pixels with ``overlap`` pixels shared between neighbours; the
  last row/column of windows is aligned to the image edge, so every pixel is covered and no window sticks out.
* :func:`blend_weights` gives each window a strictly positive weight that ramps down over ``overlap`` pixels
  towards its edges; overlapping predictions are averaged with these weights (no last-writer-wins seams).
* :func:`sliding_window` runs a ``predict_fn`` over the grid and blends its class probabilities into one
  ``(K, H, W)`` map; only the two accumulators are held at full size (a :class:`Blender`, which the refiner's
  batching across images also uses, one per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Window", "tile_grid", "blend_weights", "pad_to_multiple", "sliding_window", "Blender"]

MIN_WEIGHT = 1e-3  # floor of the blending ramp: every pixel of a window keeps a (tiny) positive weight


@dataclass(frozen=True)
class Window:
    """A rectangle of an image in pixels: rows ``row:row+height``, columns ``col:col+width``."""

    row: int
    col: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices, e.g. ``image[..., *window.slices]``."""
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)

    @property
    def bottom(self) -> int:
        return self.row + self.height

    @property
    def right(self) -> int:
        return self.col + self.width


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: a regular stride, with the last window aligned to the edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def tile_grid(height: int, width: int, tile: int | Sequence[int], overlap: int | Sequence[int] = 0) -> list[Window]:
    """Windows of at most ``tile`` pixels covering an ``height x width`` image, row-major.

    Neighbouring windows share at least ``overlap`` pixels (more for the last, edge-aligned row/column). An axis
    shorter than the tile gets one window of the axis' size, so windows are never larger than the image and all
    windows of one grid have the same size.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    tile_h, tile_w = _pair(tile, "tile")
    over_h, over_w = _pair(overlap, "overlap")
    if tile_h < 1 or tile_w < 1:
        raise ValueError(f"tile must be positive, got {tile!r}")
    if not (0 <= over_h < tile_h and 0 <= over_w < tile_w):
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap!r} for tile={tile!r}")
    win_h, win_w = min(tile_h, height), min(tile_w, width)
    rows = _starts(height, tile_h, tile_h - over_h)
    cols = _starts(width, tile_w, tile_w - over_w)
    return [Window(r, c, win_h, win_w) for r in rows for c in cols]


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1-D weights (length,): 1 in the middle, a linear ramp over ``overlap`` pixels at each end, floored."""
    if overlap <= 0:
        return np.ones(length, dtype=np.float32)
    index = np.arange(length, dtype=np.float32)
    distance = np.minimum(index + 0.5, length - index - 0.5)  # distance of the pixel centre to the nearest edge
    return np.clip(distance / overlap, MIN_WEIGHT, 1.0).astype(np.float32)


def blend_weights(height: int, width: int, overlap: int | Sequence[int]) -> np.ndarray:
    """Blending weights (height, width) float32 for one window: separable linear ramps, strictly positive.

    The weight is 1 further than ``overlap`` pixels from every edge and falls linearly towards the edges (to
    ``0.5 / overlap`` on the border pixels, never below ``MIN_WEIGHT``), so that overlapping windows hand over
    smoothly. ``overlap=0`` gives uniform weights.
    """
    over_h, over_w = _pair(overlap, "overlap")
    return np.outer(_ramp(height, over_h), _ramp(width, over_w)).astype(np.float32)


def pad_to_multiple(array: np.ndarray | torch.Tensor, multiple: int, mode: str = "reflect"):
    """Pad the last two axes (..., H, W) at the bottom/right up to a multiple of ``multiple``.

    Args:
        array: numpy array or torch tensor with spatial axes last.
        multiple: target multiple (1 = no padding).
        mode: ``"reflect"``, ``"replicate"``/``"edge"`` or ``"constant"`` (zeros). Reflection falls back to
            replication when the image is too small to reflect.

    Returns:
        ``(padded, crop)`` where ``padded[..., crop[0], crop[1]]`` is the original array.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    height, width = array.shape[-2:]
    pad_h = (-height) % multiple
    pad_w = (-width) % multiple
    crop = (slice(0, height), slice(0, width))
    if pad_h == 0 and pad_w == 0:
        return array, crop
    if mode == "reflect" and (pad_h >= height or pad_w >= width):
        mode = "replicate"
    if isinstance(array, torch.Tensor):
        torch_mode = {"edge": "replicate"}.get(mode, mode)
        if torch_mode == "constant":
            return F.pad(array, (0, pad_w, 0, pad_h)), crop
        shape = array.shape
        flat = array.reshape(-1, 1, height, width)
        if not flat.is_floating_point():
            padded = F.pad(flat.float(), (0, pad_w, 0, pad_h), mode=torch_mode).to(array.dtype)
        else:
            padded = F.pad(flat, (0, pad_w, 0, pad_h), mode=torch_mode)
        return padded.reshape(*shape[:-2], height + pad_h, width + pad_w), crop
    numpy_mode = {"replicate": "edge"}.get(mode, mode)
    widths = [(0, 0)] * (array.ndim - 2) + [(0, pad_h), (0, pad_w)]
    return np.pad(array, widths, mode=numpy_mode), crop


@torch.no_grad()
def sliding_window(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray | torch.Tensor,
    num_classes: int,
    tile: int | Sequence[int] = 512,
    overlap: int | Sequence[int] = 64,
    batch_size: int = 4,
    multiple: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """Blend ``predict_fn``'s class probabilities over overlapping windows of ``image``.

    Args:
        predict_fn: maps a float batch (B, C, h, w) to probabilities (B, K, h, w) (any device; moved to CPU).
        image: (C, H, W) array or tensor, already normalised as ``predict_fn`` expects.
        num_classes: K.
        tile, overlap: window size and overlap in pixels (see :func:`tile_grid`).
        batch_size: windows per ``predict_fn`` call.
        multiple: windows are reflect-padded to a multiple of this (e.g. the network's output stride) and the
            prediction is cropped back.
        progress: show a tqdm bar over windows.

    Returns:
        (K, H, W) float32 probabilities: the weighted mean of the windows' predictions at each pixel.
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tensor = torch.as_tensor(image)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    _, height, width = tensor.shape
    windows = tile_grid(height, width, tile, overlap)
    win_h, win_w = windows[0].height, windows[0].width
    blender = Blender(num_classes, height, width, (win_h, win_w), overlap)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc="tiles", unit="tile", leave=False)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = torch.stack([tensor[:, w.row:w.bottom, w.col:w.right] for w in chunk])
        batch, crop = pad_to_multiple(batch, multiple, mode="reflect")
        out = predict_fn(batch)
        expected = (len(chunk), num_classes, *batch.shape[-2:])
        if tuple(out.shape) != expected:
            raise ValueError(f"predict_fn returned shape {tuple(out.shape)}, expected {expected}")
        out = out[..., crop[0], crop[1]].float().cpu()
        for window, probs in zip(chunk, out):
            blender.add(window, probs)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return blender.result()


class Blender:
    """Weighted-mean accumulators of one image: ``add`` window predictions (any order), then ``result``.

    Every window has the size ``window_shape`` and the weights :func:`blend_weights` (``overlap``).
    """

    def __init__(self, num_classes: int, height: int, width: int, window_shape: tuple[int, int],
                 overlap: int | Sequence[int]):
        self.weight = torch.from_numpy(blend_weights(*window_shape, overlap))
        self.probs_acc = torch.zeros((num_classes, height, width), dtype=torch.float32)
        self.weight_acc = torch.zeros((height, width), dtype=torch.float32)

    def add(self, window: Window, probs: torch.Tensor) -> None:
        """Add ``probs`` (K, h, w) float32 CPU of ``window``."""
        rows, cols = window.slices
        self.probs_acc[:, rows, cols] += probs * self.weight
        self.weight_acc[rows, cols] += self.weight

    def result(self) -> np.ndarray:
        """(K, H, W) float32: the weighted mean (the accumulators are divided in place; call once)."""
        self.probs_acc /= self.weight_acc
        return self.probs_acc.numpy()
