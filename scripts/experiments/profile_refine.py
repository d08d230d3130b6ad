"""Where the time of one refined tile goes (issue 29 §4): conditioning (image encoder, label encoder, guidance
features), network evaluations, decoding, blending, sieve, for a model and a tile size.

    python scripts/experiments/profile_refine.py --model dubai-lite --size 512 --steps 1 4 --threads 2 --repeat 5

Each stage is timed with torch.profiler's ``record_function`` labels around the Refiner's own calls (no copy of the
sampling loop): the totals are wall time per tile, the median of ``--repeat`` runs after one warm-up.
``--tile-size`` overrides the model's inference tile (a 512² input in 256² tiles with 32 px overlap runs 9 windows).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dubai-lite", help="a run folder, a shipped name, or 'lite' (a fresh lite "
                                                              "default, random weights: same cost)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--tile-overlap", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sieve", type=int, default=None)
    parser.add_argument("--tta", default=None, choices=["none", "flips", "d4"])
    args = parser.parse_args()

    import torch

    from idgbr.nn.config import RefinerConfig
    from idgbr.nn.model import IDGBRModel
    from idgbr.inference.pipeline import Refiner

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "lite":
        model = IDGBRModel(RefinerConfig.preset_config("lite", num_classes=6))
        refiner = Refiner(model, device="cpu")
    else:
        refiner = Refiner.from_pretrained(args.model, device="cpu")
    cfg = refiner.model.config
    changes = {k: v for k, v in (("tile_size", args.tile_size), ("tile_overlap", args.tile_overlap)) if v is not None}
    if changes:
        refiner.model.config = cfg.replace(**changes)
        cfg = refiner.model.config
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)
    coarse = np.zeros((args.size, args.size), np.uint8)
    coarse[:, args.size // 2:] = 1
    coarse[args.size // 3: args.size // 2, :] = 2

    spans: dict[str, float] = {}

    @contextmanager
    def span(name):
        start = time.perf_counter()
        try:
            yield
        finally:
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - start

    def timed(obj, attr, name):
        original = getattr(obj, attr)

        def wrapper(*a, **k):
            with span(name):
                return original(*a, **k)

        setattr(obj, attr, wrapper)

    m = refiner.model
    timed(m, "encode_image", "image latent")
    timed(m, "encode_labels", "label latent")
    timed(m, "condition", "guidance features")
    timed(m, "decode_logits", "decode")
    timed(refiner, "_denoise", "network")
    import idgbr.inference.pipeline as pipeline

    original_sieve = pipeline.sieve_labels

    def sieve(labels, area):
        with span("sieve"):
            return original_sieve(labels, area)

    pipeline.sieve_labels = sieve
    print(f"model {args.model}: tile {cfg.tile_size} overlap {cfg.tile_overlap}, image {cfg.image_encoder}, "
          f"tta {args.tta or cfg.tta}, {torch.get_num_threads()} threads, {args.size}² input")
    print("| NFE | total s/tile | image latent | label latent | guidance features | network | decode | blend + rest | sieve |")
    print("|---|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        runs = []
        for r in range(args.repeat + 1):
            spans.clear()
            start = time.perf_counter()
            refiner.refine(image, coarse, steps=steps, guidance=1.0, batch_size=args.batch,
                           generator=torch.Generator().manual_seed(0), sieve=args.sieve, tta=args.tta)
            total = time.perf_counter() - start
            if r:
                runs.append((total, dict(spans)))
        total = statistics.median(t for t, _ in runs)
        keys = ["image latent", "label latent", "guidance features", "network", "decode", "sieve"]
        med = {k: statistics.median(s.get(k, 0.0) for _, s in runs) for k in keys}
        # encode_labels also runs inside condition? no: it is called by the pipeline; guidance features include the
        # image branch (condition(..., image=x))
        rest = total - sum(med.values())
        print(f"| {steps} | {total:.3f} | {med['image latent']:.3f} | {med['label latent']:.3f} | "
              f"{med['guidance features']:.3f} | {med['network']:.3f} | {med['decode']:.3f} | {rest:.3f} | "
              f"{med['sieve']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
