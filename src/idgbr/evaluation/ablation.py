"""Ablation rows for the refiner on a validation subset of the train split (never the test split).

Builds a view of DATA whose "train" split is DATA's train minus a held-out validation subset (every n-th train stem)
and whose "test" split is that subset; trains one coarse model on the view's train split (the benchmark's cheap
settings), predicts its coarse maps (in-sample on train, or out of fold with --folds), then for every variant trains a
refiner with the same seed and budget, refines the validation images and scores them against the coarse maps.

    idgbr ablate --data data/dubai_half --out runs/ablate \\
        --variant "base:" --variant "sampler_t:train_timesteps=sampler" \\
        --variant "sampler_t_mean4:train_timesteps=sampler;samples=4"

A variant is ``NAME:TRAIN_OVERRIDES[;INFER_OVERRIDES]``, each a comma-separated list of ``key=value`` (RefinerConfig
fields; values parsed as JSON). Variants with the same training overrides share one trained model. Results go to
``OUT/ablation.md`` and ``OUT/ablation.json`` (one row per variant, with deltas vs the coarse map, and boundary F at
3 px and components per ground-truth component for rows scored since those were added).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

def parse_items(text: str) -> dict:
    """``key=value,key=[a,b]`` -> overrides; commas inside brackets belong to the (JSON) value."""
    from ..nn.config import parse_overrides

    items, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return parse_overrides([item for item in items if item.strip()])


def make_view(data: Path, out: Path, every: int, holdout: str | None) -> Path:
    """A dataset folder with symlinked images/masks: train = train minus the held-out stems, test = those (the stems
    matching the regular expression ``holdout``, else every ``every``-th stem)."""
    import re

    from ..data.dataset import SegmentationDataset, write_splits

    view = out / "data"
    if (view / "classes.json").exists():
        return view
    stems = SegmentationDataset(data, "train", load_mask=False).stems
    held = [s for s in stems if re.search(holdout, s)] if holdout else stems[every // 2::every]
    view.mkdir(parents=True, exist_ok=True)
    for name in ("images", "masks", "classes.json"):
        target = view / name
        if not target.exists():
            target.symlink_to((data / name).resolve())
    write_splits(view, {"train": [s for s in stems if s not in held], "val": [], "test": held})
    return view


# Fields that only change sampling: a trained model is reused whatever they are.
INFERENCE_FIELDS = ("sample_steps", "guidance_scale", "strength", "samples", "noise_scale", "tta", "tile_size",
                    "tile_overlap", "flip_margin", "sieve")


def find_trained(models: Path, config, suffix: str) -> Path | None:
    """A finished model under ``models`` trained with ``config`` (inference fields aside). Configs saved before a
    field existed read it at its default, which is what they were trained with, so adding a field to RefinerConfig
    does not orphan the models trained before."""
    from ..nn.config import RefinerConfig

    def key(cfg) -> str:
        values = {k: v for k, v in cfg.to_dict().items() if k not in INFERENCE_FIELDS}
        return json.dumps(values, sort_keys=True, default=str)

    wanted = key(config)
    for folder in sorted(models.glob(f"*_{suffix}")):
        if (folder / "config.json").exists() and key(RefinerConfig.load(folder)) == wanted:
            return folder
    return None


def run(args: argparse.Namespace) -> int:
    """``idgbr ablate``: the rows of ``OUT/ablation.md`` and ``OUT/ablation.json``."""
    import torch

    from ..evaluation.benchmark import refiner_config
    from ..training.coarse import predict_coarse, train_coarse
    from ..evaluation.evaluate import evaluate_folder
    from ..inference.pipeline import Refiner
    from ..evaluation.report import flat_metrics
    from ..training.loop import train_refiner

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    args.out.mkdir(parents=True, exist_ok=True)
    view = make_view(args.data, args.out, args.every, args.holdout)
    coarse_model = args.out / "coarse_model"
    if args.coarse_maps is not None:  # the track's maps serve both roles
        link = view / "coarse" / "val_coarse"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(args.coarse_maps.resolve())
    elif not (coarse_model / "config.json").exists():
        train_coarse(view, args.arch, coarse_model, iters=args.coarse_iters, encoder="tu-mobilenetv3_small_100",
                     batch=4, crop=256, seed=args.seed, progress=False)
    eval_name, train_name = "val_coarse", "val_coarse"

    def link_track(folder: Path) -> str:
        name = f"trk_{folder.resolve().name}"
        link = view / "coarse" / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(folder.resolve())
        return name

    if args.train_maps:
        train_name = ",".join(link_track(folder) for folder in args.train_maps)
    evals = [("", eval_name)] + [(f"@{folder.resolve().name}", link_track(folder)) for folder in args.eval_maps]
    if not (view / "coarse" / eval_name).is_dir():
        predict_coarse(coarse_model, view, "test", name=eval_name, progress=False)
        predict_coarse(coarse_model, view, "train", name=eval_name, progress=False)
    if args.folds and not args.train_maps:
        from ..training.coarse import predict_coarse_oof

        train_name = f"val_coarse_oof{args.folds}"
        if not (view / "coarse" / train_name).is_dir():
            predict_coarse_oof(view, args.arch, train_name, args.folds, args.out / "oof_models",
                               iters=args.coarse_iters, encoder="tu-mobilenetv3_small_100", batch=4, crop=256,
                               seed=args.seed, group=args.fold_group, progress=False)
    coarse_eval = evaluate_folder(view, view / "coarse" / eval_name, "test", progress=False)
    train_eval = evaluate_folder(view, view / "coarse" / train_name.split(",")[0], "train", progress=False)
    rows = {"coarse (validation)": flat_metrics(coarse_eval), "coarse (its training maps)": flat_metrics(train_eval)}
    for suffix, name in evals[1:]:
        rows[f"coarse{suffix}"] = flat_metrics(evaluate_folder(view, view / "coarse" / name, "test", progress=False))
    results_file = args.out / "ablation.json"
    done = json.loads(results_file.read_text()) if results_file.exists() else {}
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        train_text, _, infer_text = rest.partition(";")
        train_over, infer_over = parse_items(train_text), parse_items(infer_text)
        key = json.dumps({"train": train_over, "infer": infer_over, "folds": args.folds, "group": args.fold_group,
                          **({"train_maps": train_name} if args.train_maps else {})}, sort_keys=True)
        if all(f"{name}{suffix}" in done and done[f"{name}{suffix}"]["key"] == key for suffix, _ in evals):
            rows.update({f"{name}{suffix}": done[f"{name}{suffix}"]["metrics"] for suffix, _ in evals})
            continue
        config = refiner_config(view, args.preset, None, args.seed, train_over)
        digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        suffix_name = hashlib.sha1(train_name.encode()).hexdigest()[:8] if "," in train_name else train_name
        model_dir = (find_trained(args.out / "models", config, suffix_name)
                     or args.out / "models" / f"{digest}_{suffix_name}")
        if not (model_dir / "config.json").exists():
            print(f"[train] {name}: {train_over}", flush=True)
            train_refiner(config, view, train_name, model_dir, resume=True, progress=False)
        refiner = Refiner.from_pretrained(model_dir)
        for suffix, track in evals:
            print(f"[refine] {name}{suffix}: {infer_over}", flush=True)
            pred = args.out / "pred" / f"{name}{suffix}"
            refiner.refine_folder(view, "test", track, pred, seed=args.seed, progress=False, **infer_over)
            result = evaluate_folder(view, pred, "test", coarse_dir=view / "coarse" / track, progress=False)
            metrics = {**flat_metrics(result), "iou_rtm": result.get("repair", {}).get("iou_rtm", float("nan"))}
            done[f"{name}{suffix}"] = {"key": key, "metrics": metrics, "model": str(model_dir)}
            results_file.write_text(json.dumps(done, indent=2))
            rows[f"{name}{suffix}"] = metrics
            base_row = rows[f"coarse{suffix}" if suffix else "coarse (validation)"]
            print(f"[row] {name}{suffix}: WFm3 {100 * metrics['wfm3']:.2f} (coarse {100 * base_row['wfm3']:.2f}), "
                  f"mIoU {100 * metrics['miou']:.2f} (coarse {100 * base_row['miou']:.2f})", flush=True)
    base = rows["coarse (validation)"]
    lines = ["| variant | mIoU | WFm 1px | WFm 3px | WFm 5px | ΔWFm3 | ΔmIoU | IoU_RTm | boundary F 3px | "
             "components / GT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        base = rows.get(f"coarse@{name.split('@')[1]}", base) if "@" in name else rows["coarse (validation)"]
        rtm = m.get("iou_rtm")
        extra = [f"{100 * m['bf3']:.1f}" if "bf3" in m else "",
                 f"{m['components_ratio']:.1f}" if "components_ratio" in m else ""]
        lines.append(f"| {name} | {100 * m['miou']:.2f} | {100 * m['wfm1']:.2f} | {100 * m['wfm3']:.2f} | "
                     f"{100 * m['wfm5']:.2f} | {100 * (m['wfm3'] - base['wfm3']):+.2f} | "
                     f"{100 * (m['miou'] - base['miou']):+.2f} | {'' if rtm is None else f'{100 * rtm:.1f}'} | "
                     f"{extra[0]} | {extra[1]} |")
    (args.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0

