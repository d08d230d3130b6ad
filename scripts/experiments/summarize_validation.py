"""One table from several ``idgbr ablate`` runs: ΔWFm3 / ΔmIoU / IoU_RTm per variant, seed and track,
seed means, and the same maps scored with a sieve (post-processing: no retraining).

    python scripts/experiments/summarize_validation.py runs/v28_base_s0 runs/v28_base_s1 runs/v28_real_s0 runs/v28_real_s1 \\
        --sieve 6 --out docs/results/real_errors_validation.md

Each run folder holds ``ablation.json`` (rows ``NAME_sK`` and ``NAME_sK@TRACK``) and ``pred/<row>/``; the variant is
the row name without its ``_sK`` seed suffix. The first track is the one given to ablate_refiner as --coarse-maps.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--first-track", default="deeplabv3plus_pretrained",
                        help="the name of the track of rows without @TRACK (ablate_refiner's --coarse-maps)")
    parser.add_argument("--sieve", type=int, default=0, help="also score the maps sieved to this many px (0: no)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from idgbr.evaluation.evaluate import evaluate_folder

    cells: dict[tuple[str, str], list[dict]] = {}
    for run in args.runs:
        view = run / "data"
        for row, record in json.loads((run / "ablation.json").read_text()).items():
            match = re.fullmatch(r"(.+)_s(\d+)(?:@(.+))?", row)
            if match is None:
                continue
            variant, seed, track = match.group(1), int(match.group(2)), match.group(3) or args.first_track
            coarse_name = "val_coarse" if match.group(3) is None else f"trk_{track}"
            entry = {"seed": seed}
            for sieve in sorted({0, args.sieve}):
                result = evaluate_folder(view, run / "pred" / row, "test", coarse_dir=view / "coarse" / coarse_name,
                                         sieve=sieve, progress=False)
                coarse = result["coarse"]
                entry[sieve] = {"dwfm3": 100 * (result["wfm"]["3"] - coarse["wfm"]["3"]),
                                "dmiou": 100 * (result["miou"] - coarse["miou"]),
                                "rtm": 100 * result["repair"]["iou_rtm"],
                                "components": result["components"] / max(coarse["components"], 1e-9)}
            cells.setdefault((variant, track), []).append(entry)
    tracks = sorted({t for _, t in cells}, key=lambda t: ("pretrained" not in t, t))
    variants = list(dict.fromkeys(v for v, _ in cells))
    lines = []
    for sieve in sorted({0, args.sieve}):
        lines += [f"### {'unsieved' if not sieve else f'sieved to {sieve} px'}", "",
                  "cells: ΔWFm3 / ΔmIoU / IoU_RTm / components vs coarse (seed mean; seeds in brackets: ΔWFm3)", "",
                  "| variant | " + " | ".join(tracks) + " | mean ΔWFm3 / ΔmIoU | strong mean ΔWFm3 / ΔmIoU |",
                  "|---|" + "---|" * (len(tracks) + 2)]
        for variant in variants:
            row, means, strong = [], [], []
            for track in tracks:
                entries = sorted(cells.get((variant, track), []), key=lambda e: e["seed"])
                if not entries:
                    row.append("")
                    continue
                m = {k: statistics.mean(e[sieve][k] for e in entries) for k in ("dwfm3", "dmiou", "rtm", "components")}
                seeds = ", ".join(f"{e[sieve]['dwfm3']:+.2f}" for e in entries)
                row.append(f"{m['dwfm3']:+.2f} / {m['dmiou']:+.2f} / {m['rtm']:.1f} / {m['components']:.2f}x ({seeds})")
                means.append(m)
                if "pretrained" in track:
                    strong.append(m)

            def avg(items):
                return (f"{statistics.mean(i['dwfm3'] for i in items):+.2f} / "
                        f"{statistics.mean(i['dmiou'] for i in items):+.2f}") if items else ""

            lines.append(f"| {variant} | " + " | ".join(row) + f" | {avg(means)} | {avg(strong)} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
