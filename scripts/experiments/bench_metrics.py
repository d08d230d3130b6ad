"""Time ``idgbr.metrics.evaluate_maps`` on synthetic 512x512 maps (the issue's target: 100 maps, WFm at 1/3/5 px,
in <= 10 s on 2 cores).

    python scripts/experiments/bench_metrics.py [--n 100] [--size 512] [--classes 6] [--coarse]

The ground truths are smooth random multi-class scenes; the predictions are the ground truths with shifted,
eroded and noisy boundaries and a few blobs of wrong class, so the boundary bands differ the way a real
prediction's do. Map generation is not timed.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from idgbr.metrics import evaluate_maps


def synthetic_pair(rng: np.random.Generator, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random (gt, pred) pair of uint8 index maps."""
    field = rng.random((classes, size // 16, size // 16)).astype(np.float32)
    field = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in field])
    gt = field.argmax(0).astype(np.uint8)
    noise = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 3) * 0.15
    pred = (field + noise[None] * rng.random((classes, 1, 1), dtype=np.float32)).argmax(0).astype(np.uint8)
    for _ in range(5):  # wrong-class blobs
        y, x = rng.integers(0, size, 2)
        cv2.circle(pred, (int(x), int(y)), int(rng.integers(4, 20)), int(rng.integers(0, classes)), -1)
    return gt, pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--coarse", action="store_true", help="also score coarse maps and the repair analysis")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    items = []
    for _ in range(args.n):
        gt, pred = synthetic_pair(rng, args.size, args.classes)
        if args.coarse:
            items.append((gt, pred, synthetic_pair(rng, args.size, args.classes)[1]))
        else:
            items.append((gt, pred))
    start, cpu_start = time.perf_counter(), time.process_time()
    result = evaluate_maps(items, args.classes, tolerances=(1, 3, 5))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    wfm = ", ".join(f"{t}px {v:.4f}" for t, v in result["wfm"].items())
    print(f"{args.n} maps of {args.size}x{args.size}, {args.classes} classes, WFm at 1/3/5 px"
          f"{' + coarse + repair' if args.coarse else ''}: {elapsed:.2f} s wall ({elapsed / args.n * 1000:.1f} ms/map), "
          f"{cpu:.2f} s CPU")
    try:
        print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    except OSError:
        pass
    print(f"mIoU {result['miou']:.4f}  mF1 {result['mf1']:.4f}  OA {result['oa']:.4f}  Kappa {result['kappa']:.4f}  "
          f"WFm {wfm}")


if __name__ == "__main__":
    main()
