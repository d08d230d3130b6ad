"""The converters behind :func:`idgbr.data.prepare.prepare`, one per distributed layout: Dubai, ISPRS Potsdam and
Vaihingen, CHN6-CUG, FGFD, WHU building, and any image/mask folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .dataset import SPLITS, ClassMap, default_split, split_stems
from ..errors import IdgbrError, file_error
from .io import read_label
from .writer import (DatasetWriter, Progress, _binary, _check_same_size, _convert_pairs, _need_dir, _no_progress,
                     _pairs_by_stem, _read_lines, _resolve, grid_positions)


# ----------------------------------------------------------------------------------------------------------------
# dubai
# ----------------------------------------------------------------------------------------------------------------
DUBAI_CLASSES = ("Building", "Land", "Road", "Vegetation", "Water", "Unlabeled")
DUBAI_COLOURS = ([60, 16, 152], [132, 41, 246], [110, 193, 228], [254, 221, 58], [226, 169, 41], [155, 155, 155])


def convert_dubai(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, scale: float = 1.0) -> dict[str, Any]:
    """``raw/images/tileT_partKK.jpg`` + colour-coded ``raw/masks/tileT_partKK.png``; tiles 1-6 train, 7-8 test.

    ``scale`` < 1 downsamples every pair (the demo and the CPU benchmark use 0.5)."""
    colours = ClassMap(list(DUBAI_CLASSES), [list(c) for c in DUBAI_COLOURS], ignore=[[0, 0, 0]])
    pairs = _pairs_by_stem(_need_dir(raw / "images", "images"), _need_dir(raw / "masks", "masks"))

    def encode(path: Path) -> np.ndarray:
        mask, _ = read_label(path, expand_palette=True)  # 18 masks are palette PNGs
        return colours.encode(mask, path)

    for stem, image_path, _ in pairs:
        if not stem.startswith("tile") or not stem[4:].split("_")[0].isdigit():
            raise file_error(image_path, "name does not start with tile<N>_", "keep the Dubai file names (tileT_partKK)")
        writer.add(stem, "train" if int(stem[4:].split("_")[0]) <= 6 else "test")
    _convert_pairs(writer, pairs, encode, progress, "dubai", scale=float(scale))
    writer.commit(ClassMap.indexed(DUBAI_CLASSES))
    return {}


# ----------------------------------------------------------------------------------------------------------------
# ISPRS Potsdam and Vaihingen: RGB-coded labels, big tiles cut into patches on an edge-aligned grid
# ----------------------------------------------------------------------------------------------------------------
ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
# (r, g, b) thresholded at 128 -> bit code 4r + 2g + b -> class; black (the eroded "noBoundary" edges) is ignored
_ISPRS_LUT = np.full(8, 254, dtype=np.uint8)
for _index, (_r, _g, _b) in enumerate(ISPRS_COLOURS):
    _ISPRS_LUT[(_r >= 128) * 4 + (_g >= 128) * 2 + (_b >= 128)] = _index
_ISPRS_LUT[0] = 255

POTSDAM_TEST = ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15", "6_13", "6_14",
                "6_15", "7_13")
POTSDAM_TRAIN = ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
                 "6_7", "6_8", "6_9", "6_10", "6_11", "6_12", "7_7", "7_8", "7_9", "7_10", "7_11", "7_12")
_POTSDAM_BANDS = {"rgb": ("2_Ortho_RGB", "RGB"), "irrg": ("3_Ortho_IRRG", "IRRG"), "rgbir": ("4_Ortho_RGBIR", "RGBIR")}
VAIHINGEN_TRAIN = (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)
VAIHINGEN_TEST = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)


def encode_isprs(raw: np.ndarray, path: str | Path = "<label>") -> np.ndarray:
    """ISPRS colour label (H, W, 3) -> (H, W) uint8 class indices (black -> 255).

    Channels are thresholded at 128, which absorbs compression noise in some distributed label files.
    """
    if raw.ndim != 3 or raw.shape[-1] < 3:
        raise file_error(path, f"expected an RGB colour label, got shape {raw.shape}", "use the ISPRS colour labels")
    rgb = raw[..., :3] >= 128
    out = _ISPRS_LUT[rgb[..., 0] * 4 + rgb[..., 1] * 2 + rgb[..., 2]]
    if (out == 254).any():
        raise file_error(path, "label colour (255, 0, 255) is not an ISPRS class",
                         f"allowed colours: {', '.join(map(str, ISPRS_COLOURS))} and black (ignored)")
    return out


def _open_raster(path: Path):
    import rasterio
    from rasterio.errors import RasterioError

    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise file_error(path, f"unreadable raster ({str(exc).splitlines()[0][:120]})", "re-export the file") from None


def crop_pair(writer: DatasetWriter, prefix: str, image_path: Path, label_path: Path, patch: int, stride: int,
              encode: Callable[[np.ndarray, Path], np.ndarray], skip_empty: bool = False) -> list[str]:
    """Cut an image/label raster pair into patches (windowed reads, one grid row at a time); returns the stems.

    Patches keep the source CRS and per-patch transform (GeoTIFF) when the source has a CRS, else become PNG/TIFF.
    With ``skip_empty``, patches whose image is all zero (nodata outside the survey) are skipped.
    """
    import warnings

    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.windows import Window

    stems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _open_raster(image_path) as image_src, _open_raster(label_path) as label_src:
            if (image_src.height, image_src.width) != (label_src.height, label_src.width):
                _check_same_size((image_src.height, image_src.width), (label_src.height, label_src.width),
                                 label_path, image_path)
            height, width = image_src.height, image_src.width
            cols = grid_positions(width, patch, stride)
            for row in grid_positions(height, patch, stride):
                band = Window(0, row, width, min(patch, height - row))
                try:
                    image_rows = np.moveaxis(image_src.read(window=band), 0, -1)
                    label_rows = np.moveaxis(label_src.read(window=band), 0, -1)
                except RasterioError as exc:
                    raise file_error(image_path, f"read failed near row {row} ({str(exc).splitlines()[0][:100]})",
                                     "the file is truncated or corrupt; re-download it") from None
                label_rows = label_rows[..., 0] if label_rows.shape[-1] == 1 else label_rows
                for col in cols:
                    image = image_rows[:, col:col + patch]
                    if skip_empty and not image.any():
                        continue
                    mask = encode(label_rows[:, col:col + patch], label_path)
                    geo = None
                    if image_src.crs:
                        window = Window(col, row, image.shape[1], image.shape[0])
                        geo = {"crs": image_src.crs.to_string(),
                               "transform": tuple(image_src.window_transform(window))[:6]}
                    stem = f"{prefix}_{row}_{col}"
                    writer.write_image(stem, np.ascontiguousarray(image), geo)
                    writer.write_mask(stem, mask, geo)
                    stems.append(stem)
    return stems


def _label_dir(raw: Path, given: str | None, candidates: Sequence[str]) -> Path:
    if given:
        return _need_dir(raw / given, "labels")
    for name in candidates:
        if (raw / name).is_dir():
            return raw / name
    raise file_error(raw / candidates[0], "label folder not found",
                     f"unpack the labels into one of {', '.join(candidates)} or pass --labels")


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def _convert_tiles(writer: DatasetWriter, tiles: Sequence[tuple[str, str, Path | None, Path | None]], patch: int,
                   stride: int, progress: Progress, desc: str, where: Path) -> dict[str, Any]:
    """tiles: (prefix, split, image or None, label or None). Missing tiles are reported, not fatal."""
    missing = [prefix for prefix, _, image, label in tiles if image is None or label is None]
    present = [t for t in tiles if t[2] is not None and t[3] is not None]
    if not present:
        raise file_error(where, f"none of the {len(tiles)} listed {desc} tiles (with labels) were found",
                         "check RAW against the ISPRS layout")
    for prefix, split, image, label in progress(present, len(present), desc):
        for stem in crop_pair(writer, prefix, image, label, patch, stride, encode_isprs):
            writer.add(stem, split)
    notes = [f"{len(missing)} listed tiles missing: {', '.join(missing)}"] if missing else []
    return {"patch_size": patch, "stride": stride, "notes": notes}


def convert_potsdam(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, bands: str = "irrg",
                    patch_size: int = 512, stride: int | None = None, labels: str | None = None) -> dict[str, Any]:
    """ISPRS Potsdam: ``{2_Ortho_RGB,3_Ortho_IRRG,4_Ortho_RGBIR}/top_potsdam_X_Y_<BANDS>.tif`` + ``5_Labels_all``.

    The mmseg tile split (24 train / 14 test tiles) on an edge-aligned 512 grid: 12 x 12 = 144 patches per
    6000² tile, 3,456 train / 2,016 test, the paper's counts.
    """
    if bands not in _POTSDAM_BANDS:
        raise IdgbrError(f"--bands {bands!r}: choose one of {', '.join(_POTSDAM_BANDS)}")
    folder, suffix = _POTSDAM_BANDS[bands]
    image_dir = _need_dir(raw / folder, f"{bands.upper()} orthophoto")
    label_dir = _label_dir(raw, labels, ("5_Labels_all", "5_Labels_for_participants", "5_Labels_all_noBoundary"))
    tiles = []
    for split, ids in (("train", POTSDAM_TRAIN), ("test", POTSDAM_TEST)):
        for tile in ids:
            image = _first_existing(image_dir, [f"top_potsdam_{tile}_{suffix}.tif"])
            label = _first_existing(label_dir, [f"top_potsdam_{tile}_label.tif", f"top_potsdam_{tile}_label_noBoundary.tif"])
            tiles.append((f"potsdam_{tile}", split, image, label))
    extras = _convert_tiles(writer, tiles, patch_size, stride or patch_size, progress, "potsdam", image_dir)
    writer.commit(ClassMap.indexed(ISPRS_CLASSES))
    return {"bands": bands, **extras}


def convert_vaihingen(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, patch_size: int = 512,
                      stride: int | None = None, labels: str | None = None) -> dict[str, Any]:
    """ISPRS Vaihingen: ``top/top_mosaic_09cm_area{N}.tif`` (IRRG) + ``gts_for_participants/`` (or the COMPLETE gts).

    The mmseg area split (16 train / 17 test areas), edge-aligned grid, stride = patch size by default. The paper
    reports 562 train / 180 test 512² patches, more than a stride-512 grid gives on these areas; they probably
    cropped with overlap (mmseg's Vaihingen script uses stride 256), so pass ``--stride 256`` to get closer. Their
    exact cropping and split are not published; the summary reports the counts obtained.
    """
    image_dir = _need_dir(raw / "top", "top (orthophoto)")
    label_dir = _label_dir(raw, labels, ("gts_for_participants", "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE",
                                         "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE", "gts_complete"))
    tiles = []
    for split, areas in (("train", VAIHINGEN_TRAIN), ("test", VAIHINGEN_TEST)):
        for area in areas:
            name = f"top_mosaic_09cm_area{area}"
            image = _first_existing(image_dir, [f"{name}.tif"])
            label = _first_existing(label_dir, [f"{name}.tif", f"{name}_noBoundary.tif"])
            tiles.append((f"vaihingen_area{area}", split, image, label))
    extras = _convert_tiles(writer, tiles, patch_size, stride or patch_size, progress, "vaihingen", image_dir)
    writer.commit(ClassMap.indexed(ISPRS_CLASSES))
    return extras


# ----------------------------------------------------------------------------------------------------------------
# binary datasets: CHN6-CUG roads, FGFD farmland, WHU building
# ----------------------------------------------------------------------------------------------------------------
def _encode_binary(path: Path) -> np.ndarray:
    mask, _ = read_label(path)
    return _binary(mask)


def convert_chn6_cug(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, seed: int = 0) -> dict[str, Any]:
    """CHN6-CUG: ``{train,val}/images/*_sat.jpg`` + ``{train,val}/gt/*_mask.png``; any road subclass -> road.

    Both distributed parts are pooled and re-split 8:1:1 with ``seed``, as in the paper.
    """
    pairs: list[tuple[str, Path, Path]] = []
    for part in ("train", "val"):
        if (raw / part).is_dir():
            pairs += _pairs_by_stem(_need_dir(raw / part / "images", "images"), _need_dir(raw / part / "gt", "gt"),
                                    image_suffix="_sat", mask_suffix="_mask")
    if not pairs:
        raise file_error(raw / "train", "no train/ or val/ part found", "expected {train,val}/{images,gt}/")
    stems = [stem for stem, _, _ in pairs]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise file_error(raw, f"stem {dup!r} occurs in both train/ and val/", "rename one of the two files")
    _convert_pairs(writer, pairs, _encode_binary, progress, "chn6-cug")
    writer.commit(ClassMap.indexed(("background", "road")), split_stems(stems, (0.8, 0.1, 0.1), seed))
    return {"seed": seed}


def convert_fgfd(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, seed: int = 0) -> dict[str, Any]:
    """FGFD farmland: ``images/`` + ``labels/`` with the same stems; non-zero -> farmland; seeded 8:1:1."""
    pairs = _pairs_by_stem(_need_dir(raw / "images", "images"), _need_dir(raw / "labels", "labels"))
    _convert_pairs(writer, pairs, _encode_binary, progress, "fgfd")
    writer.commit(ClassMap.indexed(("background", "farmland")), split_stems([p[0] for p in pairs], (0.8, 0.1, 0.1), seed))
    return {"seed": seed}


def convert_whu_building(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, phase: str = "both",
                         patch_size: int = 512, stride: int | None = None, seed: int = 0) -> dict[str, Any]:
    """WHU building change detection: ``<dir with 2012|2016 in its name>/{image,label}.tif`` -> GeoTIFF crops.

    Phase 2012 (post-disaster) and/or 2016 (post-reconstruction); all-zero (nodata) crops are skipped; each
    phase is split 8:1:1 with ``seed``. Crops of one scene are spatial neighbours, so the split is not spatially
    disjoint (as in the paper's random split).
    """
    phases = ("2012", "2016") if phase == "both" else (phase,)
    if not set(phases) <= {"2012", "2016"}:
        raise IdgbrError(f"--phase {phase!r}: choose 2012, 2016 or both")
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    notes = []
    for year in progress(phases, len(phases), "whu-building"):
        folders = sorted(d for d in raw.iterdir() if d.is_dir() and year in d.name)
        if len(folders) != 1:
            raise file_error(raw, f"expected one folder with {year} in its name, found {len(folders)}",
                             f"place the {year} phase in RAW/{year}/ with image.tif and label.tif")
        image = _first_existing(folders[0], ["image.tif", "image.tiff"])
        label = _first_existing(folders[0], ["label.tif", "label.tiff"])
        if image is None or label is None:
            raise file_error(folders[0], "image.tif or label.tif missing", "put both GeoTIFFs in the phase folder")
        stems = crop_pair(writer, f"whu{year}", image, label, patch_size, stride or patch_size,
                          lambda raw_label, path: _binary(raw_label), skip_empty=True)
        for split, part in split_stems(stems, (0.8, 0.1, 0.1), seed).items():
            splits[split] += part
        notes.append(f"{year}: {len(stems)} crops")
    writer.commit(ClassMap.indexed(("background", "building")), splits)
    return {"phase": phase, "notes": notes}


# ----------------------------------------------------------------------------------------------------------------
# folder: any images + masks (+ palette)
# ----------------------------------------------------------------------------------------------------------------
def convert_folder(raw: Path, writer: DatasetWriter, progress: Progress = _no_progress, images: str | None = None,
                   masks: str | None = None, palette: str | None = None, splits: str | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Any ``images/`` + ``masks/`` pair of folders (paths relative to RAW or absolute).

    ``palette`` is a classes.json-style file: mask values (ints or [r, g, b]) -> classes, re-indexed 0..K-1.
    Without it masks must already hold indices 0..K-1 (255 = ignore). ``splits`` is a folder with
    train/val/test.txt; otherwise a deterministic 80/20 split by stem hash (``seed`` is then unused).
    """
    image_dir = _need_dir(_resolve(raw, images or "images"), "images")
    mask_dir = _need_dir(_resolve(raw, masks or "masks"), "masks")
    pairs = _pairs_by_stem(image_dir, mask_dir)
    if palette:
        source = ClassMap.load(_resolve(raw, palette))
        classes = ClassMap.indexed(source.names)

        def encode(path: Path) -> np.ndarray:
            mask, _ = read_label(path, expand_palette=source.colour_coded)
            return source.encode(mask, path)
    else:
        values = set()
        for _, _, mask_path in pairs:
            mask, _ = read_label(mask_path)
            if mask.ndim == 3:
                raise file_error(mask_path, "colour mask but no --palette", "give --palette classes.json mapping colours")
            values |= set(np.unique(mask).tolist())
        labels = sorted(values - {255})
        if not labels or labels == [0]:
            raise file_error(mask_dir, f"masks hold only the values {sorted(values)}",
                             "give --palette to say which values are classes (e.g. 0 and 255 for binary masks)")
        classes = ClassMap.indexed([f"class_{i}" for i in range(int(labels[-1]) + 1)])
        encode = lambda path: classes.encode(read_label(path)[0], path)  # noqa: E731
    _convert_pairs(writer, pairs, encode, progress, "folder")
    stems = [p[0] for p in pairs]
    if splits:
        split_dir = _need_dir(_resolve(raw, splits), "splits")
        chosen = {s: _read_lines(split_dir / f"{s}.txt") for s in SPLITS}
        known = set(stems)
        for split, listed in chosen.items():
            ghost = next((s for s in listed if s not in known), None)
            if ghost is not None:
                raise file_error(split_dir / f"{split}.txt", f"stem {ghost!r} is listed but has no image",
                                 "remove it from the split or add the image")
    else:
        chosen = {s: default_split(stems, s) for s in SPLITS}
    writer.commit(classes, chosen)
    return {}
