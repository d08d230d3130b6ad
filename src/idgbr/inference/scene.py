"""Whole-scene refinement of georeferenced rasters: windowed, blended, seam-free, gated, resumable.

    >>> from idgbr import Refiner
    >>> from idgbr.inference.scene import refine_scene
    >>> refiner = Refiner.from_pretrained("runs/lite")
    >>> summary = refine_scene(refiner, "scene.tif", "coarse.tif", "refined.tif", steps=2, strength=0.4, guidance=1)

How a scene is processed (all sizes in pixels; ``f`` is the codec's latent factor):

* **Windowed I/O.** The image and the coarse map are read tile by tile with rasterio windows; the scene is never
  loaded whole. Class probabilities are accumulated in float32 ``np.memmap`` scratch arrays next to the output
  (``<out>.scratch/``: ``probs.npy`` (S, K, H, W), ``weight.npy`` (H, W)) and the final map is written in
  row bands of :data:`ROW_BAND` rows as a tiled, deflate-compressed GeoTIFF with the image's CRS, transform and
  size and nodata 255 (PNG output for PNG/JPEG scenes, which are small).
* **Tiles.** :func:`idgbr.nn.tiling.tile_grid` on the scene padded up to a multiple of ``f``, so every window starts
  on the global latent grid; tile and overlap must be multiples of the model's size multiple and of ``f``.
  Window probabilities are blended with :func:`idgbr.nn.tiling.blend_weights` (weighted mean, no last-writer-wins).
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

The pieces: :mod:`idgbr.inference.seams` (noise field, gating band, seam score) and :mod:`idgbr.inference.scene_io`
(reading windows, the resume sidecars and scratch accumulators, writing rasters in bands).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..data.dataset import IGNORE_INDEX
from ..errors import IdgbrError, file_error
from ..data.io import atomic_path
from .postprocess import (area_offsets, check_area_match, check_class_reach, check_flip_margin, check_sieve,
                          keep_reachable, reach_mask, keep_unsure, log_probs_of,
                          sieve_labels)
from .background import ReadAhead
from ..nn.tiling import Window, blend_weights, pad_to_multiple, tile_grid
from .scene_io import (ROW_BAND, _file_id, _raster_writer, _read, _Saver, _Scene, _Scratch, sidecar_paths,
                       uncertainty_path)
from .seams import NoiseField, gate_band, seam_score

__all__ = ["refine_scene", "NoiseField", "seam_score", "gate_band", "sidecar_paths"]


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload))


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
                 flip_margin: float | None = None, area_match: float | None = None,
                 class_reach: int | None = None) -> dict[str, Any]:
    """Refine a whole scene tile by tile and write the refined map (see the module docstring).

    Args:
        refiner: an :class:`idgbr.inference.pipeline.Refiner`; its ``sample`` is called per batch of tiles.
        image_path: the scene (GeoTIFF, PNG or JPEG), C bands (alpha excluded) unless ``bands`` picks them.
        coarse_path: 1-band class-index raster (255 = nodata) or K-band float class probabilities, same grid.
        out_path: the refined map (GeoTIFF for .tif, else PNG); with ``samples > 1`` also ``<out>_uncertainty``.
        tile, overlap: window size and overlap in pixels (default: the model's ``tile_size``/``tile_overlap``).
        steps, guidance, strength: sampling settings (default: the model's).
        seed: seed of the scene-level noise field; samples: refinements drawn (majority vote if > 1).
        noise_scale: scale of the noise field (default: the model's; 0 = deterministic start, one sample only).
        tta: test-time augmentation per tile, "none", "flips" or "d4" (default: the model's ``tta``).
        sieve: merge regions smaller than this many pixels into their largest neighbour, seam-free (0: off;
            default: the model's ``sieve``; :mod:`idgbr.inference.postprocess`).
        flip_margin: the refined label only where its probability beats the coarse label's by more than this
            (default: the model's ``flip_margin``; :func:`idgbr.inference.postprocess.keep_unsure`).
        area_match: pull each class's refined area towards the coarse map's (0: off, 1: the coarse map's areas;
            default: the model's ``area_match``), with one offset per class fitted on the whole scene
            (:func:`idgbr.inference.postprocess.area_offsets`, every 4th pixel of the refined windows).
        class_reach: a pixel takes only a class that the coarse map holds within this many pixels of it (0: off;
            default: the model's ``class_reach``; :func:`idgbr.inference.postprocess.within_reach`), seam-free.
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
    from .tta import check_noise_for_samples, check_tta

    tta = check_tta(cfg.tta if tta is None else tta)
    sieve = check_sieve(cfg.sieve if sieve is None else sieve)
    flip_margin = check_flip_margin(cfg.flip_margin if flip_margin is None else flip_margin)
    area_match = check_area_match(cfg.area_match if area_match is None else area_match)
    class_reach = check_class_reach(cfg.class_reach if class_reach is None else class_reach)

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
                      area_match, class_reach)
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


def _reachable(scene: _Scene, window: Window, reach: int, num_classes: int) -> np.ndarray | None:
    """The (K, h, w) :func:`idgbr.inference.postprocess.reach_mask` of a window, computed with a halo of ``reach``
    px so that it matches across windows; None when ``reach`` is 0."""
    if reach <= 0:
        return None
    grown, cut = _halo(window, reach, scene.height, scene.width)
    labels, _, _ = scene.read_coarse(grown)
    return reach_mask(labels, reach, num_classes)[(slice(None), *cut)]


def _area_offsets(scene: _Scene, scratch: _Scratch, strength: float, stride: int = 4, reach: int = 0) -> np.ndarray:
    """Class offsets of :func:`idgbr.inference.postprocess.area_offsets` for the whole scene, from every
    ``stride``-th pixel (rows and columns) that was refined and is not nodata."""
    log_probs, coarse_labels = [], []
    for row in range(0, scene.height, ROW_BAND):
        window = Window(row, 0, min(ROW_BAND, scene.height - row), scene.width)
        weight = np.asarray(scratch.weight[window.slices])[::stride, ::stride]
        mean = np.asarray(scratch.probs[(slice(None), slice(None), *window.slices)])
        allowed = _reachable(scene, window, reach, mean.shape[1])
        if allowed is not None:
            mean = keep_reachable(mean / np.maximum(np.asarray(scratch.weight[window.slices]), 1e-12), allowed)
        mean = mean[..., ::stride, ::stride].mean(0)
        coarse, _, _ = scene.read_coarse(window)
        keep = (weight > 0) & scene.read_valid(window, coarse)[::stride, ::stride]
        log_probs.append(log_probs_of(mean if allowed is not None else mean / np.maximum(weight, 1e-12))[:, keep])
        coarse_labels.append(coarse[::stride, ::stride][keep])
    return area_offsets(np.concatenate(log_probs, axis=1), np.concatenate(coarse_labels), strength)


def _write_output(scene: _Scene, scratch: _Scratch, out_path: Path, unc_path: Path | None, gate_width: int | None,
                  confidence: float | None, gating: bool, sieve: int = 0, flip_margin: float = 0.0,
                  area_match: float = 0.0, class_reach: int = 0) -> None:
    """Vote, gate, mask and sieve the accumulated probabilities in row bands; write the map (and the uncertainty).

    With ``sieve`` > 1 each band's labels are computed with a halo of ``sieve`` rows: a region smaller than
    ``sieve`` pixels that touches the band lies wholly inside it, and a larger one shows at least ``sieve + 1``
    of its pixels, so the sieved band equals the same rows of the whole sieved map. With ``area_match`` the labels
    are the argmax of the log mean probabilities plus class offsets fitted first on a sample of the whole scene. With
    ``class_reach`` the probabilities first lose the classes the coarse map does not hold within that many pixels."""
    offsets = _area_offsets(scene, scratch, area_match, reach=class_reach) if area_match > 0 else None

    def labels_of(window: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(labels, disagreement, refined mask, valid mask) of a full-width row window."""
        samples, k = scratch.probs.shape[:2]
        weight = np.asarray(scratch.weight[window.slices])
        mean = np.asarray(scratch.probs[(slice(None), slice(None), *window.slices)]) / np.maximum(weight, 1e-12)  # (S, K, h, W)
        allowed = _reachable(scene, window, class_reach, k)
        if allowed is not None:
            mean = keep_reachable(mean, allowed)
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
