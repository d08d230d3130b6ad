"""Time the fast call against the reference schedule on the same 512² tile, in one process.

    .venv/bin/python scripts/experiments/bench_fast.py [--model RUN] [--data DATA --coarse NAME] [--repeats 3]

Calls ``Refiner.refine(image, coarse, ...)`` on one tile with the reference schedule (25 DDIM steps, CFG 3 = 50
network evaluations), the issue's fast call (``steps=2, strength=0.4, guidance=1``) and the model's default
sampling settings; after one warm-up call each, reports the median seconds of ``--repeats`` calls, the network
evaluations (``refiner.last_nfe``) and the speed-up. Without ``--model`` a lite model with random weights is timed
(the cost does not depend on the weights). The tile is the first 512² crop of the first test image of DATA, or a
synthetic scene without ``--data``. ``--device cuda --dtype fp16`` times a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--preset", default="lite", help="preset of the random-weight model (no --model)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--coarse", default=None)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=(None, "fp16", "bf16"))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from idgbr.nn.config import RefinerConfig
    from idgbr.nn.model import IDGBRModel
    from idgbr.inference.pipeline import Refiner

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    if args.model:
        refiner = Refiner.from_pretrained(args.model, device=args.device, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = IDGBRModel(RefinerConfig.preset_config(args.preset, num_classes=6), load_weights=False)
        refiner = Refiner(model, device=args.device, dtype=dtype)
    size = args.tile
    if args.data:
        from idgbr.data.dataset import SegmentationDataset

        sample = SegmentationDataset(args.data, "test", coarse=args.coarse)[0]
        image, coarse = sample["image"][:size, :size], sample["coarse"][:size, :size]
    else:
        from idgbr.data.synthetic import make_scene

        scene = make_scene(size, seed=0)
        image, coarse = scene["image"], scene["mask"] % refiner.config.num_classes
    cfg = refiner.config
    calls = {
        "reference (25 steps, CFG 3)": dict(steps=25, strength=1.0, guidance=3.0),
        "fast (2 steps, strength 0.4, no CFG)": dict(steps=2, strength=0.4, guidance=1.0),
        f"default ({cfg.sample_steps} steps, strength {cfg.strength:g}, guidance {cfg.guidance_scale:g})":
            dict(steps=cfg.sample_steps, strength=cfg.strength, guidance=cfg.guidance_scale),
    }
    results = {}
    for name, kw in calls.items():
        refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0), **kw)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0), **kw)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = {"seconds": statistics.median(times), "nfe": refiner.last_nfe, **kw}
    reference = results["reference (25 steps, CFG 3)"]["seconds"]
    print(f"{image.shape[0]}x{image.shape[1]} tile, {torch.get_num_threads()} threads, device {args.device}, "
          f"model {args.model or args.preset + ' (random weights)'}")
    print("| call | NFE | s/tile | speed-up vs reference |\n|---|---|---|---|")
    for name, r in results.items():
        r["speedup"] = reference / r["seconds"]
        print(f"| {name} | {r['nfe']} | {r['seconds']:.3f} | {r['speedup']:.1f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"tile": list(np.shape(image)[:2]), "threads": torch.get_num_threads(), "results": results},
                      handle, indent=2)


if __name__ == "__main__":
    main()
