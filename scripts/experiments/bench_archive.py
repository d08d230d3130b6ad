"""Benchmark ``idgbr refine-archive``: one worker with all the threads against several workers with fewer.

    .venv/bin/python scripts/experiments/bench_archive.py --scenes 8 --size 2000 --out /tmp/bench_archive       # the measured run
    .venv/bin/python scripts/experiments/bench_archive.py --scenes 2 --size 256 --out /tmp/bench_archive_smoke  # a smoke test

Writes ``--scenes`` synthetic 3-band GeoTIFF scenes of ``--size``² px and their coarse maps (the mosaics of
``scripts/experiments/bench_scene.py``, one seed per scene, 5 classes: the shipped refiner fits), then runs the command once per
configuration ``WxT`` (``--configs 1x2 2x1``: W local workers with T torch threads each), every run in a fresh
process and a fresh output folder, with the shipped refiner unless ``--model RUN``. From each run's
``manifest.json`` (every scene's worker pid, task start/finish, refine seconds, model-load seconds and peak RSS) and
the time the driver received each result it reports:

* ``wall``: the whole command, process start to exit (imports, cluster start-up, the scenes, shutdown);
* ``start-up``: process start to the submission of the scenes (imports, the local cluster);
* ``span``: submission to the last result received;
* ``peak RSS``: the largest ``ru_maxrss`` each worker process reported (MB);
* ``overhead/scene``: the scheduler's share per scene: the time a worker waited for its next scene (after
  submission, or after finishing its previous one) plus the time a finished result took to reach the driver;
* ``overhead %``: the overhead summed over scenes, divided by the workers, as a share of ``wall``;
* ``maps equal``: whether each run's maps are pixel-equal to the first configuration's.

The table is printed and written to ``<out>/bench_archive.md`` and ``<out>/bench_archive.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_scenes(root: Path, count: int, size: int) -> tuple[Path, Path]:
    """``root/scenes/scene_<i>.tif`` and ``root/coarse/scene_<i>.tif``, one mosaic seed per scene (kept between runs)."""
    from bench_scene import write_scene

    scenes, coarse = root / "scenes", root / "coarse"
    scenes.mkdir(parents=True, exist_ok=True)
    coarse.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        target = scenes / f"scene_{index}.tif"
        if target.exists() and (coarse / target.name).exists():
            continue
        work = root / "work" / str(index)
        work.mkdir(parents=True, exist_ok=True)
        image, labels = write_scene(work, size, seed=index)
        shutil.move(image, target)
        shutil.move(labels, coarse / target.name)
    shutil.rmtree(root / "work", ignore_errors=True)
    return scenes, coarse


def run_config(scenes: Path, coarse: Path, out: Path, workers: int, threads: int, model: str | None,
               extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "idgbr", "refine-archive", str(scenes), str(coarse), str(out), "--workers",
               str(workers), "--threads", str(threads), "--no-progress", *extra]
    if model:
        command += ["--model", model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    begin = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - begin
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    entries = list(manifest["scenes"].values())
    submitted = min(e["submitted"] for e in entries)
    by_worker: dict[int, list[dict]] = {}
    for entry in entries:
        by_worker.setdefault(entry["pid"], []).append(entry)
    overhead = 0.0
    for tasks in by_worker.values():
        previous = submitted
        for task in sorted(tasks, key=lambda e: e["started"]):
            overhead += max(0.0, task["started"] - previous) + max(0.0, task["received"] - task["finished"])
            previous = task["finished"]
    span = max(e["received"] for e in entries) - submitted
    return {"config": f"{workers}x{threads}", "workers": workers, "threads": threads, "scenes": len(entries),
            "wall_s": wall, "startup_s": submitted - begin, "span_s": span,
            "refine_s": sum(e["seconds"] for e in entries), "load_s": sum(e.get("load_seconds", 0.0) for e in entries),
            "workers_used": len(by_worker),
            "peak_rss_mb": {str(pid): max(t["peak_rss_mb"] for t in tasks) for pid, tasks in by_worker.items()},
            "overhead_per_scene_s": overhead / len(entries),
            "overhead_fraction": overhead / len(by_worker) / wall, "out": str(out)}


def maps_equal(first: Path, other: Path) -> tuple[bool, int]:
    import rasterio

    differ = 0
    for path in sorted(first.glob("*.tif")):
        with rasterio.open(path) as a, rasterio.open(other / path.name) as b:
            differ += int(np.count_nonzero(a.read(1) != b.read(1)))
    return differ == 0, differ


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| config | wall s | start-up s | span s | scenes/min | peak RSS per worker (MB) | overhead/scene s | "
             "overhead % of wall | maps equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rss = ", ".join(f"{v:.0f}" for v in row["peak_rss_mb"].values())
        equal = "yes" if row["equal"] else f"no ({row['differ']} px)"
        lines.append(f"| {row['workers']} worker(s) x {row['threads']} thread(s) | {row['wall_s']:.1f} | "
                     f"{row['startup_s']:.1f} | {row['span_s']:.1f} | {60 * row['scenes'] / row['wall_s']:.2f} | {rss} | "
                     f"{row['overhead_per_scene_s']:.3f} | {100 * row['overhead_fraction']:.2f} | {equal} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--configs", nargs="+", default=["1x2", "2x1"], help="WxT: W workers with T torch threads")
    parser.add_argument("--model", default=None, help="refiner (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_archive"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more refine-archive options, e.g. -- --steps 2")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    scenes, coarse = write_scenes(args.out / "data", args.scenes, args.size)
    rows = []
    for config in args.configs:
        workers, threads = (int(part) for part in config.lower().split("x"))
        print(f"running {workers} worker(s) x {threads} thread(s) on {args.scenes} scenes of {args.size}² ...", flush=True)
        rows.append(run_config(scenes, coarse, args.out / f"run_{config}", workers, threads, args.model, extra))
    for row in rows:
        row["equal"], row["differ"] = maps_equal(Path(rows[0]["out"]), Path(row["out"]))
    header = (f"{args.scenes} synthetic scenes of {args.size}² px, {args.model or 'the shipped refiner'}, "
              f"{os.cpu_count()} CPU cores{(' , options ' + ' '.join(extra)) if extra else ''}")
    text = table(rows, header)
    print(text)
    (args.out / "bench_archive.md").write_text(text + "\n")
    (args.out / "bench_archive.json").write_text(json.dumps({"header": header, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
