"""``idgbr build-models``: rebuild the shipped models and their model cards (see
:mod:`idgbr.evaluation.build_models`; formerly ``scripts/build_models.py``)."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser(
        "build-models", help="rebuild the shipped models and their model cards from the repository's Dubai data",
        description="Rebuild the shipped models (src/idgbr/models/) from the repository's Dubai data, with their "
                    "model cards (run it in a source checkout).")
    parser.add_argument("--work", default="runs/build_models", help="work folder (default: runs/build_models)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per step (default: torch's)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.build_models import run as run_build_models

    return run_build_models(args)
