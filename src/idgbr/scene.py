"""Whole-scene refinement of georeferenced rasters: windowed, blended, seam-free, gated, resumable.

    >>> from idgbr import Refiner
    >>> from idgbr.scene import refine_scene
    >>> refiner = Refiner.from_pretrained("runs/lite")
    >>> summary = refine_scene(refiner, "scene.tif", "coarse.tif", "refined.tif", steps=2, strength=0.4, guidance=1)

How a scene is processed (all sizes in pixels; ``f`` is the codec's latent factor):

* **Windowed I/O.** The image and the coarse map are read tile by tile with rasterio windows; the scene is never
  loaded whole. Class probabilities are accumulated in float32 ``np.memmap`` scratch arrays next to the output
  (``<out>.scratch/``: ``probs.npy`` (S, K, H, W), ``weight.npy`` (H, W)) and the final map is written in
  row bands of :data:`ROW_BAND` rows as a tiled, deflate-compressed GeoTIFF with the image's CRS, transform and
  size and nodata 255 (PNG output for PNG/JPEG scenes, which are small).
* **Tiles.** :func:`idgbr.tiling.tile_grid` on the scene padded up to a multiple of ``f``, so every window starts
  on the global latent grid; tile and overlap must be multiples of the model's size multiple and of ``f``.
  Window probabilities are blended with :func:`idgbr.tiling.blend_weights` (weighted mean, no last-writer-wins).
* **Seams.** The starting noise of a tile is cut from one scene-level noise field on the global latent grid
  (:class:`NoiseField`: blocks of :data:`NOISE_BLOCK` latent pixels, each drawn from a generator seeded by
  ``(seed, sample, block_row, block_col)``), so overlapping tiles start from identical noise where they overlap.
  :func:`seam_score` measures what is left.
* **Nodata.** A pixel is nodata when the image's dataset mask says so (its nodata value on all bands, an alpha or
  mask band), when a float image is NaN/inf, or when the coarse map is 255 / masked. Nodata pixels are filled with
  the tile's valid per-band mean (image) and zero probabilities (coarse) before the network, and are 255 in the
  output; tiles without a valid pixel are skipped.
* **"Do no harm" gating** (``gate_width``/``confidence``): only pixels within ``gate_width`` px of a coarse class
  boundary, or (soft coarse input) with max probability < ``confidence``, take the refined label; the others keep
  the coarse label, and tiles without such a pixel are not computed at all.
* **Uncertainty.** ``samples = N`` > 1 draws N refinements from N noise fields; the output is the per-pixel
  majority vote (ties broken by the mean probability) and ``<out>_uncertainty.tif`` holds the percentage of
  samples that disagree with the vote (uint8 0-100, nodata 255).
* **Soft coarse input.** A K-band float raster of class probabilities is accepted in place of an index map.
* **Multispectral.** The image's bands (alpha excluded) are the model's input channels; ``bands=[4, 3, 2]``
  (1-based, as ``--bands 4,3,2``) picks and orders bands, e.g. three bands for the 3-channel ``sd15`` preset.
* **Resume.** ``<out>.progress.json`` (written atomically after each tile batch) lists finished tiles; before a
  batch is added to the scratch arrays their previous values are journalled, so a run killed at any moment
  rolls back the batch in flight and a re-run computes only the missing tiles. The final rasters are written
  to temporary names and renamed; the sidecars are removed on success.
* **In flight.** Tiles are read and prepared ``read_ahead`` batches ahead in a reading thread, and each batch is
  saved (journal, scratch arrays, progress file) in a writing thread while the next batch is sampled; the
  output equals the serial path's (``read_ahead=0``), and at most one batch is being saved at any time, so the
  journal still covers whatever a kill interrupts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .data import IGNORE_INDEX
from .errors import IdgbrError, file_error
from .io import atomic_path, is_geotiff
from .postprocess import area_offsets, check_area_match, check_sieve, keep_unsure, log_probs_of, sieve_labels
from .background import ReadAhead
from .tiling import Window, blend_weights, pad_to_multiple, tile_grid

__all__ = ["refine_scene", "NoiseField", "seam_score", "gate_band", "sidecar_paths"]

NOISE_BLOCK = 64  # side of one block of the scene-level noise field, in latent pixels
ROW_BAND = 256  # rows per band when validating inputs and writing the output


# ----------------------------------------------------------------------------------------------------------------
# Scene-level noise
# ----------------------------------------------------------------------------------------------------------------
class NoiseField:
    """Gaussian noise defined on the whole scene's latent grid (channels, rows, cols), generated lazily by blocks.

    Block ``(i, j)`` of sample ``s`` covers latent rows ``i*block:(i+1)*block`` and columns ``j*block:(j+1)*block``
    and is drawn from a CPU generator seeded by ``(seed, s, i, j)``, so any cut of the field is reproducible and
    two tiles that overlap see the same noise on their overlap.
    """

    def __init__(self, seed: int, channels: int, block: int = NOISE_BLOCK, cache: int = 64):
        if seed < 0:
            raise IdgbrError(f"seed must be >= 0, got {seed}")
        self.seed, self.channels, self.block = int(seed), int(channels), int(block)
        self._cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()
        self._cache_size = cache

    def _block(self, sample: int, i: int, j: int) -> torch.Tensor:
        key = (sample, i, j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        state = np.random.SeedSequence([self.seed, sample, i, j]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        noise = torch.randn((self.channels, self.block, self.block), generator=gen)
        self._cache[key] = noise
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return noise

    def cut(self, sample: int, row: int, col: int, height: int, width: int) -> torch.Tensor:
        """Noise (channels, height, width) at latent rows ``row:row+height``, columns ``col:col+width``."""
        out = torch.empty((self.channels, height, width))
        b = self.block
        for i in range(row // b, (row + height - 1) // b + 1):
            for j in range(col // b, (col + width - 1) // b + 1):
                r0, r1 = max(row, i * b), min(row + height, (i + 1) * b)
                c0, c1 = max(col, j * b), min(col + width, (j + 1) * b)
                out[:, r0 - row:r1 - row, c0 - col:c1 - col] = self._block(sample, i, j)[:, r0 - i * b:r1 - i * b,
                                                                                          c0 - j * b:c1 - j * b]
        return out


# ----------------------------------------------------------------------------------------------------------------
# Gating and seam measurement (plain arrays)
# ----------------------------------------------------------------------------------------------------------------
def gate_band(labels: np.ndarray, width: int, low_confidence: np.ndarray | None = None) -> np.ndarray:
    """Pixels (H, W) bool to refine: within ``width`` px of a class boundary of ``labels`` (H, W), or low-confidence.

    A boundary pixel differs from one of its 4-neighbours, both valid (a class next to nodata is no boundary);
    the band is the boundary pixels dilated by a disc of radius ``width``.
    """
    import cv2

    valid = labels != IGNORE_INDEX
    edge = np.zeros(labels.shape, dtype=np.uint8)
    horizontal = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    vertical = (labels[1:] != labels[:-1]) & valid[1:] & valid[:-1]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:] |= vertical
    edge[:-1] |= vertical
    if width > 0:
        edge = cv2.dilate(edge, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1)))
    band = edge.astype(bool)
    if low_confidence is not None:
        band |= low_confidence
    return band & valid


def seam_score(labels: np.ndarray, tile: int, overlap: int, width: int = 2, nodata: int = IGNORE_INDEX) -> dict[str, float]:
    """Boundary density near internal tile edges vs elsewhere, for a refined (H, W) label map.

    A boundary pixel differs from its right or lower neighbour (both valid). ``border_rate`` is the fraction of
    boundary pixels among the valid pixels within ``width`` px of an internal edge of a window of
    ``tile_grid(H, W, tile, overlap)``; ``interior_rate`` the same fraction over all other valid pixels.
    ``ratio = border_rate / interior_rate`` is 1 without seams (edges of the tiling are invisible in the map) and
    grows when tiles disagree at their borders (seams add label boundaries along the tile edges).
    """
    labels = np.asarray(labels)
    height, width_px = labels.shape
    valid = labels != nodata
    boundary = np.zeros(labels.shape, dtype=bool)
    right = (labels[:, 1:] != labels[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    down = (labels[1:] != labels[:-1]) & valid[1:] & valid[:-1]
    boundary[:, :-1] |= right
    boundary[:-1] |= down
    near = np.zeros(labels.shape, dtype=bool)
    for window in tile_grid(height, width_px, tile, overlap):
        for row in (window.row, window.bottom):
            if 0 < row < height:
                near[max(0, row - width):row + width, window.col:window.right] = True
        for col in (window.col, window.right):
            if 0 < col < width_px:
                near[window.row:window.bottom, max(0, col - width):col + width] = True
    border, interior = near & valid, ~near & valid
    border_rate = float(boundary[border].mean()) if border.any() else 0.0
    interior_rate = float(boundary[interior].mean()) if interior.any() else 0.0
    if not border.any() or border_rate == interior_rate:  # no internal edge, or edges invisible
        ratio = 1.0
    else:
        ratio = border_rate / interior_rate if interior_rate > 0 else float("inf")
    return {"border_rate": border_rate, "interior_rate": interior_rate, "ratio": ratio}


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def _open(path: Path, role: str):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    if not path.exists():
        raise file_error(path, "file not found", f"check the --{role} path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        raise file_error(path, f"unreadable raster ({str(exc).splitlines()[0][:120]})", "re-export it as GeoTIFF/PNG") from None


def _rio(window: Window):
    from rasterio.windows import Window as RioWindow

    return RioWindow(window.col, window.row, window.width, window.height)


def _read(ds, window: Window, indexes: list[int] | int | None = None) -> np.ndarray:
    from rasterio.errors import RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.read(indexes, window=_rio(window))
    except RasterioError as exc:  # a truncated / corrupt file fails only when its pixels are read
        raise file_error(ds.name, f"unreadable or truncated raster near row {window.row} ({str(exc).splitlines()[0][:80]})",
                         "re-export the file") from None


def _mask(ds, window: Window) -> np.ndarray:
    """(h, w) bool: True where the dataset mask (nodata on all bands, alpha, mask band) marks a pixel valid."""
    from rasterio.errors import RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.dataset_mask(window=_rio(window)) > 0
    except RasterioError as exc:
        raise file_error(ds.name, f"unreadable or truncated raster near row {window.row} ({str(exc).splitlines()[0][:80]})",
                         "re-export the file") from None


class _Scene:
    """The opened image and coarse rasters, validated against each other and the model."""

    def __init__(self, image_path: Path, coarse_path: Path, num_classes: int, channels: int,
                 bands: Sequence[int] | None):
        from rasterio.enums import ColorInterp, MaskFlags

        self.image_path, self.coarse_path, self.num_classes = image_path, coarse_path, num_classes
        self.image = _open(image_path, "image")
        self.coarse = _open(coarse_path, "coarse")
        self.height, self.width = self.image.height, self.image.width
        if (self.coarse.height, self.coarse.width) != (self.height, self.width):
            raise file_error(coarse_path, f"size {self.coarse.height}x{self.coarse.width} differs from the image's "
                             f"{self.height}x{self.width}", "predict or resample the coarse map on the image's grid")
        if self.image.crs and self.coarse.crs and self.image.crs != self.coarse.crs:
            raise file_error(coarse_path, f"CRS {self.coarse.crs} differs from the image's {self.image.crs}",
                             "reproject the coarse map onto the image's grid (e.g. gdalwarp)")
        if self.image.crs and self.coarse.crs and not self.image.transform.almost_equals(self.coarse.transform):
            raise file_error(coarse_path, "geotransform differs from the image's",
                             "resample the coarse map onto the image's grid (e.g. gdalwarp -tap)")
        # an alpha band GDAL really masks with (not one shadowed by a nodata value; GDAL marks the 4th band of
        # any 4-band byte GeoTIFF as alpha) is a mask, unless the model needs it as a band
        masks_with = [MaskFlags.alpha in flags for flags in self.image.mask_flag_enums]
        alpha = [i + 1 for i, ci in enumerate(self.image.colorinterp) if ci == ColorInterp.alpha and masks_with[i]]
        content = [i + 1 for i in range(self.image.count) if i + 1 not in alpha or self.image.count == channels]
        if bands:
            bad = [b for b in bands if not 1 <= b <= self.image.count]
            if bad:
                raise file_error(image_path, f"--bands {bad} not in 1..{self.image.count}", "use 1-based band numbers")
            content = [int(b) for b in bands]
        if len(content) != channels:
            raise file_error(image_path, f"{len(content)} image bands but the model takes {channels}",
                             f"pass --bands with {channels} band numbers (e.g. --bands "
                             f"{','.join(str(i + 1) for i in range(channels))}) or use a model trained on these bands")
        self.bands = content
        self.alpha_is_content = bool(set(alpha) & set(content))  # then only the nodata value marks nodata
        self.float_image = np.dtype(self.image.dtypes[0]).kind == "f"
        kind = np.dtype(self.coarse.dtypes[0]).kind
        self.soft = self.coarse.count > 1
        if self.soft and (kind != "f" or self.coarse.count != num_classes):
            raise file_error(coarse_path, f"{self.coarse.count} bands of {self.coarse.dtypes[0]}",
                             f"give a 1-band class-index map or {num_classes} float32 bands of class probabilities")
        self.geo = {"crs": self.image.crs, "transform": self.image.transform} if self.image.crs else {}

    def close(self) -> None:
        self.image.close()
        self.coarse.close()

    def validate_coarse(self) -> None:
        """Scan the coarse map in row bands: indices in 0..K-1 (or 255), or finite non-negative probabilities."""
        k = self.num_classes
        for row in range(0, self.height, ROW_BAND):
            window = Window(row, 0, min(ROW_BAND, self.height - row), self.width)
            values, valid = _read(self.coarse, window), _mask(self.coarse, window)
            if self.soft:
                if not np.isfinite(values[:, valid]).all() or (values[:, valid] < 0).any():
                    raise file_error(self.coarse_path, f"NaN/inf or negative probabilities near row {row}",
                                     "give finite class probabilities in [0, 1] (mark nodata with the nodata value)")
                continue
            values = values[0][valid]
            bad = np.unique(values[(values != IGNORE_INDEX) & ((values < 0) | (values >= k) | (values != np.round(values)))])
            if bad.size:
                raise file_error(self.coarse_path, f"values {bad[:5].tolist()} are outside the model's {k} classes",
                                 f"use class indices 0..{k - 1} and {IGNORE_INDEX} for nodata")

    def read_coarse(self, window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(labels (h, w) uint8 with 255 = nodata, probabilities (K, h, w) float32, max probability or None)."""
        valid = _mask(self.coarse, window)
        values = _read(self.coarse, window)
        if self.soft:
            probs = np.where(valid, np.nan_to_num(values.astype(np.float32)), 0.0)
            labels = np.where(valid, probs.argmax(0), IGNORE_INDEX).astype(np.uint8)
            return labels, probs, probs.max(0)
        labels = np.where(valid, values[0], IGNORE_INDEX).astype(np.uint8)
        probs = (labels[None] == np.arange(self.num_classes, dtype=np.uint8)[:, None, None]).astype(np.float32)
        return labels, probs, None

    def read_valid(self, window: Window, coarse_labels: np.ndarray) -> np.ndarray:
        """(h, w) bool: image and coarse map both valid."""
        valid = coarse_labels != IGNORE_INDEX
        if not self.alpha_is_content:
            valid &= _mask(self.image, window)
        if self.float_image:
            valid &= np.isfinite(_read(self.image, window, self.bands)).all(0)
        return valid


# ----------------------------------------------------------------------------------------------------------------
# Sidecars: progress, scratch accumulators, journal
# ----------------------------------------------------------------------------------------------------------------
def sidecar_paths(out_path: str | Path) -> dict[str, Path]:
    """Paths of the resume sidecars of ``out_path``: ``progress`` (JSON) and ``scratch`` (folder)."""
    out_path = Path(out_path)
    return {"progress": out_path.with_name(out_path.name + ".progress.json"),
            "scratch": out_path.with_name(out_path.name + ".scratch")}


def uncertainty_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}_uncertainty{out_path.suffix}")


class _Scratch:
    """Memory-mapped accumulators ``probs`` (S, K, H, W) and ``weight`` (H, W), with an undo journal per batch."""

    def __init__(self, folder: Path, shape: tuple[int, int, int, int], fresh: bool):
        from numpy.lib.format import open_memmap

        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        mode = "w+" if fresh else "r+"
        self.folder, self.journal = folder, folder / "journal.npz"
        self.probs = open_memmap(folder / "probs.npy", mode=mode, dtype=np.float32, shape=shape if fresh else None)
        self.weight = open_memmap(folder / "weight.npy", mode=mode, dtype=np.float32, shape=shape[2:] if fresh else None)
        if tuple(self.probs.shape) != tuple(shape):
            raise IdgbrError(f"{folder}: scratch arrays do not match this run; delete the folder and rerun")

    def add(self, windows: list[Window], probs: list[np.ndarray], weights: list[np.ndarray], indices: list[int]) -> None:
        """Journal the previous values of ``windows``, then add ``probs`` (S, K, h, w) x ``weights`` (h, w)."""
        before = {"indices": np.asarray(indices), "windows": np.asarray([[w.row, w.col, w.height, w.width] for w in windows])}
        for n, window in enumerate(windows):
            before[f"p{n}"] = self.probs[(slice(None), slice(None), *window.slices)]
            before[f"w{n}"] = self.weight[window.slices]
        with atomic_path(self.journal) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **before)
        for window, prob, weight in zip(windows, probs, weights):
            self.probs[(slice(None), slice(None), *window.slices)] += prob * weight
            self.weight[window.slices] += weight
        self.flush()

    def recover(self, done: set[int]) -> None:
        """After a kill: undo the journalled batch unless the progress file already counts it, drop the journal."""
        if not self.journal.exists():
            return
        with np.load(self.journal) as journal:
            if not set(journal["indices"].tolist()) <= done:
                for n in reversed(range(len(journal["windows"]))):
                    window = Window(*journal["windows"][n].tolist())
                    self.probs[(slice(None), slice(None), *window.slices)] = journal[f"p{n}"]
                    self.weight[window.slices] = journal[f"w{n}"]
                self.flush()
        self.journal.unlink()

    def flush(self) -> None:
        self.probs.flush()
        self.weight.flush()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload))


def _file_id(path: Path) -> list[Any]:
    return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]


# ----------------------------------------------------------------------------------------------------------------
# The scene loop
# ----------------------------------------------------------------------------------------------------------------
def refine_scene(refiner, image_path: str | Path, coarse_path: str | Path, out_path: str | Path,
                 tile: int | None = None, overlap: int | None = None, steps: int | None = None,
                 guidance: float | None = None, strength: float | None = None, seed: int = 0, samples: int = 1,
                 gate_width: int | None = None, confidence: float | None = None, batch_size: int = 4,
                 bands: Sequence[int] | None = None, resume: bool = True, progress: bool = True,
                 callback: Callable[[list[int]], None] | None = None, noise_scale: float | None = None,
                 tta: str | None = None, sieve: int | None = None, read_ahead: int = 2,
                 flip_margin: float | None = None, area_match: float | None = None) -> dict[str, Any]:
    """Refine a whole scene tile by tile and write the refined map (see the module docstring).

    Args:
        refiner: an :class:`idgbr.pipeline.Refiner`; its ``sample`` is called per batch of tiles.
        image_path: the scene (GeoTIFF, PNG or JPEG), C bands (alpha excluded) unless ``bands`` picks them.
        coarse_path: 1-band class-index raster (255 = nodata) or K-band float class probabilities, same grid.
        out_path: the refined map (GeoTIFF for .tif, else PNG); with ``samples > 1`` also ``<out>_uncertainty``.
        tile, overlap: window size and overlap in pixels (default: the model's ``tile_size``/``tile_overlap``).
        steps, guidance, strength: sampling settings (default: the model's).
        seed: seed of the scene-level noise field; samples: refinements drawn (majority vote if > 1).
        noise_scale: scale of the noise field (default: the model's; 0 = deterministic start, one sample only).
        tta: test-time augmentation per tile, "none", "flips" or "d4" (default: the model's ``tta``).
        sieve: merge regions smaller than this many pixels into their largest neighbour, seam-free (0: off;
            default: the model's ``sieve``; :mod:`idgbr.postprocess`).
        flip_margin: the refined label only where its probability beats the coarse label's by more than this
            (default: the model's ``flip_margin``; :func:`idgbr.postprocess.keep_unsure`).
        area_match: pull each class's refined area towards the coarse map's (0: off, 1: the coarse map's areas;
            default: the model's ``area_match``), with one offset per class fitted on the whole scene
            (:func:`idgbr.postprocess.area_offsets`, every 4th pixel of the refined windows).
        gate_width: refine only within this many px of coarse boundaries (None: refine everything);
        confidence: with soft coarse input, also refine pixels whose max probability is below this.
        batch_size: tiles per network batch; bands: 1-based image bands fed to the model.
        resume: continue from ``<out>.progress.json`` when it belongs to the same inputs and settings.
        callback: called with the indices of each finished batch (after it is saved).
        read_ahead: batches of tiles read and prepared ahead in a thread while a batch is sampled (the batch before
            it is saved to the scratch arrays in another thread meanwhile); 0: read, sample and save in series.
            The output does not depend on it.
    Returns:
        summary dict: ``out``, ``uncertainty``, ``height``, ``width``, ``tiles``, ``computed`` (tiles run in this
        call), ``done_before`` (tiles restored from a previous run), ``skipped_nodata``, ``skipped_gate``,
        ``skipped_fraction``, ``resumed``, ``seconds``.
    """
    start_time = time.perf_counter()
    cfg = refiner.config
    image_path, coarse_path, out_path = Path(image_path), Path(coarse_path), Path(out_path)
    tile = cfg.tile_size if tile is None else int(tile)
    overlap = cfg.tile_overlap if overlap is None else int(overlap)
    steps = cfg.sample_steps if steps is None else int(steps)
    guidance = cfg.guidance_scale if guidance is None else float(guidance)
    strength = cfg.strength if strength is None else float(strength)
    noise_scale = cfg.noise_scale if noise_scale is None else float(noise_scale)
    from .pipeline import check_noise_for_samples, check_tta

    tta = check_tta(cfg.tta if tta is None else tta)
    sieve = check_sieve(cfg.sieve if sieve is None else sieve)
    flip_margin = cfg.flip_margin if flip_margin is None else float(flip_margin)
    if not 0 <= flip_margin < 1:
        raise IdgbrError(f"--flip-margin must lie in [0, 1) (0: plain argmax), got {flip_margin}")
    area_match = check_area_match(cfg.area_match if area_match is None else area_match)

    check_noise_for_samples(samples, noise_scale)
    f, multiple = cfg.latent_factor, cfg.size_multiple
    if tile < multiple or tile % multiple or overlap % f or not 0 <= overlap < tile:
        raise IdgbrError(f"--tile {tile} must be a multiple of {multiple} and --overlap {overlap} a multiple of {f} "
                         f"in [0, tile) for this model; e.g. --tile {max(multiple, tile // multiple * multiple)} "
                         f"--overlap {overlap // f * f}")
    read_ahead = max(0, int(read_ahead))
    if steps < 1 or not 0 < strength <= 1 or guidance < 0 or batch_size < 1 or samples < 1:
        raise IdgbrError(f"need steps >= 1, 0 < strength <= 1, guidance >= 0, batch >= 1 and samples >= 1; got "
                         f"steps={steps}, strength={strength}, guidance={guidance}, batch={batch_size}, samples={samples}")
    if gate_width is not None and gate_width < 0 or confidence is not None and not 0 < confidence <= 1:
        raise IdgbrError(f"need --gate >= 0 and 0 < --confidence <= 1; got {gate_width}, {confidence}")
    if out_path.resolve() in (image_path.resolve(), coarse_path.resolve()):
        raise file_error(out_path, "output would overwrite an input", "choose another --out")
    _check_writable(out_path)

    scene = _Scene(image_path, coarse_path, cfg.num_classes, cfg.image_channels, bands)
    paths, created = sidecar_paths(out_path), False
    try:
        scene.validate_coarse()
        gating = gate_width is not None or (confidence is not None and scene.soft)
        height, width = scene.height, scene.width
        canvas = (-(-height // f) * f, -(-width // f) * f)  # windows start on the latent grid
        windows = tile_grid(*canvas, tile, overlap)
        signature = {"image": _file_id(image_path), "coarse": _file_id(coarse_path), "tile": tile, "overlap": overlap,
                     "steps": steps, "guidance": guidance, "strength": strength, "seed": seed, "samples": samples,
                     "noise_scale": noise_scale, "tta": tta, "gate": gate_width, "confidence": confidence, "bands": scene.bands,
                     "model": _model_id(refiner)}
        state = {"signature": signature, "done": [], "skipped_nodata": [], "skipped_gate": []}
        resumed = False
        if resume and paths["progress"].exists() and (paths["scratch"] / "probs.npy").exists():
            try:
                previous = json.loads(paths["progress"].read_text())
            except ValueError:
                previous = {}
            if previous.get("signature") == json.loads(json.dumps(signature)):
                state, resumed = previous, True
        shape = (samples, cfg.num_classes, height, width)
        created = not resumed
        scratch = _Scratch(paths["scratch"], shape, fresh=not resumed)
        finished = set(state["done"]) | set(state["skipped_nodata"]) | set(state["skipped_gate"])
        scratch.recover(set(state["done"]))
        if not resumed:
            _write_json(paths["progress"], state)
        done_before = len(state["done"])

        noise = NoiseField(seed, refiner._latent_shape((multiple, multiple))[0])
        ramp = blend_weights(windows[0].height, windows[0].width, overlap)
        todo = [n for n in range(len(windows)) if n not in finished]
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), initial=len(windows) - len(todo), desc="tiles", unit="tile", disable=not progress)
        computed, batch = 0, []

        def prepared() -> Iterator[tuple[int, str | dict[str, np.ndarray]]]:
            for index in todo:
                yield index, _prepare_tile(scene, windows[index], gate_width, confidence, gating)

        def save(result: tuple, snapshot: dict[str, Any]) -> None:  # one batch: journal, scratch, progress, journal
            scratch.add(*result)
            _write_json(paths["progress"], snapshot)
            scratch.journal.unlink(missing_ok=True)

        def saved(indices: list[int]) -> None:
            bar.update(len(indices))
            if callback is not None:
                callback(indices)

        # in flight: up to read_ahead batches of tiles read ahead (reading thread), one batch sampled (here), the
        # batch before it being saved (writing thread); read_ahead 0: all in series, in this thread
        with ReadAhead(prepared(), depth=read_ahead * batch_size, name="idgbr-scene-read") as items, \
                _Saver(threaded=read_ahead > 0) as saver:
            for position, (index, item) in enumerate(items):
                if isinstance(item, str):
                    state[f"skipped_{item}"].append(index)
                    bar.update(1)
                else:
                    batch.append((index, item))
                if len(batch) == batch_size or (position == len(todo) - 1 and batch):
                    computed += len(batch)
                    result = _run_batch(refiner, scene, windows, batch, noise, ramp, samples, steps, guidance,
                                        strength, noise_scale, tta)
                    state["done"].extend(index for index, _ in batch)
                    saver.submit(save, result, json.loads(json.dumps(state)), [index for index, _ in batch], saved)
                    batch = []
            saver.wait()
        bar.close()
        _write_json(paths["progress"], state)
        unc_path = uncertainty_path(out_path) if samples > 1 else None
        _write_output(scene, scratch, out_path, unc_path, gate_width, confidence, gating, sieve, flip_margin,
                      area_match)
    except IdgbrError:
        # bad input found mid-scene (a truncated tile, NaN probabilities): the signature pins the input files, so
        # sidecars started by this call could never be resumed once the file is fixed; leave no partial output
        if created:
            scratch = None
            shutil.rmtree(paths["scratch"], ignore_errors=True)
            paths["progress"].unlink(missing_ok=True)
        raise
    finally:
        scene.close()
    del scratch
    shutil.rmtree(paths["scratch"], ignore_errors=True)
    paths["progress"].unlink(missing_ok=True)
    skipped = len(state["skipped_nodata"]) + len(state["skipped_gate"])
    return {"out": str(out_path), "uncertainty": str(unc_path) if unc_path else None, "height": height,
            "width": width, "tiles": len(windows), "computed": computed, "done_before": done_before,
            "skipped_nodata": len(state["skipped_nodata"]), "skipped_gate": len(state["skipped_gate"]),
            "skipped_fraction": skipped / len(windows), "resumed": resumed,
            "seconds": time.perf_counter() - start_time}


def _model_id(refiner) -> str:
    """Fingerprint of the model's config and (a sample of) its weights: sidecars of another model are not reused."""
    digest = hashlib.sha1(json.dumps(refiner.config.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for param in refiner.model.parameters():
            digest.update(param.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_writable(out_path: Path) -> None:
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error(out_path.parent, f"cannot create the output folder ({exc.strerror})", "choose a writable --out") from None
    if not os.access(out_path.parent, os.W_OK) or (out_path.exists() and not os.access(out_path, os.W_OK)):
        raise file_error(out_path, "output is not writable", "choose a writable --out")


def _clip(window: Window, height: int, width: int) -> Window:
    return Window(window.row, window.col, min(window.height, height - window.row), min(window.width, width - window.col))


def _halo(window: Window, halo: int, height: int, width: int) -> tuple[Window, tuple[slice, slice]]:
    """``window`` grown by ``halo`` px (clipped to the scene) and the slices that cut ``window`` back out of it."""
    row, col = max(0, window.row - halo), max(0, window.col - halo)
    grown = Window(row, col, min(height, window.bottom + halo) - row, min(width, window.right + halo) - col)
    return grown, (slice(window.row - row, window.bottom - row), slice(window.col - col, window.right - col))


def _band_for(scene: _Scene, window: Window, gate_width: int | None, confidence: float | None) -> np.ndarray:
    """Gate band (h, w) bool of a window of the scene (computed with a halo, so it matches across windows)."""
    if gate_width is None:  # confidence only
        labels, _, top = scene.read_coarse(window)
        return (top < confidence) & (labels != IGNORE_INDEX)
    grown, cut = _halo(window, gate_width + 1, scene.height, scene.width)
    labels, _, top = scene.read_coarse(grown)
    low = (top < confidence) if (confidence is not None and top is not None) else None
    return gate_band(labels, gate_width, low)[cut]


def _prepare_tile(scene: _Scene, window: Window, gate_width: int | None, confidence: float | None,
                  gating: bool) -> str | dict[str, np.ndarray]:
    """Read one canvas window: ``"nodata"``/``"gate"`` when it is skipped, else its model inputs.

    Returns ``{"image": (C, T, T) filled image, "prior": (K, T, T) float32}``; the part of the window past the
    scene's edge (less than ``f`` px) is edge-padded.
    """
    inside = _clip(window, scene.height, scene.width)
    labels, prior, _ = scene.read_coarse(inside)
    valid = scene.read_valid(inside, labels)
    if not valid.any():
        return "nodata"
    if gating and not (_band_for(scene, inside, gate_width, confidence) & valid).any():
        return "gate"
    image = _read(scene.image, inside, scene.bands)
    fill = np.array([band[valid].mean() for band in image], dtype=np.float64)
    image = np.where(valid, image, fill.astype(image.dtype)[:, None, None]) if not valid.all() else image
    prior = prior * valid
    pad = ((0, 0), (0, window.height - inside.height), (0, window.width - inside.width))
    return {"image": np.pad(image, pad, mode="edge"), "prior": np.pad(prior, pad, mode="edge")}


def _run_batch(refiner, scene: _Scene, windows: list[Window], batch: list[tuple[int, dict[str, np.ndarray]]],
               noise: NoiseField, ramp: np.ndarray, samples: int, steps: int, guidance: float, strength: float,
               noise_scale: float, tta: str) -> tuple[list[Window], list[np.ndarray], list[np.ndarray], list[int]]:
    """Sample every tile of ``batch`` ``samples`` times: the arguments of :meth:`_Scratch.add` (clipped windows,
    probabilities (S, K, h, w), weights (h, w), tile indices)."""
    cfg, device = refiner.config, refiner.device
    image = torch.from_numpy(np.stack([item["image"] for _, item in batch]))
    if image.dtype == torch.float64:
        image = image.float()
    prior = torch.from_numpy(np.stack([item["prior"] for _, item in batch]))
    image, crop = pad_to_multiple(image, cfg.size_multiple, mode="reflect")
    prior, _ = pad_to_multiple(prior, cfg.size_multiple, mode="reflect")
    f = cfg.latent_factor
    channels, lat_h, lat_w = refiner._latent_shape(tuple(image.shape[-2:]))
    out = np.empty((len(batch), samples, cfg.num_classes, *ramp.shape), dtype=np.float32)
    for sample in range(samples):
        start = torch.stack([noise.cut(sample, windows[index].row // f, windows[index].col // f, lat_h, lat_w)
                             for index, _ in batch])
        logits = refiner.sample(image.to(device), prior.to(device), steps, guidance, strength,
                                (start * noise_scale).to(device), tta=tta)
        out[:, sample] = torch.softmax(logits.float(), dim=1)[..., crop[0], crop[1]].cpu().numpy()
    clipped = [_clip(windows[index], scene.height, scene.width) for index, _ in batch]
    return (clipped, [o[:, :, :w.height, :w.width] for o, w in zip(out, clipped)],
            [ramp[:w.height, :w.width] for w in clipped], [index for index, _ in batch])


class _Saver:
    """Saves a batch (``submit(save, *args, indices, saved)``) in a writing thread while the next one is sampled.

    At most one save is in flight: ``submit`` first waits for the previous one, then calls its ``saved(indices)``
    (progress bar, the caller's callback) in the caller's thread; an exception of a save is re-raised there.
    ``threaded=False`` saves in the caller's thread at once."""

    def __init__(self, threaded: bool):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idgbr-scene-write") if threaded else None
        self._pending: tuple[Any, list[int], Callable[[list[int]], None]] | None = None

    def submit(self, save: Callable[..., None], result: tuple, snapshot: dict[str, Any], indices: list[int],
               saved: Callable[[list[int]], None]) -> None:
        self.wait()
        if self._pool is None:
            save(result, snapshot)
            saved(indices)
        else:
            self._pending = (self._pool.submit(save, result, snapshot), indices, saved)

    def wait(self) -> None:
        if self._pending is not None:
            future, indices, saved = self._pending
            self._pending = None
            future.result()
            saved(indices)

    def __enter__(self) -> "_Saver":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a save in flight completes (a kill mid-save is what the journal is for)


@contextlib.contextmanager
def _raster_writer(path: Path | None, scene: _Scene) -> Iterator[Any]:
    """Yield ``write(rows_window, (h, W) uint8)`` writing atomically to ``path`` (GeoTIFF, or PNG for other suffixes)."""
    if path is None:
        yield None
        return
    with atomic_path(path) as tmp:
        if is_geotiff(path):
            import rasterio

            profile = {"driver": "GTiff", "height": scene.height, "width": scene.width, "count": 1, "dtype": "uint8",
                       "nodata": IGNORE_INDEX, "tiled": True, "blockxsize": 256, "blockysize": 256,
                       "compress": "deflate", "BIGTIFF": "IF_SAFER", **scene.geo}
            with rasterio.open(tmp, "w", **profile) as dst:
                yield lambda win, rows: dst.write(rows[None], window=_rio(win))
        else:
            from PIL import Image

            full = np.full((scene.height, scene.width), IGNORE_INDEX, dtype=np.uint8)  # PNG scenes are small

            def write(win: Window, rows: np.ndarray) -> None:
                full[win.slices] = rows

            yield write
            Image.fromarray(full).save(tmp, format="PNG")


def _area_offsets(scene: _Scene, scratch: _Scratch, strength: float, stride: int = 4) -> np.ndarray:
    """Class offsets of :func:`idgbr.postprocess.area_offsets` for the whole scene, from every ``stride``-th pixel
    (rows and columns) that was refined and is not nodata."""
    log_probs, coarse_labels = [], []
    for row in range(0, scene.height, ROW_BAND):
        window = Window(row, 0, min(ROW_BAND, scene.height - row), scene.width)
        weight = np.asarray(scratch.weight[window.slices])[::stride, ::stride]
        mean = np.asarray(scratch.probs[(slice(None), slice(None), *window.slices)])[..., ::stride, ::stride].mean(0)
        coarse, _, _ = scene.read_coarse(window)
        keep = (weight > 0) & scene.read_valid(window, coarse)[::stride, ::stride]
        log_probs.append(log_probs_of(mean / np.maximum(weight, 1e-12))[:, keep])
        coarse_labels.append(coarse[::stride, ::stride][keep])
    return area_offsets(np.concatenate(log_probs, axis=1), np.concatenate(coarse_labels), strength)


def _write_output(scene: _Scene, scratch: _Scratch, out_path: Path, unc_path: Path | None, gate_width: int | None,
                  confidence: float | None, gating: bool, sieve: int = 0, flip_margin: float = 0.0,
                  area_match: float = 0.0) -> None:
    """Vote, gate, mask and sieve the accumulated probabilities in row bands; write the map (and the uncertainty).

    With ``sieve`` > 1 each band's labels are computed with a halo of ``sieve`` rows: a region smaller than
    ``sieve`` pixels that touches the band lies wholly inside it, and a larger one shows at least ``sieve + 1``
    of its pixels, so the sieved band equals the same rows of the whole sieved map. With ``area_match`` the labels
    are the argmax of the log mean probabilities plus class offsets fitted first on a sample of the whole scene."""
    offsets = _area_offsets(scene, scratch, area_match) if area_match > 0 else None

    def labels_of(window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(labels, disagreement, refined mask, valid mask) of a full-width row window."""
        samples, k = scratch.probs.shape[:2]
        weight = np.asarray(scratch.weight[window.slices])
        mean = np.asarray(scratch.probs[(slice(None), slice(None), *window.slices)]) / np.maximum(weight, 1e-12)  # (S, K, h, W)
        votes = mean.argmax(1)  # (S, h, W)
        if offsets is not None:
            vote = (log_probs_of(mean.mean(0)) + offsets[:, None, None]).argmax(0)
            disagree = (votes != vote).mean(0) if samples > 1 else np.zeros(votes.shape[1:], dtype=np.float32)
        elif samples == 1:
            vote, disagree = votes[0], np.zeros(votes.shape[1:], dtype=np.float32)
        else:
            counts = (votes[:, None] == np.arange(k)[None, :, None, None]).sum(0)  # (K, h, W)
            vote = (counts + 0.5 * mean.mean(0)).argmax(0)  # ties go to the larger mean probability
            disagree = (votes != vote).mean(0)
        coarse, _, _ = scene.read_coarse(window)
        valid = scene.read_valid(window, coarse)
        take = (weight > 0) & (_band_for(scene, window, gate_width, confidence) if gating else True)
        if flip_margin > 0:  # the coarse label stays where the refiner is not surer of another by the margin
            take = take & (keep_unsure(vote.astype(np.uint8), mean.mean(0), coarse, flip_margin) == vote)
        return np.where(valid, np.where(take, vote, coarse), IGNORE_INDEX).astype(np.uint8), disagree, take, valid

    with _raster_writer(out_path, scene) as write, _raster_writer(unc_path, scene) as write_unc:
        for row in range(0, scene.height, ROW_BAND):
            window = Window(row, 0, min(ROW_BAND, scene.height - row), scene.width)
            grown, cut = _halo(window, sieve if sieve > 1 else 0, scene.height, scene.width)
            labels, disagree, take, valid = labels_of(grown)
            labels = sieve_labels(labels, sieve)[cut]
            disagree, take, valid = disagree[cut], take[cut], valid[cut]
            write(window, labels)
            if write_unc is not None:
                unc = np.where(take, np.rint(100 * disagree), 0)
                write_unc(window, np.where(valid, unc, IGNORE_INDEX).astype(np.uint8))
