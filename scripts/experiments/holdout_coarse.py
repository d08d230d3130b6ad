"""Train one coarse model on the train split minus held-out stems and score it on them (validation, never test).

    python scripts/experiments/holdout_coarse.py --data data/dubai_half --holdout tile6 --arch deeplabv3plus \
        --encoder tu-tf_efficientnet_lite0 --encoder-weights imagenet --out runs/holdout/dlv3p_lite0

Writes the run folder (``idgbr train-coarse`` layout; ``training.json`` holds the validation score, the held-out
stems and the wall time) and prints one JSON line. The held-out stems are the train stems matching ``--holdout``
(a regular expression; ``tile6`` is the source tile used for validation in docs/results/refiner_ablation.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from idgbr.training.coarse import train_coarse
from idgbr.data.dataset import SegmentationDataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--holdout", required=True, metavar="REGEX", help="train stems to hold out, e.g. tile6")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--encoder-weights", default=None)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    stems = SegmentationDataset(args.data, "train", load_mask=False).stems
    held = [s for s in stems if re.search(args.holdout, s)]
    if not held or len(held) == len(stems):
        parser.error(f"--holdout {args.holdout!r} matches {len(held)} of {len(stems)} train stems; hold out some, not all")
    train_coarse(args.data, args.arch, args.out, iters=args.iters, batch=args.batch, crop=args.crop,
                 encoder=args.encoder, encoder_weights=args.encoder_weights, seed=args.seed, progress=False,
                 stems=[s for s in stems if s not in held], val_stems=held, val_every=args.iters)
    record = json.loads((Path(args.out) / "training.json").read_text())
    print(json.dumps({"out": args.out, "arch": record["arch"], "encoder": record["encoder"],
                      "encoder_weights": record["encoder_weights"], "held_out": args.holdout,
                      "validation": record["validation"][-1], "seconds": record["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
