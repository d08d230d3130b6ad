"""Reading and writing images, label maps and probability rasters.

PNG/JPEG go through Pillow, GeoTIFFs through rasterio (their CRS and transform are kept in a ``geo`` dict).
Every writer is atomic: it writes to a temporary name in the destination folder and renames, so an interrupted
run never leaves a half-written file. Every reader turns a broken file into a one-line :class:`IdgbrError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import IdgbrError, file_error

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
GEOTIFF_EXTS = (".tif", ".tiff")


def is_geotiff(path: str | Path) -> bool:
    return Path(path).suffix.lower() in GEOTIFF_EXTS


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on failure delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error(path.parent, f"cannot create the output folder ({exc.strerror})", "choose a writable --out") from None
    if not os.access(path.parent, os.W_OK):
        raise file_error(path.parent, "output folder is not writable", "choose a writable output location")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _read_raster(path: Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Read a raster as (H, W, C) plus geo metadata (None for plain images)."""
    if not path.exists():
        raise file_error(path, "file not found", "check the path")
    if path.stat().st_size == 0:
        raise file_error(path, "file is empty (0 bytes)", "re-export the file")
    if is_geotiff(path):
        import rasterio
        from rasterio.errors import RasterioError

        try:
            with rasterio.open(path) as src:
                array = src.read()  # (C, H, W)
                geo = {
                    "crs": src.crs.to_string() if src.crs else None,
                    "transform": tuple(src.transform)[:6],
                    "nodata": src.nodata,
                    "height": src.height,
                    "width": src.width,
                }
        except RasterioError as exc:
            raise file_error(path, f"unreadable or truncated GeoTIFF ({str(exc).splitlines()[0][:120]})",
                             "re-export the file") from None
        return np.moveaxis(array, 0, -1), geo
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            array = _pil_to_array(im, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise file_error(path, f"unreadable or truncated image ({str(exc)[:120]})", "re-export the file") from None
    if array.ndim == 2:
        array = array[..., None]
    return array, None


def _pil_to_array(im, path: Path) -> np.ndarray:
    if im.mode == "P":
        return np.asarray(im)  # palette indices; masks decide what they mean
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(im).astype(np.int32)
    if im.mode in ("RGBA", "LA", "CMYK", "YCbCr", "1"):
        return np.asarray(im.convert("RGB" if im.mode != "LA" else "L"))
    return np.asarray(im)


def read_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Read an image as (H, W, C) (any dtype, C >= 1) and its geo metadata (None for PNG/JPEG).

    RGBA is reduced to RGB; a palette image is expanded to RGB.
    """
    path = Path(path)
    if path.suffix.lower() not in (*GEOTIFF_EXTS,):
        from PIL import Image

        # palette images: expand to colours for imagery
        array, geo = _read_raster(path)
        if array.ndim == 2 or array.shape[-1] == 1:
            with Image.open(path) as im:
                if im.mode == "P":
                    array = np.asarray(im.convert("RGB"))
        if array.ndim == 2:
            array = array[..., None]
    else:
        array, geo = _read_raster(path)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise file_error(path, f"image has zero size {array.shape[:2]}", "give a non-empty image")
    return array, geo


def read_label(path: str | Path, expand_palette: bool = False) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Read a label raster without interpretation: (H, W) for single-band/palette files, (H, W, C) for colour.

    With ``expand_palette`` a palette PNG (or a GeoTIFF with a colour map) becomes its (H, W, 3) RGB colours,
    for colour-coded masks; otherwise palette files give their indices.
    """
    path = Path(path)
    array, geo = _read_raster(path)
    if expand_palette and (array.ndim == 2 or array.shape[-1] == 1):
        array = _expand_palette(path, array)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise file_error(path, f"label map has zero size {array.shape[:2]}", "give a non-empty map")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array, geo


def _expand_palette(path: Path, array: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB colours of a palette label file, or ``array`` unchanged when the file has no palette."""
    if is_geotiff(path):
        import rasterio

        with rasterio.open(path) as src:
            try:
                cmap = src.colormap(1)
            except ValueError:
                return array
        lut = np.zeros((max(256, max(cmap) + 1), 3), dtype=np.uint8)
        for index, rgba in cmap.items():
            lut[index] = rgba[:3]
        return lut[array.reshape(array.shape[:2])]
    from PIL import Image

    with Image.open(path) as im:
        if im.mode != "P":
            return array
        return np.asarray(im.convert("RGB"))


def write_label(path: str | Path, label: np.ndarray, geo: dict[str, Any] | None = None, nodata: int | None = None) -> None:
    """Write an (H, W) index map atomically: PNG (uint8) or, for .tif paths, a tiled, compressed GeoTIFF."""
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got {label.shape}")
    if label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError("label values must fit in uint8")
    label = label.astype(np.uint8)
    with atomic_path(path) as tmp:
        if is_geotiff(path):
            write_geotiff(tmp, label[None], geo, nodata=nodata)
        else:
            from PIL import Image

            Image.fromarray(label).save(tmp, format="PNG")


def write_geotiff(path: str | Path, array: np.ndarray, geo: dict[str, Any] | None = None, nodata: float | None = None) -> None:
    """Write a (C, H, W) array as a tiled, deflate-compressed GeoTIFF (not atomic: call inside ``atomic_path``)."""
    import rasterio
    from rasterio.transform import Affine

    count, height, width = array.shape
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": count,
        "dtype": array.dtype.name,
        "compress": "deflate",
    }
    if height >= 256 and width >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if geo:
        if geo.get("crs"):
            profile["crs"] = geo["crs"]
        if geo.get("transform"):
            profile["transform"] = Affine(*geo["transform"][:6])
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)


def write_array(path: str | Path, array: np.ndarray, geo: dict[str, Any] | None = None) -> None:
    """Write a float array atomically: ``.npy`` as (C, H, W) float32, ``.tif`` as a float32 GeoTIFF."""
    path = Path(path)
    array = np.asarray(array, dtype=np.float32)
    with atomic_path(path) as tmp:
        if is_geotiff(path):
            write_geotiff(tmp, array, geo)
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, array)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 picture (PNG/JPEG) atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
