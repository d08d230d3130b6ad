"""Issue 28's test table: six Dubai coarse maps, the refiner and its deterministic control, three inference settings,
seeds averaged (docs/results/strong_maps.md, section 4).

    python scripts/experiments/six_tracks.py runs/t28b_s0 runs/t28b_s1
    python scripts/experiments/six_tracks.py runs/t30_s0 runs/t30_s1   # t28b's models at the class reach 8

Each run folder holds the reports of ``idgbr benchmark`` (the cheap coarse models, then the four committed tracks
with the same refiners): ``report_cheap.json`` / ``report_tracks.json`` at the lite settings until issue 28 (sieve 6)
and ``report_cheap_area.json`` / ``report_tracks_area.json`` at the new ones (``--area-match 1 --flip-margin 0.05
--sieve 0``); ``report_*_reach.json`` (runs/t30_s*: the same trained models, refined again at the class reach 8,
the lite default since). Cells: ΔWFm3 / ΔmIoU / IoU_RTm of the refiner, then ΔWFm3 / ΔmIoU of the control, against
the coarse map.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ORDER = ["deeplabv3plus", "unet", "deeplabv3plus_converged", "unet_converged", "deeplabv3plus_pretrained",
         "unet_pretrained"]
KIND = {"deeplabv3plus": "weak", "unet": "weak", "deeplabv3plus_converged": "medium", "unet_converged": "medium",
        "deeplabv3plus_pretrained": "strong", "unet_pretrained": "strong"}


def cells(entry: dict) -> tuple[float, ...]:
    coarse, refined = entry["coarse"], entry["refined"]
    control = entry.get("controls", {}).get("deterministic") or {}
    rtm = entry.get("repair", {}).get("iou_rtm")
    return (100 * (refined["wfm"]["3"] - coarse["wfm"]["3"]), 100 * (refined["miou"] - coarse["miou"]),
            100 * rtm if rtm is not None else float("nan"),
            100 * (control["wfm"]["3"] - coarse["wfm"]["3"]) if control else float("nan"),
            100 * (control["miou"] - coarse["miou"]) if control else float("nan"))


def track_name(entry: dict) -> str:
    maps = entry.get("coarse_maps")
    return Path(maps).name if maps else entry["coarse_arch"]


def load(run: Path, suffix: str) -> dict[str, tuple[float, ...]]:
    out = {}
    for part in ("cheap", "tracks"):
        path = run / f"report_{part}{suffix}.json"
        if path.exists():
            for entry in json.loads(path.read_text())["results"]:
                out[track_name(entry)] = cells(entry)
    return out


def main() -> int:
    runs = [Path(p) for p in sys.argv[1:]]
    for title, suffix in (("lite until issue 28 (sieve 6)", ""), ("area match 1, flip margin 0.05, no sieve", "_area"),
                          ("class reach 8 (no area match, no flip margin, no sieve)", "_reach")):
        per_run = [load(run, suffix) for run in runs]
        if not any(per_run):  # (runs/t30_s*: only the class-reach reports)
            continue
        print(f"\n{title} ({', '.join(r.name for r in runs)})\n")
        print("| coarse maps | kind | refiner ΔWFm3 / ΔmIoU / IoU_RTm | control ΔWFm3 / ΔmIoU | seeds (refiner ΔWFm3) |")
        print("|---|---|---|---|---|")
        means = []
        for track in ORDER:
            values = [r[track] for r in per_run if track in r]
            if not values:
                continue
            m = [statistics.mean(v[i] for v in values) for i in range(5)]
            means.append(m)
            seeds = ", ".join(f"{v[0]:+.2f}" for v in values)
            print(f"| {track} | {KIND[track]} | {m[0]:+.2f} / {m[1]:+.2f} / {m[2]:.1f} | {m[3]:+.2f} / {m[4]:+.2f} | "
                  f"{seeds} |")
        if means:
            avg = [statistics.mean(m[i] for m in means) for i in range(5)]
            print(f"| mean of {len(means)} | | {avg[0]:+.2f} / {avg[1]:+.2f} / {avg[2]:.1f} | {avg[3]:+.2f} / "
                  f"{avg[4]:+.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
