"""The benchmark's coarse tracks: train and predict one per architecture (:func:`coarse_stages`), or import a
complete track given as a folder (:func:`check_coarse_track`, :func:`import_coarse_track`); maps are fingerprinted
by :func:`maps_digest` so that a stage reruns when its input maps change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import IdgbrError

if TYPE_CHECKING:
    from .benchmark import BenchmarkSettings, Stages


def check_coarse_track(data_root: Path, folder: Path) -> tuple[str, list[str], str]:
    """A complete coarse track's architecture (from ``folder/provenance.json``), its train + test stems and a digest
    of their maps; a one-line :class:`IdgbrError` if the folder is not one."""
    import hashlib

    from ..data.dataset import SegmentationDataset

    provenance_file = folder / "provenance.json"
    if not provenance_file.is_file():
        raise IdgbrError(f"{provenance_file}: missing; --coarse-maps takes a folder written by 'idgbr predict-coarse "
                         f"--folds K --with-test' (maps + provenance.json)")
    try:
        arch = json.loads(provenance_file.read_text())["settings"]["arch"]
    except (ValueError, KeyError, TypeError):
        raise IdgbrError(f"{provenance_file}: no settings.arch; give a provenance.json written by 'idgbr predict-coarse "
                         f"--folds K --with-test'") from None
    stems = [s for split in ("train", "test") for s in SegmentationDataset(data_root, split, load_mask=False).stems]
    missing = [s for s in stems if not (folder / f"{s}.png").is_file()]
    if missing:
        raise IdgbrError(f"{folder}: no coarse map for {len(missing)} train/test stems ({', '.join(missing[:3])}); "
                         f"give a track made for {data_root} (train out-of-fold + test maps)")
    digest = hashlib.sha1(b"".join((folder / f"{s}.png").read_bytes() for s in stems)).hexdigest()[:12]
    return arch, stems, digest


def import_coarse_track(stages: Stages, data_root: Path, run: Path, folder: Path,
                        checked: tuple[str, list[str], str]) -> tuple[str, str]:
    """Copy a complete coarse track (``checked``: what :func:`check_coarse_track` returned for it) to
    ``DATA/coarse/track_<folder name>``; returns that name and the track's architecture."""
    import shutil

    arch, stems, digest = checked
    tag = f"track_{folder.resolve().name}"

    def copy() -> None:
        target = data_root / "coarse" / tag
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for name in [f"{s}.png" for s in stems] + ["provenance.json"]:
            shutil.copy2(folder / name, target / name)

    stages(f"import coarse track {tag}", run / "coarse_pred" / tag, {"folder": str(folder), "sha1": digest}, copy)
    return tag, arch


def coarse_stages(stages: Stages, data_root: Path, run: Path, arch: str, settings: BenchmarkSettings) -> str:
    """Train coarse model ``arch`` and write its train and test maps; returns their name under ``DATA/coarse/``.

    With ``settings.coarse_folds`` K >= 2 the train maps come from K out-of-fold models (name ``bench_<arch>_oof<K>``, plus
    ``_g<hash>`` with ``coarse_fold_group``, so that refiner stages trained on in-sample maps are never reused for them); the test maps always come from the
    model trained on the whole train split.
    """
    from ..training.coarse import predict_coarse, predict_coarse_oof, train_coarse

    folds, group = settings.coarse_folds, settings.coarse_fold_group
    tag = f"bench_{arch}" if not folds else f"bench_{arch}_oof{folds}" + (f"_g{_short_hash(group)}" if group else "")
    coarse_dir = run / "coarse_models" / arch
    weights = settings.coarse_encoder_weights
    coarse_params = {"arch": arch, "encoder": settings.coarse_encoder, "iters": settings.coarse_iters,
                     "crop": settings.coarse_crop, "batch": settings.coarse_batch, "seed": settings.seed,
                     **({"encoder_weights": weights} if weights else {})}  # (absent: stages run before it still match)
    train = dict(iters=settings.coarse_iters, encoder=settings.coarse_encoder, batch=settings.coarse_batch,
                 crop=settings.coarse_crop, seed=settings.seed, encoder_weights=weights, device=settings.device)
    stages(f"train coarse {arch}", coarse_dir, coarse_params, lambda: train_coarse(data_root, arch, coarse_dir, **train))
    suffix = tag[len(f"bench_{arch}"):]
    extra = {"name": tag, "folds": folds, "fold_group": group} if folds else {}  # in-sample: the stages as before
    def maps(split: str) -> Callable[[], str]:
        return lambda: maps_digest(data_root, tag, split)

    stages(f"predict coarse {arch} test", run / "coarse_pred" / f"{arch}_test{suffix}", {**coarse_params, "split": "test", **extra},
           lambda: predict_coarse(coarse_dir, data_root, "test", tag, device=settings.device), maps("test"))
    if folds:
        stages(f"predict coarse {arch} train out-of-fold", run / "coarse_pred" / f"{arch}_train{suffix}",
               {**coarse_params, "split": "train", **extra},
               lambda: predict_coarse_oof(data_root, arch, tag, folds, run / "coarse_models" / f"{arch}{suffix}",
                                          group=group, **train), maps("train"))
    else:
        stages(f"predict coarse {arch} train", run / "coarse_pred" / f"{arch}_train", {**coarse_params, "split": "train"},
               lambda: predict_coarse(coarse_dir, data_root, "train", tag, device=settings.device), maps("train"))
    return tag


def maps_digest(data_root: Path, name: str, split: str) -> str:
    """SHA-1 of the maps ``DATA/coarse/<name>/<stem>.png`` of ``split`` (a missing map counts as such)."""
    import hashlib

    from ..data.dataset import SegmentationDataset

    digest = hashlib.sha1()
    for stem in SegmentationDataset(data_root, split, load_mask=False).stems:
        path = Path(data_root) / "coarse" / name / f"{stem}.png"
        digest.update(stem.encode() + b"\0" + (path.read_bytes() if path.exists() else b"missing") + b"\0")
    return digest.hexdigest()


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:6]
