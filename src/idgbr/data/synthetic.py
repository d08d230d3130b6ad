"""Synthetic remote-sensing scenes with exact ground truth, and synthetic coarse maps.

:func:`make_scene` draws a top-down scene: land background, water (lake or river), vegetation/field blobs,
straight or curved roads, and buildings (rotated rectangles with cast shadows), with per-class colour, texture and
sensor noise. :func:`write_synthetic_dataset` writes such scenes in the canonical dataset layout
(see :mod:`idgbr.data.dataset`). :func:`degrade_mask` turns a true mask into a realistic "coarse" prediction whose errors
sit mostly on class boundaries, as a discriminative model's do; the refiner trainer uses it as synthetic input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from .dataset import IGNORE_INDEX, ClassMap, split_stems, write_splits
from .io import atomic_path, write_geotiff, write_label

CLASS_NAMES = ("background", "building", "road", "vegetation", "water")
BACKGROUND, BUILDING, ROAD, VEGETATION, WATER = range(5)

# Mean reflectance per class (0-255) for R, G, B, NIR; further bands are derived per class.
_SPECTRA = np.array([
    [150, 135, 110, 140],  # background / bare land
    [170, 160, 155, 120],  # building roofs (varied per building)
    [95, 95, 100, 80],     # road asphalt
    [60, 110, 55, 200],    # vegetation / fields
    [35, 65, 95, 20],      # water
], dtype=np.float32)


def _smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 noise with correlation length ``sigma`` pixels, scaled to zero mean and unit std."""
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _band_spectra(bands: int, rng: np.random.Generator) -> np.ndarray:
    """(5, bands) class means: R, G, B, NIR, then per-class random mixtures for more bands; grey for one band."""
    if bands == 1:
        return _SPECTRA[:, :3].mean(axis=1, keepdims=True)
    spectra = _SPECTRA[:, :min(bands, 4)]
    if bands > 4:
        mix = rng.dirichlet(np.ones(4), size=bands - 4).astype(np.float32)  # (bands-4, 4)
        spectra = np.concatenate([spectra, _SPECTRA @ mix.T], axis=1)
    return spectra


def _draw_band(mask: np.ndarray, value: int, width: int, rng: np.random.Generator, straight_p: float = 0.5) -> None:
    """Draw a band of ``width`` px across the scene (border to border), straight or bent by a sinusoid."""
    size = max(mask.shape)
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.2 * size, 0.8 * size, size=2)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    t = np.linspace(-1.5 * size, 1.5 * size, 300)
    bend = rng.uniform(0.03, 0.15) * size * np.sin(t / size * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, 6.3))
    if rng.random() < straight_p:
        bend = np.zeros_like(t)
    points = centre + t[:, None] * direction + bend[:, None] * normal
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, int(value), thickness=max(1, width))


def make_scene(size: int = 256, seed: int | np.random.Generator = 0, bands: int = 3) -> dict[str, np.ndarray]:
    """One synthetic scene: ``{"image": (size, size, bands) uint8, "mask": (size, size) uint8}``.

    Classes (see ``CLASS_NAMES``): 0 background/land, 1 building, 2 road, 3 vegetation/field, 4 water.
    """
    if size < 16 or bands < 1:
        raise ValueError(f"need size >= 16 and bands >= 1, got {size}, {bands}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shape = (size, size)
    mask = np.zeros(shape, dtype=np.uint8)

    # vegetation / fields: thresholded smooth noise, plus a few rectangular fields
    vegetation = _smooth_noise(shape, size / 12, rng) > rng.uniform(0.3, 1.0)
    mask[vegetation] = VEGETATION
    for _ in range(int(rng.integers(0, 3))):
        centre = rng.uniform(0, size, 2)
        extent = rng.uniform(size / 10, size / 4, 2)
        box = cv2.boxPoints(((float(centre[0]), float(centre[1])), (float(extent[0]), float(extent[1])),
                             float(rng.uniform(0, 90))))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], VEGETATION)

    # water: a lake (smooth blob) or a wide river
    if rng.random() < 0.5:
        lake = _smooth_noise(shape, size / 8, rng)
        mask[lake > rng.uniform(1.2, 1.8)] = WATER
    else:
        _draw_band(mask, WATER, int(rng.uniform(size / 12, size / 6)), rng, straight_p=0.2)

    for _ in range(int(rng.integers(1, 4))):
        _draw_band(mask, ROAD, int(rng.integers(max(3, size // 64), max(4, size // 22) + 1)), rng)

    # buildings: rotated rectangles away from water and roads; shadows fall towards +x, +y
    shadow = np.zeros(shape, dtype=bool)
    roof_shift = np.zeros((*shape, 1), dtype=np.float32)
    blocked = (mask == WATER) | (mask == ROAD)
    for _ in range(int(rng.integers(size // 32, size // 12 + 2))):
        centre = rng.uniform(0, size, 2)
        extent = rng.uniform(size / 40 + 3, size / 10 + 4, 2)
        box = np.round(cv2.boxPoints(((float(centre[0]), float(centre[1])), (float(extent[0]), float(extent[1])),
                                      float(rng.uniform(0, 90))))).astype(np.int32)
        footprint = np.zeros(shape, dtype=np.uint8)
        cv2.fillPoly(footprint, [box], 1)
        footprint = footprint.astype(bool)
        if not footprint.any() or (blocked & footprint).mean() > 0 or (blocked[footprint]).any():
            continue
        offset = int(rng.integers(2, max(3, size // 40) + 1))
        cast = np.zeros(shape, dtype=bool)
        cast[offset:, offset:] = footprint[:-offset, :-offset]
        shadow |= cast
        mask[footprint] = BUILDING
        roof_shift[footprint] = rng.uniform(-45, 45)
        blocked |= footprint
    shadow &= mask != BUILDING

    # image: class spectra + per-class texture + illumination + shadows + sensor noise
    spectra = _band_spectra(bands, rng)
    image = spectra[mask].astype(np.float32)  # (H, W, bands)
    texture_strength = np.array([10, 4, 4, 18, 5], dtype=np.float32)[mask][..., None]
    fine = _smooth_noise(shape, 1.0, rng)[..., None]
    coarse_tex = _smooth_noise(shape, size / 16, rng)[..., None]
    image += texture_strength * fine + 8.0 * coarse_tex
    image += roof_shift * (mask == BUILDING)[..., None]
    field_rows = np.sin(np.arange(size, dtype=np.float32) * rng.uniform(0.6, 1.2))[None, :, None]
    image += 8.0 * field_rows * (mask == VEGETATION)[..., None]  # crop rows
    image[shadow] *= 0.55
    image += rng.normal(0, 3.0, image.shape).astype(np.float32)
    return {"image": np.clip(np.rint(image), 0, 255).astype(np.uint8), "mask": mask}


def write_synthetic_dataset(out: str | Path, n: int = 20, size: int = 256, seed: int = 0, geotiff: bool = False,
                            bands: int = 3) -> dict[str, Any]:
    """Write ``n`` scenes in the canonical layout under ``out`` and return a summary dict.

    Images/masks are PNG, or with ``geotiff`` tiled GeoTIFFs in EPSG:32633 with 0.5 m pixels (scenes laid out
    side by side). Splits are a seeded 8:1:1. Existing files with the same names are replaced; every file is
    written atomically.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        from ..errors import file_error

        raise file_error(out, "exists and is not a folder", "choose a folder for --out")
    rng = np.random.default_rng(seed)
    stems = [f"synth_{i:04d}" for i in range(n)]
    ext = ".tif" if geotiff else ".png"
    for index, stem in enumerate(stems):
        scene = make_scene(size, rng, bands)
        geo = None
        if geotiff:
            x0, y0 = 500000.0 + index * size * 0.5, 5800000.0  # UTM 33N, within the zone
            geo = {"crs": "EPSG:32633", "transform": (0.5, 0.0, x0, 0.0, -0.5, y0)}
        image_path = out / "images" / f"{stem}{ext}"
        with atomic_path(image_path) as tmp:
            if geotiff:
                write_geotiff(tmp, np.moveaxis(scene["image"], -1, 0), geo)
            elif bands in (1, 3):
                from PIL import Image

                Image.fromarray(scene["image"][..., 0] if bands == 1 else scene["image"]).save(tmp, format="PNG")
            else:
                raise ValueError("PNG output supports 1 or 3 bands; use geotiff=True for other band counts")
        write_label(out / "masks" / f"{stem}{ext}", scene["mask"], geo)
    ClassMap.indexed(CLASS_NAMES).save(out / "classes.json")
    splits = split_stems(stems, (0.8, 0.1, 0.1), seed)
    write_splits(out, splits)
    return {"out": str(out), "splits": {k: len(v) for k, v in splits.items()}, "classes": list(CLASS_NAMES)}


def _fill_from_nearest(labels: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Replace ``holes`` pixels of ``labels`` (H, W) by the label of the nearest non-hole pixel."""
    if not holes.any() or holes.all():
        return labels
    _, (rows, cols) = ndimage.distance_transform_edt(holes, return_indices=True)
    return labels[rows, cols]


def _drop_small_segments(labels: np.ndarray, min_area: int) -> np.ndarray:
    """``labels`` with every connected segment smaller than ``min_area`` pixels filled from its surroundings."""
    holes = np.zeros(labels.shape, bool)
    for cls in np.unique(labels):
        components, count = ndimage.label(labels == cls)
        if count == 0:
            continue
        small = np.flatnonzero(np.bincount(components.ravel()) < min_area)
        small = small[small > 0]
        if small.size:
            holes |= np.isin(components, small)
    return _fill_from_nearest(labels, holes) if holes.any() and not holes.all() else labels


def _filled(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(a uint8 copy of the (H, W) ``mask``, its ``IGNORE_INDEX`` pixels, the labels with those filled from the
    nearest labelled pixel, or None when every pixel is nodata): where each synthetic degradation starts."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    out = mask.astype(np.uint8).copy()
    ignore = out == IGNORE_INDEX
    return out, ignore, None if ignore.all() else _fill_from_nearest(out, ignore)


def degrade_mask(mask: np.ndarray, rng: np.random.Generator, num_classes: int, strength: float = 1.0) -> np.ndarray:
    """A plausible coarse prediction (H, W) uint8 from a true mask (H, W) uint8, erring mostly near boundaries.

    Steps (each scaled by ``strength``; 0 returns a copy): smooth class boundaries through a down/upsampling of
    the one-hot map (rounded corners, thin parts lost); grow a few random classes by a random radius of 1-4 px
    (boundary shifts); remove small connected components (filled from their surroundings); add a few small
    spurious blobs of a random class. ``IGNORE_INDEX`` pixels stay as they are.
    """
    out, ignore, labels = _filled(mask)
    if strength <= 0 or labels is None:
        return out
    height, width = labels.shape

    # 1. boundary smoothing: one-hot -> area downsample by 2-4 -> bilinear up -> argmax
    factor = float(rng.uniform(2.0, 4.0)) * strength
    if factor > 1.2 and min(height, width) / factor >= 4:
        small = (max(1, int(round(width / factor))), max(1, int(round(height / factor))))
        present = np.unique(labels)
        up = np.stack([cv2.resize(cv2.resize((labels == c).astype(np.float32), small, interpolation=cv2.INTER_AREA),
                                  (width, height), interpolation=cv2.INTER_LINEAR) for c in present], axis=-1)
        labels = present[np.argmax(up, axis=-1)].astype(np.uint8)

    # 2. boundary shifts: dilate some classes over their neighbours by 1-4 px
    present = [int(c) for c in np.unique(labels)]
    for cls in rng.permutation(present)[: max(1, int(round(len(present) * min(1.0, 0.6 * strength))))]:
        radius = max(1, int(round(rng.integers(1, 5) * min(strength, 1.5))))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        grown = cv2.dilate((labels == cls).astype(np.uint8), kernel).astype(bool)
        labels[grown] = cls

    # 3. drop small objects (a model misses them), filled from their surroundings
    labels = _drop_small_segments(labels, max(4, int(round((height * width) * 2e-4 * strength))))

    # 4. a few spurious blobs
    for _ in range(int(rng.poisson(2.0 * strength))):
        radius = int(rng.integers(2, max(3, min(height, width) // 40) + 1))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (radius, max(1, int(radius * rng.uniform(0.5, 1.5))))
        cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(0, num_classes)), -1)

    labels[ignore] = IGNORE_INDEX
    return labels


def degrade_regions(mask: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """Region-level errors of a coarse model (H, W) uint8, beside :func:`degrade_mask`'s boundary-scale ones.

    One to three of, each drawn with probability 1/2 (at least one always happens):
    **class swap**: one or two whole connected segments (0.5-15 % of the map) take the class of the neighbour they
    touch most (a confusion between adjacent classes, e.g. road vs land); **missed objects**: every segment
    below 0.1-1 % of the map is filled from its surroundings; **merged neighbours**: one class is closed with a
    3-8 px radius, joining nearby segments over the gaps between them. ``IGNORE_INDEX`` pixels stay as they are.
    """
    out, ignore, labels = _filled(mask)
    if labels is None:
        return out
    area = labels.size
    kinds = rng.random(3) < 0.5
    if not kinds.any():
        kinds[int(rng.integers(3))] = True
    swap, missed, merged = (bool(k) for k in kinds)

    if swap:
        candidates = []
        for cls in np.unique(labels):
            components, count = ndimage.label(labels == cls)
            sizes = np.bincount(components.ravel())[1:]
            candidates += [(components, i + 1) for i in np.flatnonzero((sizes >= 0.005 * area) & (sizes <= 0.15 * area))]
        for index in rng.permutation(len(candidates))[: int(rng.integers(1, 3))]:
            components, component = candidates[index]
            segment = components == component
            ring = cv2.dilate(segment.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~segment
            neighbours = labels[ring]
            neighbours = neighbours[neighbours != labels[segment][0]]
            if neighbours.size:
                labels[segment] = np.bincount(neighbours, minlength=num_classes).argmax()

    if missed:
        labels = _drop_small_segments(labels, int(area * rng.uniform(0.001, 0.01)))

    if merged:
        present = np.unique(labels)
        cls = int(present[int(rng.integers(len(present)))])
        radius = int(rng.integers(3, 9))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        closed = cv2.morphologyEx((labels == cls).astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
        labels[closed] = cls

    labels[ignore] = IGNORE_INDEX
    return labels


def overpaint(mask: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """A coarse map (H, W) uint8 that over-paints its small classes, as strong coarse models do.

    Each present class but the largest, with probability 1/2 (at least one), is closed with a 2-8 px radius,
    joining nearby segments over the land between them (a housing block painted as one blob), then grown by 1-4 px
    over their neighbours. Tried as a training lever for strong coarse maps and negative on validation
    (docs/results/strong_maps.md, section 5.2), so ``RefinerConfig.overpaint`` is 0 by default. ``num_classes`` is
    unused (the classes come from the map); ``IGNORE_INDEX`` pixels stay as they are.
    """
    del num_classes
    out, ignore, labels = _filled(mask)
    if labels is None:
        return out
    present, counts = np.unique(labels, return_counts=True)
    if present.size < 2:
        labels[ignore] = IGNORE_INDEX
        return labels
    smaller = present[np.argsort(counts)[:-1]]  # every class but the largest
    chosen = smaller[rng.random(smaller.size) < 0.5]
    if chosen.size == 0:
        chosen = smaller[int(rng.integers(smaller.size)):][:1]
    for cls in chosen:
        close = int(rng.integers(2, 9))
        grow = int(rng.integers(1, 5))
        region = (labels == cls).astype(np.uint8)
        region = cv2.morphologyEx(region, cv2.MORPH_CLOSE,
                                  cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * close + 1, 2 * close + 1)))
        region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
        labels[region.astype(bool)] = cls
    labels[ignore] = IGNORE_INDEX
    return labels


__all__ = ["CLASS_NAMES", "make_scene", "write_synthetic_dataset", "degrade_mask", "degrade_regions", "overpaint"]
