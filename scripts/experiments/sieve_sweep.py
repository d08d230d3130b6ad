"""Score refined validation maps under several sieve sizes (idgbr.inference.postprocess): ΔWFm3 / ΔmIoU / IoU_RTm against the
coarse map, and connected components per ground-truth one relative to the coarse map's.

Reads the output folders of ``idgbr ablate`` (OUT/data with the held-out tile as its test split and
the coarse maps under data/coarse/val_coarse; OUT/pred/<variant> with the refined maps)::

    python scripts/experiments/sieve_sweep.py --sizes 0,2,4,5,6,8 --out runs/sieve_sweep.json runs/pr_cheap_ft0 runs/pr_m_ft0 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idgbr.evaluation.evaluate import evaluate_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="ablate_refiner.py output folders")
    parser.add_argument("--sizes", default="0,2,4,5,6,8", help="sieve sizes in pixels (0: off)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the scores")
    args = parser.parse_args()
    scores = {}
    for run in args.runs:
        data, coarse = run / "data", run / "data" / "coarse" / "val_coarse"
        base = evaluate_folder(data, coarse, "test", progress=False)
        for pred in sorted((run / "pred").iterdir()):
            for size in (int(s) for s in args.sizes.split(",")):
                r = evaluate_folder(data, pred, "test", coarse_dir=coarse, progress=False, sieve=size)
                row = {"dwfm3": 100 * (r["wfm"]["3"] - base["wfm"]["3"]), "dmiou": 100 * (r["miou"] - base["miou"]),
                       "iou_rtm": 100 * r["repair"]["iou_rtm"],
                       "components_vs_coarse": r["components_ratio"] / base["components_ratio"]}
                scores[f"{run.name}/{pred.name}/{size}"] = row
                print(f"{run.name} {pred.name} sieve {size}: ΔWFm3 {row['dwfm3']:+.2f} ΔmIoU {row['dmiou']:+.2f} "
                      f"IoU_RTm {row['iou_rtm']:.1f} components {row['components_vs_coarse']:.2f}x coarse", flush=True)
    args.out.write_text(json.dumps(scores, indent=1) + "\n")


if __name__ == "__main__":
    main()
