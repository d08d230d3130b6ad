"""The ``idgbr`` command line: a thin layer over importable functions.

Each sub-command lives in ``idgbr/commands/<module>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed arguments. User errors (:class:`IdgbrError`) print one
line and exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from ..errors import IdgbrError

# Order here is the order in `idgbr --help`.
COMMAND_MODULES = (
    "prepare",
    "coarse",        # train-coarse, predict-coarse
    "embed",         # train-embed
    "train",         # train
    "refine",        # refine
    "archive",       # refine-archive
    "evaluate",      # evaluate
    "demo",          # demo
    "benchmark",     # benchmark
    "bench_speed",   # bench-speed
    "analyze",       # analyze frequency|wiener
    "ablate",        # ablate (formerly scripts/ablate_refiner.py)
    "build_models",  # build-models (formerly scripts/build_models.py)
    "gpu_check",     # gpu-check (formerly scripts/gpu_check.py)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idgbr", description="Diffusion-based boundary refinement of segmentation maps.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"idgbr {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"idgbr.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"idgbr.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idgbr")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "idgbr " + " ".join(shlex.quote(str(arg)) for arg in argv)  # for provenance records
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "device", None) is not None:  # a device this host lacks fails before anything is written
            from ..nn.device import resolve_device

            resolve_device(args.device)
        result = args.func(args)
        return int(result or 0)
    except IdgbrError as exc:
        if debug:
            raise
        print(f"idgbr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("idgbr: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("idgbr: error: out of memory; use a smaller --tile or --batch", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if debug:
            raise
        print(f"idgbr: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(rerun with --debug for the traceback and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
