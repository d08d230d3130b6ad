"""Describe complete coarse tracks: validation curves of the fold models, and scores on train (out-of-fold) and test.

    python scripts/experiments/coarse_track_report.py --data data/dubai_half --out docs/results/coarse_tracks \\
        fixtures/coarse/dubai_half/deeplabv3plus_converged fixtures/coarse/dubai_half/unet_converged

Each TRACK is a folder written by ``idgbr predict-coarse --folds K --val-every N --with-test`` (maps + provenance.json).
Writes ``OUT.md`` (tables) and ``OUT.png`` (validation mIoU and WFm(3px) of every fold model against iterations).
The validation curves score each fold model on its held-out fold of the train split; the test split is only scored
once, at the end, and never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tracks", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="OUT.md and OUT.png are written")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from idgbr.evaluation.evaluate import evaluate_folder
    from idgbr.evaluation.report import save_figure

    lines = ["# Coarse tracks", ""]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for track in args.tracks:
        provenance = json.loads((track / "provenance.json").read_text())
        settings = provenance["settings"]
        name = track.name
        lines += [f"## `{name}`", "", f"Command: `{provenance.get('command', '(not recorded)')}`", "",
                  f"{settings['arch']}, encoder {settings['encoder']}, {settings['iters']} iterations per fold model, "
                  f"batch {settings['batch']}, crop {settings['crop']}, lr {settings['lr']}, seed {settings['seed']}, "
                  f"{provenance['folds']} folds ({provenance['fold_assignment']}). Test maps: "
                  f"{provenance.get('test', {}).get('method', 'not in this track')}.", ""]
        header = "| fold | held out | seconds | " + " | ".join(
            f"it {v['iter']}" for v in provenance["fold_models"][0].get("validation", [])) + " |"
        lines += ["Validation mIoU / WFm(3px) (%) of each fold model on its held-out fold:", "", header,
                  "|" + "---|" * (header.count("|") - 1)]
        for fold in provenance["fold_models"]:
            curve = fold.get("validation", [])
            tiles = sorted({stem.split("_")[0] for stem in fold["held_out"]})
            lines.append(f"| {fold['fold']} | {', '.join(tiles)} ({len(fold['held_out'])}) | {fold.get('seconds') or 0:.0f} | "
                         + " | ".join(f"{100 * v['miou']:.1f} / {100 * v['wfm3']:.1f}" for v in curve) + " |")
            iters = [v["iter"] for v in curve]
            axes[0].plot(iters, [100 * v["miou"] for v in curve], marker="o", label=f"{settings['arch']} fold {fold['fold']}")
            axes[1].plot(iters, [100 * v["wfm3"] for v in curve], marker="o", label=f"{settings['arch']} fold {fold['fold']}")
        scores = {split: evaluate_folder(args.data, track, split, progress=False) for split in ("train", "test")}
        lines += ["", "| split | maps | mIoU | mF1 | OA | WFm 1px | WFm 3px | WFm 5px |", "|---|---|---|---|---|---|---|---|"]
        for split, result in scores.items():
            kind = "out-of-fold" if split == "train" else "fold-model ensemble"
            lines.append(f"| {split} | {kind} | {100 * result['miou']:.2f} | {100 * result['mf1']:.2f} | "
                         f"{100 * result['oa']:.2f} | " + " | ".join(f"{100 * result['wfm'][k]:.2f}" for k in ("1", "3", "5"))
                         + " |")
        lines.append("")
    for axis, title in zip(axes, ("validation mIoU (%)", "validation WFm(3px) (%)")):
        axis.set_xlabel("iteration")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    png = save_figure(fig, args.out.with_suffix(".png"))
    lines += [f"![validation curves]({png.name})", ""]
    args.out.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
