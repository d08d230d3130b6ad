"""A second look at boundary scores: boundary precision / recall / F at a tolerance, and how fragmented the maps are.

    python scripts/experiments/boundary_check.py --data data/dubai_half --split test \\
        coarse=data/dubai_half/coarse/bench_deeplabv3plus refined=runs/timed_fast2/refined/diffusion_deeplabv3plus

The paper's WFm scores dilated boundary *bands* and does not say where a gain comes from: a map can gain by adding
boundary pixels near the true ones (recall) as well as by moving its own onto them (precision). This script counts,
over the split (``idgbr.metrics.BoundaryPR``, which ``idgbr evaluate`` also reports), the boundary pixels of each
map (a pixel whose 4-neighbourhood holds another class; borders with ignore pixels do not count), the share of them
within ``--tolerance`` px of a ground-truth boundary (precision), the share of ground-truth boundary pixels within
that distance of the map's (recall), their harmonic mean (F, as the BF score of Csurka et al., BMVC 2013, pooled
over images), the map's boundary pixels per ground-truth boundary pixel, and its connected components (4-connected,
per class) per ground-truth component. One table for many folders; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check(gt_maps: list[np.ndarray], pred_maps: list[np.ndarray], tolerance: int) -> dict:
    """Pooled boundary precision / recall / F and fragmentation of ``pred_maps`` (``metrics.BoundaryPR``)."""
    from idgbr.metrics import BoundaryPR

    scores = BoundaryPR((tolerance,))
    for gt, pred in zip(gt_maps, pred_maps):
        scores.update(gt, pred)
    result = scores.result()
    return {**result.pop("bf")[str(tolerance)], **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maps", nargs="+", metavar="NAME=FOLDER", help="prediction folders (<stem>.png), named")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--tolerance", type=int, default=3, help="pixels (default 3)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from idgbr.data.dataset import SegmentationDataset
    from idgbr.errors import IdgbrError
    from idgbr.evaluation.evaluate import _find_map, _read_map

    try:
        dataset = SegmentationDataset(args.data, args.split)
        named: dict[str, Path] = {}
        for item in args.maps:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise IdgbrError(f"{item!r}: give each prediction folder as NAME=FOLDER")
            if name in named:
                raise IdgbrError(f"{item!r}: the name {name!r} is given twice; give each folder its own NAME")
            named[name] = Path(folder)
        gt = [dataset.read_mask(stem) for stem in dataset.stems]
        rows = {}
        for name, folder in named.items():
            pred = [_read_map(_find_map(folder, stem, "prediction", str(folder)), dataset.classes.num_classes,
                              dataset.mask_path(stem), mask.shape) for stem, mask in zip(dataset.stems, gt)]
            rows[name] = check(gt, pred, args.tolerance)
    except IdgbrError as exc:
        print(f"boundary_check: {exc}", file=sys.stderr)
        return 2
    t = str(args.tolerance)
    print(f"| map | boundary precision ({t} px) | recall | F | boundary px / GT | components / GT ({len(gt)} images) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['precision']:.1f} | {100 * r['recall']:.1f} | {100 * r['f']:.1f} | "
              f"{r['boundary_ratio']:.2f} | {r['components_ratio']:.1f} |")
    if args.json:
        summary = {"tolerance": args.tolerance, "split": args.split, "rows": rows}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
