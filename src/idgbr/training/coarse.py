"""The discriminative (coarse) stage: ``train-coarse``, ``predict-coarse`` and out-of-fold maps (``--folds``).

The model itself (:class:`~idgbr.nn.coarse_model.CoarseModel`, the architecture registry and encoder weights) is in
:mod:`idgbr.nn.coarse_model`. Coarse maps are written to ``DATA/coarse/<name>/<stem>.png`` at full image size with
blended sliding windows (:func:`idgbr.nn.tiling.sliding_window`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import IGNORE_INDEX, SegmentationDataset
from ..errors import IdgbrError, file_error
from ..data.io import atomic_path, write_array, write_label
from ..nn.coarse_model import (CONFIG_FILE, IMAGENET, INPUT_MULTIPLE, TRAINING_FILE, CoarseConfig, CoarseModel,
                               _load_imagenet_encoder, canonical_arch, get_arch, imagenet_encoder_name,
                               load_encoder_weights)

__all__ = ["train_coarse", "predict_coarse", "fold_stems", "predict_coarse_oof", "band_statistics"]


# --- training ------------------------------------------------------------------------------------------------------

class _CachedTrainSet(torch.utils.data.Dataset):
    """Decoded training samples kept in memory; item ``(index, draw)`` applies the transform with its own seed."""

    def __init__(self, samples: list[dict[str, Any]], transform: Callable, mean: np.ndarray, std: np.ndarray, seed: int):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, draw = key
        sample = dict(self.samples[index])
        sample = self.transform(sample, np.random.default_rng([self.seed, draw]))
        image = (np.asarray(sample["image"], dtype=np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(
            np.ascontiguousarray(sample["mask"]).astype(np.int64))


class _DrawSampler(torch.utils.data.Sampler):
    """Endless shuffled passes over the dataset, yielding ``(index, draw)`` with a unique ``draw`` per item."""

    def __init__(self, size: int, seed: int, total: int):
        self.size, self.seed, self.total = size, seed, total

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        draw = 0
        while draw < self.total:
            for index in rng.permutation(self.size):
                if draw >= self.total:
                    return
                yield int(index), draw
                draw += 1


def band_statistics(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (C,) over all pixels of (H, W, C) images (float64 sums; std floored at 1e-6)."""
    count = sum(im.shape[0] * im.shape[1] for im in images)
    total = sum(im.reshape(-1, im.shape[-1]).astype(np.float64).sum(0) for im in images)
    mean = total / count
    sq = sum(((im.reshape(-1, im.shape[-1]).astype(np.float64) - mean) ** 2).sum(0) for im in images)
    return mean, np.maximum(np.sqrt(sq / count), 1e-6)


def _subset(available: Sequence[str], stems: Sequence[str], split: str | None) -> list[str]:
    """``stems`` in their given order, each checked to be one of ``available`` (the split's stems)."""
    stems = list(stems)
    missing = sorted(set(stems) - set(available))
    if missing:
        raise IdgbrError(f"stems {', '.join(missing[:5])} are not in the {split} split; give stems of that split")
    if not stems:
        raise IdgbrError("an empty stem subset; give at least one stem")
    return stems


def train_coarse(data_root: str | Path, arch: str, out: str | Path, iters: int = 20000, batch: int = 8,
                 crop: int = 512, lr: float | None = None, encoder: str | None = None,
                 encoder_weights: str | Path | None = None, seed: int = 0, progress: bool = True, num_workers: int = 0,
                 checkpoint_every: int = 1000, transform: Callable | None = None,
                 device: str | torch.device | None = None, stems: Sequence[str] | None = None,
                 val_stems: Sequence[str] | None = None, val_every: int = 0) -> CoarseModel:
    """Train a coarse segmentation model on ``DATA``'s train split and save it to the run directory ``out``.

    ``stems`` restricts training to those train-split stems (the out-of-fold models of
    :func:`predict_coarse_oof`); they are recorded in ``training.json`` as ``train_stems``.
    With ``val_stems`` (train-split stems not trained on) and ``val_every`` N > 0, the model is scored on them
    (full images, sliding windows) every N iterations and at the end; ``training.json`` records the curve as
    ``validation``: ``[{"iter", "miou", "wfm3"}, ...]`` (fractions).

    Paper defaults: batch 8, 20k iterations, 512 crops with the paper's augmentations
    (:func:`idgbr.data.augment.paper_train_transform`). ``encoder_weights`` is a local weights file or ``"imagenet"``
    (the packaged weights of a registered encoder, e.g. ``tu-tf_efficientnet_lite0``; 8-bit RGB images only, which
    are then normalised as the weights expect). Cross-entropy ignoring 255, AdamW (weight decay 1e-2) with a
    poly (power 0.9) learning-rate decay. The run directory is rewritten atomically every ``checkpoint_every``
    iterations and at the end, so an interrupted run leaves a usable model.
    """
    spec = get_arch(arch)
    if iters < 1 or batch < 2:
        raise IdgbrError(f"need --iters >= 1 and --batch >= 2 (batch-norm layers), got {iters} and {batch}")
    if crop < INPUT_MULTIPLE or crop % INPUT_MULTIPLE:
        raise IdgbrError(f"--crop {crop} must be a positive multiple of {INPUT_MULTIPLE}")
    from ..nn.device import resolve_device

    device = resolve_device(device)
    imagenet = encoder_weights is not None and str(encoder_weights) == IMAGENET
    pretrained = imagenet_encoder_name(encoder or spec.default_encoder) if imagenet else None
    dataset = SegmentationDataset(data_root, "train")
    val_samples = []
    if val_stems is not None and val_every > 0:
        overlap = sorted(set(val_stems) & set(stems if stems is not None else dataset.stems))
        if overlap:
            raise IdgbrError(f"validation stems are also trained on ({', '.join(overlap[:3])}); give held-out stems")
        val_set = SegmentationDataset(data_root, "train")
        val_set.stems = _subset(val_set.stems, val_stems, "train")
        val_samples = [val_set[i] for i in range(len(val_set))]
    if stems is not None:
        dataset.stems = _subset(dataset.stems, stems, "train")
    samples = []
    for i in range(len(dataset)):  # decode once: the paper's datasets are small, CPU steps should not wait on I/O
        sample = dataset[i]
        samples.append({"image": sample["image"], "mask": sample["mask"], "stem": sample["stem"]})
    bands = {s["image"].shape[-1] for s in samples}
    if len(bands) != 1:
        raise file_error(dataset.root / "images", f"training images have different band counts {sorted(bands)}",
                         "give every image the same bands")
    if pretrained is not None:
        from ..nn.encoders import get_encoder

        dtypes = sorted({str(s["image"].dtype) for s in samples})
        if bands != {3} or dtypes != ["uint8"]:
            raise file_error(dataset.root / "images", f"{'/'.join(map(str, sorted(bands)))}-band {'/'.join(dtypes)} "
                             f"images, but ImageNet weights expect 8-bit RGB", "convert them or drop --encoder-weights imagenet")
        mean, std = np.array(get_encoder(pretrained).mean), np.array(get_encoder(pretrained).std)  # x / 127.5 - 1
    else:
        mean, std = band_statistics([s["image"] for s in samples])
    config = CoarseConfig(arch=canonical_arch(arch), encoder=encoder or spec.default_encoder, num_classes=dataset.classes.num_classes,
                          in_channels=bands.pop(), mean=mean.tolist(), std=std.tolist(), class_names=dataset.classes.names)
    torch.manual_seed(seed)  # network initialisation only; augmentation draws use their own generators
    model = CoarseModel(config)
    if pretrained is not None:
        _load_imagenet_encoder(model, pretrained)
    elif encoder_weights is not None:
        load_encoder_weights(model, encoder_weights)
    model.to(device).train()

    if transform is None:
        from ..data.augment import paper_train_transform

        transform = paper_train_transform(crop)
    train_set = _CachedTrainSet(samples, transform, mean, std, seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, sampler=_DrawSampler(len(samples), seed, iters * batch),
                                         num_workers=num_workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0)
    lr = spec.default_lr if lr is None else lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / iters) ** 0.9)  # mmseg poly
    record: dict[str, Any] = {"data": str(data_root), "arch": config.arch, "encoder": config.encoder, "iters": iters,
                              "batch": batch, "crop": crop, "lr": lr, "seed": seed, "encoder_weights":
                              str(encoder_weights) if encoder_weights else None, "train_images": len(samples),
                              **({"encoder_weights_package": _package_version(pretrained)} if pretrained else {}),
                              **({"train_stems": dataset.stems} if stems is not None else {})}
    if val_samples:
        record.update(val_every=val_every, val_stems=[v["stem"] for v in val_samples], validation=[])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc=f"train-coarse {config.arch}", unit="it")
    smoothed, start, step = math.nan, time.perf_counter(), 0
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        logits = model(images)
        valid = (masks != IGNORE_INDEX).sum().clamp(min=1)
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum") / valid
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        value = float(loss.detach())
        smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
        if bar is not None:
            bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            bar.update(1)
        if val_samples and (step % val_every == 0 or step == iters):
            record["validation"].append({"iter": step, **_validate(model, val_samples, config.class_names)})
            model.train()
            if bar is not None:
                bar.set_description(f"train-coarse {config.arch} (val mIoU {100 * record['validation'][-1]['miou']:.1f})")
        if checkpoint_every and step % checkpoint_every == 0 and step < iters:
            model.save(out, {**record, "done_iters": step, "loss": smoothed})
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    model.eval().save(out, {**record, "done_iters": step, "loss": smoothed, "seconds": round(seconds, 2),
                            "seconds_per_iter": round(seconds / max(step, 1), 4), "device": str(device)})
    return model


def _package_version(name: str) -> str:
    """``<distribution> <version>`` of the package that ships encoder ``name``'s weights (recorded in training.json)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..nn.encoders import get_encoder

    package = get_encoder(name).package
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:  # importable (e.g. from a source tree) but not installed as a distribution
        return package


def _validate(model: CoarseModel, samples: list[dict[str, Any]], class_names: Sequence[str]) -> dict[str, float]:
    """mIoU and WFm(3px) (fractions) of ``model`` on decoded samples (image + mask), full images."""
    from ..metrics import evaluate_maps

    pairs = ((s["mask"], model.predict_probs(s["image"]).argmax(0).astype(np.uint8)) for s in samples)
    result = evaluate_maps(pairs, model.config.num_classes, tolerances=(3,), class_names=class_names)
    return {"miou": round(float(result["miou"]), 5), "wfm3": round(float(result["wfm"]["3"]), 5)}


# --- prediction ----------------------------------------------------------------------------------------------------

def predict_coarse(model_dir: str | Path | Sequence[str | Path], data_root: str | Path, split: str | None = "test", name: str | None = None,
                   probs: Literal["npy", "tif"] | None = None, tile: int = 512, overlap: int = 64, batch: int = 4,
                   progress: bool = True, device: str | torch.device | None = None,
                   stems: Sequence[str] | None = None) -> Path:
    """Write ``DATA/coarse/<name>/<stem>.png`` (class indices, full image size) for every image of ``split``
    (or only for ``stems``, which must belong to ``split``).

    ``model_dir`` may be a list of run folders (e.g. the fold models of :func:`predict_coarse_oof`): the maps are
    then the argmax of their mean probabilities (the models must agree on classes and bands).

    With ``probs`` the blended class probabilities are also written as float32 (K, H, W) ``.npy`` or as a K-band
    GeoTIFF (keeping the image's CRS/transform) under ``DATA/coarse/<name>_probs/``. Returns the map folder.
    """
    if probs not in (None, "npy", "tif"):
        raise IdgbrError(f"unknown --probs {probs!r}; choose npy or tif")
    if tile < INPUT_MULTIPLE or not 0 <= overlap < tile:
        raise IdgbrError(f"need --tile >= {INPUT_MULTIPLE} and 0 <= --overlap < --tile, got {tile} and {overlap}")
    dirs = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
    from ..nn.device import resolve_device

    models = [CoarseModel.load(d, device=resolve_device(device)) for d in dirs]
    model = models[0]
    for other, path in zip(models[1:], dirs[1:]):
        if (other.config.num_classes, other.config.in_channels) != (model.config.num_classes, model.config.in_channels):
            raise file_error(Path(path) / CONFIG_FILE, "classes or bands differ from the first model's",
                             "ensemble models trained on the same dataset")
    dataset = SegmentationDataset(data_root, split, load_mask=False)
    if stems is not None:
        dataset.stems = _subset(dataset.stems, stems, split)
    if dataset.classes.num_classes != model.config.num_classes:
        raise file_error(dataset.root / "classes.json", f"{dataset.classes.num_classes} classes, but the model in "
                         f"{model_dir} predicts {model.config.num_classes}", "use a model trained on this dataset")
    name = name or Path(dirs[0]).resolve().name
    if not name or "/" in name or name.startswith("."):
        raise IdgbrError(f"invalid --name {name!r}; use a plain folder name")
    out_dir = dataset.root / "coarse" / name
    probs_dir = dataset.root / "coarse" / f"{name}_probs"
    stems = dataset.stems
    if progress:
        from tqdm.auto import tqdm

        stems = tqdm(stems, desc=f"predict-coarse {name}", unit="img")
    for index, stem in enumerate(stems):
        sample = dataset[index]
        image = sample["image"]
        if image.shape[-1] != model.config.in_channels:
            raise file_error(dataset.image_path(stem), f"{image.shape[-1]} bands, the model expects "
                             f"{model.config.in_channels}", "predict with a model trained on the same bands")
        prob = sum(m.predict_probs(image, tile=tile, overlap=overlap, batch=batch) for m in models) / len(models)
        write_label(out_dir / f"{stem}.png", prob.argmax(0).astype(np.uint8))
        if probs is not None:
            write_array(probs_dir / f"{stem}.{probs}", prob, sample.get("geo"))
    return out_dir


# --- out-of-fold maps for the train split ----------------------------------------------------------------------------

PROVENANCE_FILE = "provenance.json"  # not an image extension: never listed or read as a coarse map


def fold_stems(stems: Sequence[str], folds: int, seed: int = 0, flag: str = "--folds",
               group: str | None = None) -> list[list[str]]:
    """Split ``stems`` into ``folds`` disjoint, sorted folds covering every stem once.

    The stems are sorted, permuted with ``numpy.random.default_rng(seed)`` and dealt round-robin (position ``i`` of the
    permutation goes to fold ``i % folds``), so fold sizes differ by at most one and the result depends only on the set
    of stems, ``folds`` and ``seed``. With ``group`` (a regular expression) the stems whose first match is the same
    (e.g. ``tile\\d+``: all crops of one source tile) form one unit, and the sorted units are permuted and dealt instead,
    so a group is never split between folds.
    """
    ordered = sorted(set(stems))
    group_flag = flag.replace("folds", "fold-group")  # --folds -> --fold-group, --coarse-folds -> --coarse-fold-group
    units: list[list[str]] = [[stem] for stem in ordered]
    if group is not None:
        import re

        try:
            pattern = re.compile(group)
        except re.error as exc:
            raise IdgbrError(f"{group_flag} {group!r} is not a regular expression ({exc}); e.g. 'tile\\d+'") from None
        keys: dict[str, list[str]] = {}
        for stem in ordered:
            match = pattern.search(stem)
            if match is None:
                raise IdgbrError(f"{group_flag} {group!r} does not match stem {stem!r}; give a pattern every train stem contains")
            keys.setdefault(match.group(0), []).append(stem)
        units = [keys[key] for key in sorted(keys)]
    what = "train images" if group is None else f"groups of {group_flag} {group!r}"
    if folds < 2 or folds > len(units):
        raise IdgbrError(f"{flag} {folds}: need 2 <= K <= {len(units)} (the number of {what}); "
                         f"give {flag} between 2 and {len(units)}")
    order = np.random.default_rng(seed).permutation(len(units))
    return [sorted(stem for j in order[i::folds] for stem in units[j]) for i in range(folds)]


def predict_coarse_oof(data_root: str | Path, arch: str, name: str, folds: int, work_dir: str | Path,
                       iters: int = 20000, encoder: str | None = None, batch: int = 8, crop: int = 512,
                       lr: float | None = None, seed: int = 0, tile: int = 512, overlap: int = 64,
                       encoder_weights: str | Path | None = None,
                       group: str | None = None, probs: Literal["npy", "tif"] | None = None, progress: bool = True,
                       device: str | torch.device | None = None, val_every: int = 0, test: bool = False,
                       command: str | None = None) -> Path:
    """Out-of-fold coarse maps of the train split: ``DATA/coarse/<name>/<stem>.png`` from models that never saw ``stem``.

    The train stems are split by :func:`fold_stems` (seeded with ``seed``; ``group`` keeps stems with the same
    regular-expression match, e.g. crops of one source tile, in one fold); for each fold ``i`` a model is trained
    with :func:`train_coarse` on the other folds (same arch/encoder/encoder weights/iters/batch/crop/lr/seed) into
    ``work_dir/fold<i>`` and predicts the held-out fold. ``DATA/coarse/<name>/provenance.json`` records the settings,
    the folds and each fold's model folder (and ``command``, when given). Returns the map folder.

    ``val_every`` N > 0 scores each fold model on its held-out fold every N iterations (a validation curve that
    never touches the test split; recorded per fold in the provenance). ``test=True`` also writes the test split's
    maps into the same folder, from the mean probabilities of the K fold models, so that the folder is a complete
    coarse track (train out-of-fold + test). ``probs`` also writes each map's probabilities (its fold model's, or
    the ensemble's mean for test) under ``DATA/coarse/<name>_probs/``, as :func:`predict_coarse` does.
    """
    data_root, work_dir = Path(data_root), Path(work_dir)
    dataset = SegmentationDataset(data_root, "train", load_mask=False)
    groups = fold_stems(dataset.stems, folds, seed, group=group)
    out_dir = dataset.root / "coarse" / name
    (out_dir / PROVENANCE_FILE).unlink(missing_ok=True)  # an interrupted run must not leave an old record
    settings = {"data": str(data_root), "arch": canonical_arch(arch), "encoder": encoder or get_arch(arch).default_encoder,
                "encoder_weights": str(encoder_weights) if encoder_weights else None, "iters": iters, "batch": batch, "crop": crop,
                "lr": get_arch(arch).default_lr if lr is None else lr, "seed": seed, "tile": tile, "overlap": overlap,
                "fold_group": group, **({"probs": probs} if probs else {})}
    records = []
    for index, held_out in enumerate(groups):
        trained_on = sorted(s for k, group in enumerate(groups) if k != index for s in group)
        model_dir = work_dir / f"fold{index}"
        if progress:
            print(f"fold {index + 1}/{folds}: train on {len(trained_on)} images, predict {len(held_out)}")
        train_coarse(data_root, arch, model_dir, iters=iters, batch=batch, crop=crop, lr=lr, encoder=encoder,
                     encoder_weights=encoder_weights, seed=seed, progress=progress, device=device, stems=trained_on, val_stems=held_out,
                     val_every=val_every)
        predict_coarse(model_dir, data_root, "train", name=name, probs=probs, tile=tile, overlap=overlap,
                       progress=progress, device=device, stems=held_out)
        training = json.loads((model_dir / TRAINING_FILE).read_text())
        records.append({"fold": index, "model_dir": str(model_dir), "seed": seed, "iters": iters,
                        "seconds": training.get("seconds"), "held_out": held_out, "trained_on": trained_on,
                        **({"validation": training["validation"]} if "validation" in training else {})})
    test_record = None
    if test:
        if progress:
            print(f"test split: mean probabilities of the {folds} fold models")
        predict_coarse([r["model_dir"] for r in records], data_root, "test", name=name, probs=probs, tile=tile,
                       overlap=overlap, progress=progress, device=device)
        test_record = {"split": "test", "method": f"argmax of the mean probabilities of the {folds} fold models",
                       "stems": SegmentationDataset(data_root, "test", load_mask=False).stems}
    provenance = {"kind": "idgbr-coarse-oof", "split": "train", "folds": folds,
                  "fold_assignment": f"sorted {'stems' if group is None else f'groups of {group!r}'} permuted by numpy "
                                     f"default_rng({seed}), dealt round-robin",
                  "settings": settings, "fold_models": records,
                  **({"test": test_record} if test_record else {}), **({"command": command} if command else {})}
    with atomic_path(out_dir / PROVENANCE_FILE) as tmp:
        tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    return out_dir
