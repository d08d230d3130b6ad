"""``idgbr gpu-check``: training and inference throughput in one table (see :mod:`idgbr.evaluation.gpu_check`;
formerly ``scripts/gpu_check.py``; ``scripts/gpu_check.sh`` runs it on a lent GPU machine)."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser(
        "gpu-check", help="training and inference throughput on a GPU machine, in one table",
        description="Throughput on a GPU machine, in one table: idgbr gpu-check --out RESULTS.md (see "
                    "scripts/gpu_check.sh). --smoke runs every stage with tiny sizes (a check, not a measurement).")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 1-2 steps of everything")
    parser.add_argument("--out", default=None, help="also write the table here (rewritten after every row)")
    parser.add_argument("--budget-min", type=float, default=7.0, help="start no new stage after this many minutes")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is a GPU, else cpu)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.gpu_check import run as run_gpu_check

    return run_gpu_check(args)
