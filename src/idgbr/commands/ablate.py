"""``idgbr ablate``: ablation rows for the refiner on a validation subset of the train split (see
:mod:`idgbr.evaluation.ablation`; formerly ``scripts/ablate_refiner.py``)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "ablate", help="ablation rows for the refiner on a validation subset of the train split",
        description="Ablation rows for the refiner on a validation subset of the train split (never the test split).")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME:TRAIN_OVERRIDES[;INFER_OVERRIDES]")
    parser.add_argument("--every", type=int, default=6, help="hold out every n-th train stem for validation (default 6)")
    parser.add_argument("--holdout", default=None, metavar="REGEX",
                        help="hold out the train stems matching REGEX instead (e.g. 'tile6': a whole source tile, as the "
                             "test split holds out tiles 7-8)")
    parser.add_argument("--fold-group", default=None, metavar="REGEX", help="keep stems with the same match in one fold")
    parser.add_argument("--arch", default="deeplabv3plus")
    parser.add_argument("--coarse-iters", type=int, default=200)
    parser.add_argument("--folds", type=int, default=0, help="out-of-fold coarse maps for training (0: in-sample)")
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coarse-maps", type=Path, default=None, metavar="DIR",
                        help="use a complete coarse track (maps for every train stem, e.g. fixtures/coarse/dubai_half/"
                             "*_converged) for training and validation instead of training a coarse model; its train "
                             "maps are out-of-fold, so the held-out stems' maps never saw their labels")
    parser.add_argument("--train-maps", type=Path, action="append", default=[], metavar="DIR",
                        help="train on these complete coarse tracks' train maps, pooled (real errors; repeatable), "
                             "instead of the --coarse-maps track's; with coarse_corruption < 1 in the variant")
    parser.add_argument("--eval-maps", type=Path, action="append", default=[], metavar="DIR",
                        help="also score every variant on these complete tracks' held-out maps (repeatable); rows are "
                             "named VARIANT@TRACK")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.ablation import run as run_ablation

    return run_ablation(args)
