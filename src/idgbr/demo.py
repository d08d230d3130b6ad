"""``idgbr demo``: the whole system on the bundled real Dubai set, with an honest report.

prepare the Dubai set -> train a coarse model -> train the lite refiner -> refine the test tiles -> evaluate coarse
vs refined -> ``DIR/report.md`` with pictures, and a summary table on stdout. ``--quick`` uses a subset and fewer
steps (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .benchmark import BenchmarkSettings, Stages, refiner_config, train_and_refine
from .errors import IdgbrError

DUBAI_ENV = "IDGBR_DUBAI"


@dataclass
class DemoSettings:
    arch: str = "deeplabv3plus"
    encoder: str | None = "tu-mobilenetv3_small_100"  # a light encoder: resnet18 costs ~3x more on 2 CPU cores
    scale: float = 0.5  # the Dubai images at half resolution: 4x less compute on 2 CPU cores
    coarse_iters: int = 200
    coarse_batch: int = 4
    coarse_crop: int = 256
    refiner_steps: int | None = None  # None: the lite preset's
    train_stems: int | None = None  # None: all 54
    test_stems: int | None = None  # None: all 18
    sample_steps: int | None = 4  # the fast mode: 4 DDIM steps, no CFG (4 network evaluations instead of 50)
    guidance: float | None = 1.0
    strength: float | None = 1.0
    seed: int = 0
    train_minutes: float | None = None  # stop the refiner's training after this many minutes (or at its steps)
    coarse_folds: int = 0  # K >= 2: the refiner trains on out-of-fold coarse train maps (0: in-sample maps)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(coarse_iters=40, refiner_steps=60, train_stems=12, test_stems=3)


def find_dubai(source: str | Path | None = None) -> Path:
    """The raw Dubai folder: ``source``, ``$IDGBR_DUBAI``, or ``../shared/data/dubai_aerial`` beside the repo."""
    if source:  # an explicit folder is the only one looked at
        path = Path(source)
        if (path / "images").is_dir() and (path / "masks").is_dir():
            return path
        raise IdgbrError(f"{path}: Dubai aerial data not found (expected images/ and masks/ from the CC0 'Semantic "
                         "segmentation of aerial imagery' set); check --source")
    candidates = []
    if os.environ.get(DUBAI_ENV):
        candidates.append(Path(os.environ[DUBAI_ENV]))
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data" / "dubai_aerial", Path.cwd().parent / "shared" / "data" / "dubai_aerial"]
    for path in candidates:
        if (path / "images").is_dir() and (path / "masks").is_dir():
            return path
    shown = candidates[-2]
    raise IdgbrError(f"{shown}: Dubai aerial data not found; pass --source DIR (with images/ and masks/ from the "
                     f"CC0 'Semantic segmentation of aerial imagery' set) or set {DUBAI_ENV}")


def subset_dataset(src: Path, dst: Path, train: int | None, test: int | None) -> Path:
    """A copy of ``src`` restricted to the first ``train``/``test`` stems of each split (None: all)."""
    if train is None and test is None:
        return src
    from .data import SegmentationDataset

    if dst.exists():
        shutil.rmtree(dst)
    (dst / "splits").mkdir(parents=True)
    shutil.copy(src / "classes.json", dst / "classes.json")
    for split, count in (("train", train), ("test", test)):
        dataset = SegmentationDataset(src, split, load_mask=False)
        # spread the subset over the split (every k-th stem) so that several source tiles are represented
        stems = dataset.stems if count is None else dataset.stems[:: max(1, len(dataset.stems) // count)][:count]
        (dst / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        for stem in stems:
            for folder, path in (("images", dataset.image_path(stem)), ("masks", dataset.mask_path(stem))):
                (dst / folder).mkdir(exist_ok=True)
                shutil.copy(path, dst / folder / path.name)
    return dst


def run_demo(out: str | Path, quick: bool = False, source: str | Path | None = None,
             settings: DemoSettings | None = None, log: Callable[[str], None] = print) -> dict:
    from .coarse import fold_stems, predict_coarse, predict_coarse_oof, train_coarse
    from .data import SegmentationDataset
    from .evaluate import evaluate_folder
    from .prepare import prepare

    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = find_dubai(source)
    stages = Stages(out, log)
    start = time.perf_counter()

    full = out / "data" / "dubai"
    stages("prepare Dubai", full, {"source": str(raw), "scale": settings.scale},
           lambda: prepare("dubai", raw, full, overwrite=True, scale=settings.scale))
    data = full
    if settings.train_stems or settings.test_stems:
        data = out / "data" / "dubai_subset"
        stages("subset", data, {"train": settings.train_stems, "test": settings.test_stems},
               lambda: subset_dataset(full, data, settings.train_stems, settings.test_stems))

    if settings.coarse_folds:  # a bad K fails before any training
        fold_stems(SegmentationDataset(data, "train", load_mask=False).stems, settings.coarse_folds, flag="--coarse-folds")
    coarse_dir = out / "coarse_model"
    cparams = {"arch": settings.arch, "encoder": settings.encoder, "iters": settings.coarse_iters, "batch": settings.coarse_batch,
               "crop": settings.coarse_crop, "seed": settings.seed, "data": str(data)}
    stages(f"train coarse {settings.arch}", coarse_dir, cparams,
           lambda: train_coarse(data, settings.arch, coarse_dir, iters=settings.coarse_iters, encoder=settings.encoder,
                                batch=settings.coarse_batch, crop=settings.coarse_crop, seed=settings.seed))
    folds = settings.coarse_folds
    suffix, extra = (f"_oof{folds}", {"folds": folds}) if folds else ("", {})  # in-sample: the stages as before
    name = f"demo{suffix}"
    stages("predict coarse test", out / "coarse_pred" / f"test{suffix}", {**cparams, "split": "test", **extra},
           lambda: predict_coarse(coarse_dir, data, "test", name))
    if folds:
        train = dict(iters=settings.coarse_iters, encoder=settings.encoder, batch=settings.coarse_batch,
                     crop=settings.coarse_crop, seed=settings.seed)
        stages("predict coarse train out-of-fold", out / "coarse_pred" / f"train{suffix}",
               {**cparams, "split": "train", **extra},
               lambda: predict_coarse_oof(data, settings.arch, name, folds, out / f"coarse_model{suffix}", **train))
    else:
        stages("predict coarse train", out / "coarse_pred" / "train", {**cparams, "split": "train"},
               lambda: predict_coarse(coarse_dir, data, "train", name))

    config = refiner_config(data, "lite", settings.refiner_steps, settings.seed,
                            {"train_minutes": settings.train_minutes} if settings.train_minutes else {})
    bench = BenchmarkSettings(sample_steps=settings.sample_steps, guidance=settings.guidance, strength=settings.strength)
    refined = train_and_refine(stages, data, out, "lite", config, name, bench)
    coarse = evaluate_folder(data, data / "coarse" / name, "test")
    seconds = time.perf_counter() - start
    report = write_demo_report(out, data, coarse, refined, settings, stages.seconds, seconds, name)
    log("\n" + report["summary"])
    return report


def write_demo_report(out: Path, data: Path, coarse: dict, refined: dict, settings: DemoSettings,
                      stage_seconds: dict[str, float], seconds: float, name: str = "demo") -> dict:
    from .data import SegmentationDataset
    from .io import atomic_path, read_label
    from .report import bar_chart, comparison_panel, flat_metrics, metrics_table

    rows = {f"coarse ({settings.arch})": coarse, "IDGBR lite refined": refined}
    if "gated" in refined:  # "do no harm": refined labels only near coarse boundaries
        rows[f"IDGBR lite refined, gated {refined['gated']['gate_width']} px"] = refined["gated"]
    table = metrics_table(rows)
    gain = refined["wfm"]["3"] - coarse["wfm"]["3"]
    dmiou = refined["miou"] - coarse["miou"]
    if gain > 0:
        verdict = f"Refinement beats the coarse map on boundary WFm(3px) by {100 * gain:.2f} points (mIoU {100 * dmiou:+.2f})."
    else:
        verdict = (f"Refinement does NOT beat the coarse map on boundary WFm(3px): {100 * gain:+.2f} points "
                   f"(mIoU {100 * dmiou:+.2f}).")
    if "gated" in refined:
        gated = refined["gated"]
        verdict += (f" Gated to {gated['gate_width']} px around coarse boundaries: WFm(3px) "
                    f"{100 * (gated['wfm']['3'] - coarse['wfm']['3']):+.2f}, mIoU {100 * (gated['miou'] - coarse['miou']):+.2f}.")
    dataset = SegmentationDataset(data, "test", coarse=name)
    names = dataset.classes.names
    focus = names.index("Building") if "Building" in names else (1 if len(names) == 2 else 0)
    pictures = []
    for index in range(min(3, len(dataset))):
        sample = dataset[index]
        refined_map, _ = read_label(out / "refined" / "lite" / f"{sample['stem']}.png")
        pictures.append(comparison_panel(out / f"panel_{sample['stem']}.png", sample["image"], sample["mask"],
                                         sample["coarse"], refined_map, len(names), sample["stem"],
                                         focus_class=focus, class_names=names))
    chart = bar_chart(out / "metrics.png", {k: flat_metrics(v) for k, v in rows.items()},
                      ["miou", "mf1", "oa", "kappa", "wfm1", "wfm3", "wfm5"], "Dubai test tiles")
    per_class = "\n".join(
        f"| {c['name']} | {100 * c['iou']:.2f} | {100 * r['iou']:.2f} | {100 * c['f1']:.2f} | {100 * r['f1']:.2f} |"
        for c, r in zip(coarse["per_class"], refined["per_class"]))
    lines = [
        "# idgbr demo: Dubai aerial imagery", "",
        f"Coarse model: {settings.arch} ({settings.coarse_iters} iterations). Refiner: lite preset. "
        f"Test images: {len(dataset)}. Total time: {seconds / 60:.1f} min.", "",
        f"**{verdict}**", "", table, "",
        "| class | coarse IoU | refined IoU | coarse F1 | refined F1 |", "|---|---|---|---|---|", per_class, "",
        f"![metrics]({chart.name})", "",
        *[f"![{p.stem}]({p.name})" for p in pictures], "",
        "Seconds per stage: " + ", ".join(f"{k}: {v:.0f}" for k, v in stage_seconds.items()), "",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    summary = table + "\n\n" + verdict + f"\nReport: {out / 'report.md'}"
    return {"coarse": coarse, "refined": refined, "seconds": seconds, "summary": summary}
