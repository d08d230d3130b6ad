"""Issue 28, inference levers on validation: refine the held-out images of an ``idgbr ablate`` run once
per inference setting (window size, test-time flips) and score flip margins 0-0.5 and the 6-px sieve on the same
probabilities (``idgbr.inference.postprocess.keep_unsure``, ``sieve_labels``). Logs one line per track, margin and sieve.

    python scripts/experiments/sweep_inference.py runs/v28_base_s0 --tile 512 --tta flips > runs/gate/base_s0_t512flips.log
    python scripts/experiments/sweep_inference.py --table runs/gate     # the two-seed table of docs/results/strong_maps.md

The run folder holds ``data/`` (the view: train = tiles 1-5, test = tile 6), ``data/coarse/val_coarse`` (the
DeepLabV3+ pretrained track) and ``data/coarse/trk_<track>`` (the ``--eval-maps`` tracks) and one model under
``models/``. Log files are named ``base_s<seed>_t<tile><tta>.log`` for ``--table``.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

TRACKS = ["deeplabv3plus_pretrained", "unet_pretrained", "deeplabv3plus_converged", "unet_converged"]
MARGINS = [0.0, 0.1, 0.2, 0.3, 0.5]
LINE = re.compile(r"(\S+) tile(\d+) margin ([\d.]+) sieve (\d+): dWFm3 ([-+\d.]+) dmIoU ([-+\d.]+) RTm ([\d.]+)")


def sweep(run: Path, tile: int, tta: str) -> None:
    import torch

    from idgbr.data.dataset import SegmentationDataset
    from idgbr.evaluation.evaluate import evaluate_folder
    from idgbr.data.io import write_label
    from idgbr.inference.pipeline import Refiner
    from idgbr.inference.postprocess import keep_unsure, sieve_labels

    torch.set_num_threads(1)
    view = run / "data"
    model = next((run / "models").glob("*/config.json")).parent
    refiner = Refiner.from_pretrained(model, device="cpu")
    if tile:
        refiner.model.config = refiner.config.replace(tile_size=tile)
    names = {track: "val_coarse" if track == TRACKS[0] else f"trk_{track}" for track in TRACKS}
    for track, coarse_name in names.items():
        dataset = SegmentationDataset(view, "test", coarse=coarse_name, load_mask=False)
        folder = run / "gate" / f"t{tile}{tta}"
        for index in range(len(dataset)):
            sample = dataset[index]
            labels, probs = refiner.refine(sample["image"], sample["coarse"], generator=torch.Generator().manual_seed(0),
                                           tta=tta, return_probs=True, sieve=0, flip_margin=0)
            for margin in MARGINS:
                kept = keep_unsure(labels, probs, sample["coarse"], margin) if margin else labels
                for sieve in (0, 6):
                    write_label(folder / f"m{margin}_s{sieve}" / track / f"{dataset.stems[index]}.png",
                                sieve_labels(kept, sieve))
        for margin in MARGINS:
            for sieve in (0, 6):
                result = evaluate_folder(view, folder / f"m{margin}_s{sieve}" / track, "test",
                                         coarse_dir=view / "coarse" / coarse_name, progress=False)
                coarse = result["coarse"]
                print(f"{track} tile{tile} margin {margin} sieve {sieve}: "
                      f"dWFm3 {100 * (result['wfm']['3'] - coarse['wfm']['3']):+.2f} "
                      f"dmIoU {100 * (result['miou'] - coarse['miou']):+.2f} RTm {100 * result['repair']['iou_rtm']:.1f}",
                      flush=True)


def table(logs: Path) -> str:
    rows: dict = defaultdict(dict)  # (windows, tta, margin, sieve) -> {(track, seed): (dWFm3, dmIoU, RTm)}
    for path in sorted(logs.glob("base_s*_t*.log")):
        seed, tta = re.match(r"base_s(\d+)_t\d+(\w+)\.log", path.name).groups()
        for line in path.read_text().splitlines():
            match = LINE.match(line)
            if match:
                track, tile, margin, sieve = match.group(1), int(match.group(2)), float(match.group(3)), int(match.group(4))
                key = (f"{tile or 256}² {tta}", margin, sieve)
                rows[key][(track, int(seed))] = tuple(float(match.group(i)) for i in (5, 6, 7))
    lines = ["| windows, TTA | margin | sieve | " + " | ".join(TRACKS) + " | strong mean | all mean |",
             "|---|---|---|" + "---|" * (len(TRACKS) + 2)]
    for key in sorted(rows):
        seeds = sorted({seed for _, seed in rows[key]})
        if any((track, seed) not in rows[key] for track in TRACKS for seed in seeds):
            continue
        means = {t: np.mean([rows[key][(t, s)] for s in seeds], axis=0) for t in TRACKS}

        def avg(tracks):
            return (f"{statistics.mean(means[t][0] for t in tracks):+.2f} / "
                    f"{statistics.mean(means[t][1] for t in tracks):+.2f}")

        cells = [f"{means[t][0]:+.2f} / {means[t][1]:+.2f} / {means[t][2]:.1f}" for t in TRACKS]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) +
                     f" | {avg(TRACKS[:2])} | {avg(TRACKS)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="an ablate_refiner run folder, or with --table the folder of logs")
    parser.add_argument("--tile", type=int, default=0, help="window size (0: the model's)")
    parser.add_argument("--tta", default="none", choices=["none", "flips"])
    parser.add_argument("--table", action="store_true", help="print the table of the logs in RUN instead")
    args = parser.parse_args()
    if args.table:
        print(table(args.run))
    else:
        sweep(args.run, args.tile, args.tta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
