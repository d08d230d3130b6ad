"""``idgbr demo [--quick] [--out DIR]``."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("demo", help="run the whole pipeline on the bundled Dubai set and write a report",
                            description=__doc__)
    parser.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    parser.add_argument("--quick", action="store_true", help="a subset and fewer steps (about 3 minutes on 2 cores)")
    parser.add_argument("--source", default=None, help="raw Dubai folder (default: ../shared/data/dubai_aerial)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, source=args.source)
    return 0
