"""``idgbr demo [--quick] [--out DIR]``."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("demo", help="run the whole pipeline on the bundled Dubai set and write a report",
                            description=__doc__)
    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    parser.add_argument("--quick", action="store_true", help="a subset and fewer steps (about 3 minutes on 2 cores)")
    parser.add_argument("--source", default=None, help="raw Dubai folder (default: ../shared/data/dubai_aerial)")
    parser.add_argument("--coarse-folds", type=int, default=0, metavar="K",
                        help="train the refiner on out-of-fold coarse train maps from K >= 2 fold models "
                             "(default 0: in-sample maps of the coarse model)")
    parser.add_argument("--train-minutes", type=float, default=None, metavar="M",
                        help="stop the refiner's training after M minutes, or at its steps if sooner")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.coarse_folds = args.coarse_folds
    settings.train_minutes = args.train_minutes
    run_demo(args.out, quick=args.quick, source=args.source, settings=settings)
    return 0
