"""``idgbr demo``: the whole system on the Dubai set carried in the repository, with an honest report.

By default the demo uses the shipped models (:mod:`idgbr.nn.zoo`): prepare the Dubai set -> predict the test tiles
with the shipped coarse model -> refine them with the shipped lite refiner -> evaluate coarse vs refined ->
``DIR/report.md`` with pictures, and a summary table on stdout (about 2 minutes on 2 CPU cores).

``--train`` runs the full from-scratch protocol instead: train a coarse model and the lite refiner on the train split
first (about 20 minutes on 2 idle CPU cores; see ``idgbr demo --help``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from .benchmark import BenchmarkSettings, Stages, refiner_config, train_and_refine
from ..errors import IdgbrError

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
    sample_steps: int | None = 4  # the fast mode: 4 DDIM steps, no CFG (4 network evaluations instead of 50)
    guidance: float | None = 1.0
    strength: float | None = 1.0
    seed: int = 0
    train_minutes: float | None = None  # stop the refiner's training after this many minutes (or at its steps)
    coarse_folds: int = 0  # K >= 2: the refiner trains on out-of-fold coarse train maps (0: in-sample maps)
    device: str = "auto"  # where the models run (idgbr.nn.device)


REPO_DUBAI = Path(__file__).resolve().parents[3] / "datasets" / "dubai_aerial"  # carried in the repository (src/idgbr/evaluation/demo.py)


def find_dubai(source: str | Path | None = None) -> Path:
    """The raw Dubai folder: ``source``, ``$IDGBR_DUBAI``, the copy in the repository (``datasets/dubai_aerial``),
    or ``../shared/data/dubai_aerial`` beside the repo."""
    if source:  # an explicit folder is the only one looked at
        path = Path(source)
        if (path / "images").is_dir() and (path / "masks").is_dir():
            return path
        raise IdgbrError(f"{path}: Dubai aerial data not found (expected images/ and masks/ from the CC0 'Semantic "
                         "segmentation of aerial imagery' set); check --source")
    candidates = []
    if os.environ.get(DUBAI_ENV):
        candidates.append(Path(os.environ[DUBAI_ENV]))
    repo = REPO_DUBAI.parents[1]
    candidates += [REPO_DUBAI, repo.parent / "shared" / "data" / "dubai_aerial"]
    for path in candidates:
        if (path / "images").is_dir() and (path / "masks").is_dir():
            return path
    raise IdgbrError(f"{REPO_DUBAI}: Dubai aerial data not found (it comes with a clone of the idgbr repository); "
                     f"pass --source DIR (with images/ and masks/ from the CC0 'Semantic segmentation of aerial "
                     f"imagery' set) or set {DUBAI_ENV}")


def run_demo(out: str | Path, train: bool = False, source: str | Path | None = None,
             settings: DemoSettings | None = None, log: Callable[[str], None] = print) -> dict:
    """The demo: the shipped models on the Dubai test tiles, or (``train``) the full from-scratch protocol.

    Returns ``{"coarse", "refined", "seconds", "summary"}`` (the two evaluation results, wall seconds, the printed
    summary); ``DIR/report.md`` holds the report with pictures."""
    from ..data.prepare import prepare

    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = find_dubai(source)
    stages = Stages(out, log)
    start = time.perf_counter()
    data = out / "data" / "dubai"
    stages("prepare Dubai", data, {"source": str(raw), "scale": settings.scale},
           lambda: prepare("dubai", raw, data, overwrite=True, scale=settings.scale))
    run = _train_demo if train else _shipped_demo
    coarse, refined, name, description = run(stages, data, out, settings)
    seconds = time.perf_counter() - start
    report = write_demo_report(out, data, coarse, refined, description, stages.seconds, seconds, name)
    log("\n" + report["summary"])
    return report


def _shipped_demo(stages: Stages, data: Path, out: Path, settings: DemoSettings) -> tuple[dict, dict, str, str]:
    """The shipped coarse model and refiner on the test tiles (no training)."""
    from ..training.coarse import predict_coarse
    from .evaluate import evaluate_folder
    from ..inference.pipeline import Refiner
    from ..nn.zoo import DEFAULT_COARSE, DEFAULT_REFINER, card

    if settings.scale != card(DEFAULT_REFINER)["data"]["scale"]:
        raise IdgbrError(f"the shipped models were made at scale {card(DEFAULT_REFINER)['data']['scale']}; "
                         "use --train to train at another scale")
    name = DEFAULT_COARSE
    stages("predict coarse test", out / "coarse_pred" / "test", {"model": name, "split": "test"},
           lambda: predict_coarse(name, data, "test", name, device=settings.device))
    pred_dir = out / "refined" / "lite"
    stages("refine test", pred_dir, {"model": DEFAULT_REFINER, "coarse": name},
           lambda: Refiner.from_pretrained(DEFAULT_REFINER, device=settings.device).refine_folder(data, "test", name,
                                                                                                   pred_dir))
    refined = evaluate_folder(data, pred_dir, "test", coarse_dir=data / "coarse" / name)
    coarse = refined["coarse"]  # scored in the same pass
    description = (f"Coarse model: the shipped '{DEFAULT_COARSE}' ({card(DEFAULT_COARSE)['summary']}). "
                   f"Refiner: the shipped '{DEFAULT_REFINER}' ({card(DEFAULT_REFINER)['summary']}).")
    return coarse, refined, name, description


def _train_demo(stages: Stages, data: Path, out: Path, settings: DemoSettings) -> tuple[dict, dict, str, str]:
    """The full protocol from scratch: train a coarse model and the lite refiner, then refine the test tiles."""
    from ..training.coarse import fold_stems, predict_coarse, predict_coarse_oof, train_coarse
    from ..data.dataset import SegmentationDataset
    from .evaluate import evaluate_folder

    if settings.coarse_folds:  # a bad K fails before any training
        fold_stems(SegmentationDataset(data, "train", load_mask=False).stems, settings.coarse_folds, flag="--coarse-folds")
    coarse_dir = out / "coarse_model"
    cparams = {"arch": settings.arch, "encoder": settings.encoder, "iters": settings.coarse_iters, "batch": settings.coarse_batch,
               "crop": settings.coarse_crop, "seed": settings.seed, "data": str(data)}
    stages(f"train coarse {settings.arch}", coarse_dir, cparams,
           lambda: train_coarse(data, settings.arch, coarse_dir, iters=settings.coarse_iters, encoder=settings.encoder,
                                batch=settings.coarse_batch, crop=settings.coarse_crop, seed=settings.seed,
                                device=settings.device))
    folds = settings.coarse_folds
    suffix, extra = (f"_oof{folds}", {"folds": folds}) if folds else ("", {})  # in-sample: the stages as before
    name = f"demo{suffix}"
    stages("predict coarse test", out / "coarse_pred" / f"test{suffix}", {**cparams, "split": "test", **extra},
           lambda: predict_coarse(coarse_dir, data, "test", name, device=settings.device))
    if folds:
        train = dict(iters=settings.coarse_iters, encoder=settings.encoder, batch=settings.coarse_batch,
                     crop=settings.coarse_crop, seed=settings.seed)
        stages("predict coarse train out-of-fold", out / "coarse_pred" / f"train{suffix}",
               {**cparams, "split": "train", **extra},
               lambda: predict_coarse_oof(data, settings.arch, name, folds, out / f"coarse_model{suffix}", **train))
    else:
        stages("predict coarse train", out / "coarse_pred" / "train", {**cparams, "split": "train"},
               lambda: predict_coarse(coarse_dir, data, "train", name, device=settings.device))

    config = refiner_config(data, "lite", settings.refiner_steps, settings.seed,
                            {"train_minutes": settings.train_minutes} if settings.train_minutes else {})
    bench = BenchmarkSettings(sample_steps=settings.sample_steps, guidance=settings.guidance, strength=settings.strength,
                              device=settings.device)
    refined = train_and_refine(stages, data, out, "lite", config, name, bench)
    coarse = evaluate_folder(data, data / "coarse" / name, "test")
    description = (f"Coarse model: {settings.arch} ({settings.coarse_iters} iterations), trained here. Refiner: lite "
                   "preset, trained here.")
    return coarse, refined, name, description


def write_demo_report(out: Path, data: Path, coarse: dict, refined: dict, description: str,
                      stage_seconds: dict[str, float], seconds: float, name: str = "demo") -> dict:
    from ..data.dataset import SegmentationDataset
    from ..data.io import atomic_path, read_label
    from .report import bar_chart, comparison_panel, flat_metrics, metrics_table

    rows = {"coarse": coarse, "IDGBR lite refined": refined}
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
        f"{description} Test images: {len(dataset)}. Total time: {seconds / 60:.1f} min.", "",
        f"**{verdict}**", "", table, "",
        "| class | coarse IoU | refined IoU | coarse F1 | refined F1 |", "|---|---|---|---|---|", per_class, "",
        f"![metrics]({chart.name})", "",
        *[f"![{p.stem}]({p.name})" for p in pictures], "",
        "Seconds per stage: " + ", ".join(f"{k}: {v:.0f}" for k, v in stage_seconds.items()), "",
    ]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    figures = {"coarse": flat_metrics(coarse), "refined": flat_metrics(refined), "seconds": seconds,
               "stage_seconds": stage_seconds, "description": description}
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
    summary = table + "\n\n" + verdict + f"\nReport: {out / 'report.md'}"
    return {"coarse": coarse, "refined": refined, "seconds": seconds, "summary": summary}
