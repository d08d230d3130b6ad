"""``idgbr prepare NAME RAW OUT`` (or ``... RAW --out OUT``): convert a dataset to the canonical layout (see :mod:`idgbr.data.prepare`)."""

from __future__ import annotations

import argparse
from typing import Iterable


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..data.prepare import CONVERTERS

    parser = subparsers.add_parser(
        "prepare", help="convert a dataset to the canonical layout",
        description="Convert a dataset from the layout it is distributed in to DATA/{images,masks,classes.json,splits}. "
                    f"Datasets: {', '.join(CONVERTERS)}. Options apply only to the converters that list them.",
    )
    parser.add_argument("name", metavar="NAME", help=f"one of: {', '.join(CONVERTERS)}")
    parser.add_argument("raw", metavar="RAW", help="the dataset folder as distributed")
    parser.add_argument("out", metavar="OUT", nargs="?", default=None, help="output folder (new or empty)")
    parser.add_argument("--out", dest="out_option", metavar="OUT", default=None,
                        help="the output folder, as an alternative to the positional OUT (give one of the two)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared in OUT")
    parser.add_argument("--bands", choices=("rgb", "irrg", "rgbir"), help="potsdam: which orthophotos (default irrg)")
    parser.add_argument("--patch-size", type=int, help="potsdam, vaihingen, whu-building: crop size (default 512)")
    parser.add_argument("--stride", type=int, help="potsdam, vaihingen, whu-building: crop stride (default: patch size)")
    parser.add_argument("--labels", help="potsdam, vaihingen: label folder name inside RAW (default: autodetect)")
    parser.add_argument("--phase", choices=("2012", "2016", "both"), help="whu-building: which phase (default both)")
    parser.add_argument("--images", help="folder: image folder (default RAW/images)")
    parser.add_argument("--masks", help="folder: mask folder (default RAW/masks)")
    parser.add_argument("--palette", help="folder: classes.json-style file mapping mask values/colours to classes")
    parser.add_argument("--splits", help="folder: folder with train/val/test.txt (default: 80/20 by stem)")
    parser.add_argument("--seed", type=int, help="chn6-cug, fgfd, whu-building, folder: split seed (default 0)")
    parser.add_argument("--scale", type=float, help="dubai: downsample factor in (0, 1] (default 1; 0.5 for CPU runs)")
    parser.set_defaults(func=run)


def _tqdm_progress(items: Iterable, total: int, desc: str) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="file", disable=None, leave=False)


def output_folder(args: argparse.Namespace) -> str:
    """OUT from the positional argument or ``--out``; exactly one must be given."""
    from ..errors import IdgbrError

    if args.out is not None and args.out_option is not None:
        raise IdgbrError(f"give the output folder once: positional OUT {args.out!r} or --out {args.out_option!r}, not both")
    if args.out is None and args.out_option is None:
        raise IdgbrError("no output folder; give OUT after RAW or --out OUT")
    return args.out if args.out is not None else args.out_option


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare

    out = output_folder(args)
    options = {key: getattr(args, key) for key in ("bands", "patch_size", "stride", "labels", "phase", "images",
                                                   "masks", "palette", "splits", "seed", "scale")}
    summary = prepare(args.name, args.raw, out, overwrite=args.overwrite, progress=_tqdm_progress, **options)
    counts = ", ".join(f"{split} {count}" for split, count in summary["splits"].items())
    print(f"prepared {summary['name']} in {summary['out']}: {counts} "
          f"({len(summary['classes'])} classes, {summary['seconds']:.1f} s)")
    for note in summary.get("notes", []):
        print(f"note: {note}")
    return 0
