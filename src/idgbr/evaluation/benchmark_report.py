"""The benchmark's report: ``report.json`` and ``report.md`` (tables, charts) and the verdict lines against issue 11's
targets.
"""

from __future__ import annotations

import json
from pathlib import Path


# Issue 11's targets for the refined map against its coarse map (points; IoU_RTm as a fraction).
TARGETS = {"wfm3": 2.0, "miou": -0.3, "iou_rtm": 0.97}


def verdict_lines(report: dict) -> list[str]:
    """The first lines of report.md: per coarse model, the refiner against the coarse map, the targets and the
    deterministic control, in words, so that a miss is never below the fold."""
    lines = [f"Targets: WFm(3px) >= coarse {TARGETS['wfm3']:+.1f}, mIoU >= coarse {TARGETS['miou']:+.1f} points, "
             f"IoU_RTm >= {TARGETS['iou_rtm']:.2f}.", ""]
    for entry in report["results"]:
        coarse, refined = entry["coarse"], entry["refined"]
        gain = 100 * (refined["wfm"]["3"] - coarse["wfm"]["3"])
        dmiou = 100 * (refined["miou"] - coarse["miou"])
        rtm = entry.get("repair", {}).get("iou_rtm")
        met = [gain >= TARGETS["wfm3"], dmiou >= TARGETS["miou"], rtm is not None and rtm >= TARGETS["iou_rtm"]]
        track = f" (track `{entry['coarse_maps']}`)" if entry.get("coarse_maps") else ""
        text = (f"- **{entry['coarse_arch']}{track}**: WFm(3px) {gain:+.2f}, mIoU {dmiou:+.2f}, IoU_RTm "
                f"{'n/a' if rtm is None else f'{rtm:.3f}'}: targets {'met' if all(met) else 'NOT met'}")
        det = entry.get("controls", {}).get("deterministic")
        if det:
            det_gain = 100 * (det["wfm"]["3"] - coarse["wfm"]["3"])
            text += (f"; {'beats' if gain > det_gain else 'does NOT beat'} the deterministic control "
                     f"(WFm(3px) {det_gain:+.2f})")
        if "bf" in refined and "bf" in coarse:  # the second look (metrics.BoundaryPR)
            text += (f". Boundary F(3px) {100 * (refined['bf']['3']['f'] - coarse['bf']['3']['f']):+.2f} (precision "
                     f"{100 * (refined['bf']['3']['precision'] - coarse['bf']['3']['precision']):+.2f}); connected "
                     f"components per ground-truth one {coarse['components_ratio']:.1f} -> "
                     f"{refined['components_ratio']:.1f}")
        if "unsieved" in entry:
            raw = entry["unsieved"]
            text += (f" (sieve {entry['settings']['sieve']} px; unsieved: WFm(3px) "
                     f"{100 * (raw['wfm']['3'] - coarse['wfm']['3']):+.2f}, mIoU {100 * (raw['miou'] - coarse['miou']):+.2f}"
                     + (f", components {raw['components_ratio']:.1f}" if "components_ratio" in raw else "") + ")")
        lines.append(text + ".")
    return lines


def write_reports(run: Path, report: dict) -> None:
    from ..data.io import atomic_path
    from .report import bar_chart, flat_metrics, metrics_table

    with atomic_path(run / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    lines = ["# Benchmark", "", *verdict_lines(report), ""]
    if "wall_seconds" in report:  # stages reused from an earlier run count as their recorded seconds, not here
        threads = report.get("side_by_side_threads")
        lines += [f"Wall time of this run: {report['wall_seconds'] / 60:.1f} min"
                  + (f" (training side by side: 2 processes x {threads} thread(s), so the stage seconds below add up to "
                     "more)" if threads else "") + ".", ""]
    for entry in report["results"]:
        arch = entry["coarse_arch"]
        rows = {f"coarse ({arch})": entry["coarse"], "IDGBR refined": entry["refined"]}
        gate = entry.get("settings", {}).get("gate_width")
        if "gated" in entry:
            rows[f"IDGBR refined, gated {gate} px"] = entry["gated"]
        if "unsieved" in entry:
            rows["IDGBR refined, unsieved"] = entry["unsieved"]
        for name, result in entry.get("controls", {}).items():
            label = name.replace("_gated", f", gated {gate} px").replace("_unsieved", ", unsieved").replace("_", " ")
            rows[f"control: {label}"] = result
        track = entry.get("coarse_maps")
        lines += [f"## Coarse model: {arch}" + (f" (coarse track `{track}`)" if track else ""), ""]
        if track:
            lines += [f"Coarse maps made beforehand: `{entry.get('coarse_provenance')}`.", ""]
        lines += [metrics_table(rows), ""]
        if "coarse_train" in entry:
            folds = entry.get("coarse_folds", 0)
            group = entry.get("coarse_fold_group")
            kind = (f"out-of-fold, {folds} folds" + (f" grouped by {group!r}" if group else "") if folds
                    else "in-sample: the coarse model trained on these images")
            train, test = entry["coarse_train"], entry["coarse"]
            share = entry.get("coarse_corruption", 0.0)
            pool = entry.get("refiner_pool")
            head = ("The refiner trains on synthetic degradations of the ground truth only (coarse_corruption 1), "
                    "never on a coarse model's maps. The coarse model's train-split maps" if share >= 1 else
                    f"One refiner trains on the train-split maps of {', '.join(f'`{t}`' for t in pool)}, pooled "
                    f"({100 * (1 - share):.0f} % of its samples; the rest are synthetic degradations of the ground "
                    "truth). This coarse model's train-split maps" if pool else
                    f"Coarse maps the refiner trains on ({100 * (1 - share):.0f} % of its samples; the rest are "
                    "synthetic degradations of the ground truth)")
            lines += [f"{head} (train split, {kind}): mIoU {100 * train['miou']:.2f}, "
                      f"WFm(3px) {100 * train['wfm']['3']:.2f}; on test: mIoU {100 * test['miou']:.2f}, "
                      f"WFm(3px) {100 * test['wfm']['3']:.2f}.", ""]
        gain = entry["refined"]["wfm"]["3"] - entry["coarse"]["wfm"]["3"]
        dmiou = entry["refined"]["miou"] - entry["coarse"]["miou"]
        verdict = "beats" if gain > 0 else "does NOT beat"
        lines.append(f"Refinement {verdict} the coarse map on WFm(3px): {100 * gain:+.2f} points; "
                     f"mIoU {100 * dmiou:+.2f} points.")
        for name, result in rows.items():
            if "gated" in name or "deterministic" in name or "unsieved" in name:
                lines.append(f"\n{name}: WFm(3px) {100 * (result['wfm']['3'] - entry['coarse']['wfm']['3']):+.2f} "
                             f"points, mIoU {100 * (result['miou'] - entry['coarse']['miou']):+.2f} points vs coarse.")
        if entry.get("repair"):
            lines.append(f"\nRepair analysis: `{json.dumps(entry['repair'])[:600]}`")
        chart = bar_chart(run / f"bench_{Path(track).name if track else arch}.png", {k: flat_metrics(v) for k, v in rows.items()},
                          ["miou", "mf1", "wfm1", "wfm3", "wfm5"], f"coarse = {arch}")
        lines += ["", f"![{arch}]({chart.name})", "", "Seconds per stage: " +
                  ", ".join(f"{k} {v:.0f}" for k, v in entry.get("seconds", {}).items()), ""]
    with atomic_path(run / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
