"""``idgbr demo [--train] [--out DIR]``."""

from __future__ import annotations

from ..nn.device import add_device_argument


def register(sub) -> None:
    parser = sub.add_parser(
        "demo", help="refine the Dubai test tiles with the shipped models and write a report (about 2 minutes)",
        description="Refine the Dubai test tiles (carried in the repository) with the shipped coarse model and lite "
                    "refiner, evaluate coarse vs refined, and write DIR/report.md with pictures (about 2 minutes on "
                    "2 CPU cores). --train runs the full protocol from scratch instead: it trains a coarse model and "
                    "the lite refiner first (about 20 minutes on 2 idle CPU cores; see --train).")
    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    parser.add_argument("--train", action="store_true",
                        help="train a coarse model (200 iterations) and the lite refiner (4800 steps) from scratch "
                             "first: "
                             "about 20 minutes on 2 idle CPU cores (19 min 24 s measured with the 2026-11-29 lite "
                             "recipe; the current recipe's refiner alone trained in 14 min), longer on a busy machine")
    parser.add_argument("--source", default=None,
                        help="raw Dubai folder (default: $IDGBR_DUBAI, else the repository's datasets/dubai_aerial)")
    parser.add_argument("--coarse-folds", type=int, default=0, metavar="K",
                        help="with --train: train the refiner on out-of-fold coarse train maps from K >= 2 fold "
                             "models (default 0: in-sample maps of the coarse model)")
    parser.add_argument("--train-minutes", type=float, default=None, metavar="M",
                        help="with --train: stop the refiner's training after M minutes, or at its steps if sooner")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.demo import DemoSettings, run_demo
    from ..errors import IdgbrError

    if not args.train and (args.coarse_folds or args.train_minutes is not None):
        raise IdgbrError("--coarse-folds and --train-minutes shape the training; add --train (the default demo "
                         "uses the shipped models)")
    settings = DemoSettings(coarse_folds=args.coarse_folds, train_minutes=args.train_minutes, device=args.device)
    run_demo(args.out, train=args.train, source=args.source, settings=settings)
    return 0
