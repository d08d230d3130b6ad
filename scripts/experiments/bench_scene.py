"""Benchmark whole-scene refinement (:func:`idgbr.inference.scene.refine_scene`): time, peak RSS, seam score, gating.

    .venv/bin/python scripts/experiments/bench_scene.py --sizes 1500 3000 6000 --out /tmp/bench_scene

For each size a synthetic 3-band uint8 GeoTIFF (EPSG:32633, 0.5 m pixels, a 64 px nodata border on the left)
and its coarse map are written block by block (a mosaic of 500 px ``idgbr.data.synthetic.make_scene`` blocks, half of
them homogeneous land or water as in real scenes; the coarse map is ``degrade_mask`` of the truth), then a
lite-preset model with random weights (timing only; ``--model RUN`` takes a trained one) refines it with the fast
setting (``--steps 2 --strength 0.4``, guidance 1) in a fresh subprocess, which reports its wall time and peak RSS (``ru_maxrss``). Each run also
reports the seam score of its output (:func:`idgbr.inference.seams.seam_score`). ``--fake-model`` measures the scene
loop alone (windowed I/O, memmap accumulators, output) with ``logits = 10 * coarse prior`` instead of the network. ``--gate PX`` adds a gated run per size
(skipped-tile fraction); ``--tile-noise`` adds an ablation run whose tiles draw independent noise (no scene-level
field), to compare seam scores. Results are printed as a table and written to ``<out>/bench_scene.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BLOCK = 500  # side of one synthetic block of the mosaic


def write_scene(folder: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``scene_<size>.tif`` (3 bands, nodata 0) and ``coarse_<size>.tif`` (nodata 255) block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from idgbr.data.synthetic import degrade_mask, make_scene

    image_path, coarse_path = folder / f"scene_{size}.tif", folder / f"coarse_{size}.tif"
    if image_path.exists() and coarse_path.exists():
        return image_path, coarse_path
    rng = np.random.default_rng(seed)
    common = dict(driver="GTiff", height=size, width=size, dtype="uint8", crs="EPSG:32633",
                  transform=from_origin(400000.0, 5000000.0, 0.5, 0.5), tiled=True, blockxsize=256, blockysize=256,
                  compress="deflate")
    with rasterio.open(image_path, "w", count=3, nodata=0, **common) as img, \
            rasterio.open(coarse_path, "w", count=1, nodata=255, **common) as crs:
        for row in range(0, size, BLOCK):
            for col in range(0, size, BLOCK):
                h, w = min(BLOCK, size - row), min(BLOCK, size - col)
                block = make_scene(BLOCK, rng)
                image, mask = block["image"], block["mask"]
                if rng.random() < 0.5:  # homogeneous land (0) or water (4): no boundary to refine
                    value = int(rng.choice([0, 4]))
                    mask = np.full_like(mask, value)
                    image = np.clip((90 if value == 0 else 40) + rng.normal(0, 3, image.shape), 1, 255).astype(np.uint8)
                    coarse = mask.copy()
                else:
                    coarse = degrade_mask(mask, rng, 6)
                image = np.maximum(image, 1)  # 0 is nodata
                if col == 0:
                    image[:, :64] = 0
                    coarse[:, :64] = 255
                window = Window(col, row, w, h)
                img.write(np.moveaxis(image[:h, :w], -1, 0), window=window)
                crs.write(coarse[None, :h, :w], window=window)
    return image_path, coarse_path


def child(args: argparse.Namespace) -> None:
    """One measured run (in a fresh process); prints one JSON line."""
    import resource

    import torch

    from idgbr.nn.config import RefinerConfig
    from idgbr.nn.model import IDGBRModel
    from idgbr.inference.pipeline import Refiner
    from idgbr.inference import scene as scene_module

    torch.manual_seed(0)
    if args.model:  # a trained run folder
        refiner = Refiner.from_pretrained(args.model)
    else:  # random weights: the cost is the same
        refiner = Refiner(IDGBRModel(RefinerConfig.preset_config("lite", num_classes=6, image_channels=3)))
    if args.fake_model:  # I/O, blending and memory of the scene loop alone: logits = the coarse prior
        refiner.sample = lambda image, coarse, steps, guidance, strength, noise: 10 * coarse
    if args.tile_noise:  # ablation: every tile draws its own noise
        def cut(self, sample, row, col, height, width):
            gen = torch.Generator().manual_seed(hash((self.seed, sample, row, col)) & 0xFFFFFFFF)
            return torch.randn((self.channels, height, width), generator=gen)
        scene_module.NoiseField.cut = cut
    start = time.perf_counter()
    summary = scene_module.refine_scene(refiner, args.image, args.coarse, args.target, tile=args.tile,
                                        overlap=args.overlap, steps=args.steps, strength=args.strength, guidance=1.0,
                                        gate_width=args.gate, batch_size=args.batch, resume=False, progress=False)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    import rasterio

    with rasterio.open(args.target) as src:
        labels = src.read(1)
    seam = scene_module.seam_score(labels, args.tile, args.overlap)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "seam": seam,
                      **{k: summary[k] for k in ("tiles", "computed", "skipped_nodata", "skipped_gate", "skipped_fraction")}}))


def run_child(image: Path, coarse: Path, target: Path, ns: argparse.Namespace, gate: int | None = None,
              tile_noise: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--image", str(image), "--coarse", str(coarse), "--target", str(target),
           "--tile", str(ns.tile), "--overlap", str(ns.overlap), "--batch", str(ns.batch),
           "--steps", str(ns.steps), "--strength", str(ns.strength)]
    if ns.model:
        cmd += ["--model", str(ns.model)]
    if gate is not None:
        cmd += ["--gate", str(gate)]
    if tile_noise:
        cmd.append("--tile-noise")
    if ns.fake_model:
        cmd.append("--fake-model")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 3000, 6000])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_scene"))
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", type=Path, default=None, help="a trained run folder (default: lite, random weights)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (default 2)")
    parser.add_argument("--strength", type=float, default=0.4, help="SDEdit strength (default 0.4)")
    parser.add_argument("--gate", type=int, default=None, help="also run with this gate width per size")
    parser.add_argument("--tile-noise", action="store_true", help="also run the per-tile-noise ablation per size")
    parser.add_argument("--fake-model", action="store_true",
                        help="replace the network by 'logits = coarse prior' (scene loop cost and memory without the model)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--coarse", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "bench_scene.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for size in args.sizes:
        image, coarse = write_scene(args.out, size)
        runs = {"fake" if args.fake_model else "ungated": dict()}
        if args.gate is not None:
            runs[f"gate{args.gate}"] = dict(gate=args.gate)
        if args.tile_noise:
            runs["tile_noise"] = dict(tile_noise=True)
        for name, kw in runs.items():
            result = run_child(image, coarse, args.out / f"refined_{size}_{name}.tif", args, **kw)
            result.update(size=size, run=name, mpix=size * size / 1e6)
            result["s_per_mpix"] = result["seconds"] / result["mpix"]
            results[f"{size}-{name}"] = result
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{size:>5}² {name:>10}: {result['seconds']:8.1f} s ({result['s_per_mpix']:.1f} s/Mpx), peak RSS "
                  f"{result['peak_rss_mb']:7.0f} MB, tiles {result['tiles']} (computed {result['computed']}, skipped "
                  f"{100 * result['skipped_fraction']:.1f}%), seam ratio {result['seam']['ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
