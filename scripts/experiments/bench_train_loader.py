"""Training steps/s with the batches drawn in the prefetch thread (loader_workers 0) or in N DataLoader workers.

    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/experiments/bench_train_loader.py DATA --workers 0 2 \
        --preset lite --steps 100 --out /tmp/loader_bench

Runs ``idgbr.training.loop.train_refiner`` once per worker count, in the order given (repeat counts to interleave A/B),
with one shared label embedding; s/step is the TensorBoard wall time between the step-10 and the last loss
scalar, over the steps between them (start-up, worker start and the first steps excluded). Prints one JSON line
per run (with the 1-minute load average at its start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def seconds_per_step(run: Path) -> tuple[float, int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "logs").rglob("events.out.tfevents*")))).Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.endswith("loss"))
    scalars = events.Scalars(tag)
    first, last = scalars[0], scalars[-1]
    return (last.wall_time - first.wall_time) / (last.step - first.step), last.step, last.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--coarse", default=None)
    parser.add_argument("--out", default="/tmp/loader_bench")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()

    import torch

    from idgbr.nn.config import RefinerConfig, parse_overrides
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.nn.labelembed import train_label_embedding
    from idgbr.training.loop import train_refiner

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    config = RefinerConfig.preset_config(args.preset, steps=args.steps, checkpoint_every=10 ** 6,
                                         **parse_overrides(args.overrides))
    embed = out / "label_embed"
    if not (embed / "config.json").exists():
        classes = SegmentationDataset(args.data, "train").classes.num_classes
        train_label_embedding(classes, config.embed_steps, config.embed_noise_std, hidden=config.embed_hidden,
                              seed=0, progress=False).save_pretrained(embed)
    for n, workers in enumerate(args.workers):
        run = out / f"run{n}_w{workers}"
        shutil.rmtree(run, ignore_errors=True)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        train_refiner(config.replace(loader_workers=workers, label_embed=str(embed)), args.data, args.coarse, run,
                      progress=False, log_every=10)
        wall = time.perf_counter() - start
        s_step, last_step, loss = seconds_per_step(run)
        print(json.dumps({"workers": workers, "preset": args.preset, "steps": last_step, "s_per_step": round(s_step, 4),
                          "steps_per_s": round(1 / s_step, 3), "wall_s": round(wall, 1), "load": round(load, 2),
                          "loss_last": round(loss, 4)}), flush=True)


if __name__ == "__main__":
    main()
