"""A scene's files: its rasters read by windows (:class:`_Scene`), the resume sidecars (``<out>.progress.json``,
``<out>.scratch/``: the scratch accumulators and their journal) and the band-wise writers of the output. Used by
:mod:`idgbr.inference.scene`.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..data.dataset import IGNORE_INDEX
from ..errors import IdgbrError, file_error
from ..data.io import atomic_path, is_geotiff
from ..nn.tiling import Window

ROW_BAND = 256  # rows per band when validating inputs and writing the output


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


def _file_id(path: Path) -> list[Any]:
    return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]


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
