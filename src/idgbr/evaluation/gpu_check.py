"""Throughput on a GPU machine, in one table: ``idgbr gpu-check --out RESULTS.md`` (see scripts/gpu_check.sh).

Rows (each stage is skipped once ``--budget-min`` minutes have passed, so a cut-off run still reports):

* lite training, steps/s all-in (sampler in a background thread two batches ahead, objective, backward, clipping,
  AdamW) and the time the step waited for data, at batch 16 and 64, crops 128 and 256, on synthetic scenes;
* lite inference, ms per 512² tile (conditioning + 1 or 4 network evaluations + decoding), batch 1 and 16,
  fp32 and bf16 (autocast);
* sd15 with random weights (no download): training s/step and peak memory at batch 4, 512², bf16, REPA off;
  inference ms per tile for 25 steps with CFG 3 (50 evaluations) and for the fast mode (4 steps, no CFG).

``--smoke`` runs every stage with the tiny preset, small sizes and 1-2 steps (CPU is fine): a check of the
script, not a measurement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class Table:
    """Markdown rows, printed and rewritten to ``path`` as they come."""

    def __init__(self, path: str | None, header: str):
        self.path, self.lines = path, [header, "", "| what | setting | result |", "|---|---|---|"]
        print(header, flush=True)

    def add(self, what: str, setting: str, result: str) -> None:
        self.lines.append(f"| {what} | {setting} | {result} |")
        print(self.lines[-1], flush=True)
        if self.path:
            Path(self.path).write_text("\n".join(self.lines) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rate(config, samples, device: torch.device, steps: int, warmup: int, dtype: torch.dtype | None,
               load_weights: bool = True) -> tuple[float, float, float]:
    """(steps/s all-in, ms/step waiting for data, peak GiB) of the training step of ``idgbr.training.loop`` (no accelerate)."""
    from ..nn.model import IDGBRModel
    from ..training.batches import CropSampler, Prefetcher
    from ..training.objective import RefinerObjective
    from ..training.loop import apply_throughput_switches, make_optimizer

    model = IDGBRModel(config, load_weights=load_weights).to(device).train()
    apply_throughput_switches(config, model, device)
    model.label_embed.check_labels = False
    objective = RefinerObjective(model, config)
    params = model.trainable_parameters()
    optimizer = make_optimizer(config, params, device)
    sampler = CropSampler(samples, config, pin_memory=device.type == "cuda")
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    prefetcher = Prefetcher(sampler, rng, config.prefetch) if config.prefetch else None
    next_batch = prefetcher if prefetcher is not None else (lambda: sampler(rng))
    data_s = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            begin, data_s = time.perf_counter(), 0.0
        tick = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next_batch().items()}
        data_s += time.perf_counter() - tick
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective(batch["image"], batch["mask"], batch["coarse"], gen)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    seconds = time.perf_counter() - begin
    if prefetcher is not None:
        prefetcher.close()
    if not np.isfinite(loss.item()):
        raise RuntimeError("non-finite training loss")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return steps / seconds, 1000 * data_s / steps, peak


def infer_ms(model, device: torch.device, tile: int, batch: int, steps: int, guidance: float, dtype, repeats: int) -> float:
    """ms per tile of ``Refiner.sample`` (conditioning, ``steps`` DDIM steps, decoding) on random tiles."""
    from ..inference.pipeline import Refiner

    refiner = Refiner(model, device, dtype=dtype)
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(0)
    image = torch.randint(0, 255, (batch, cfg.image_channels, tile, tile), device=device, dtype=torch.uint8)
    coarse = torch.softmax(torch.randn(batch, cfg.num_classes, tile, tile, device=device, generator=gen), 1)
    noise = torch.randn((batch, *refiner._latent_shape((tile, tile))), device=device, generator=gen)
    refiner.sample(image, coarse, steps, guidance, 1.0, noise)  # warm-up
    sync(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        refiner.sample(image, coarse, steps, guidance, 1.0, noise)
    sync(device)
    return 1000 * (time.perf_counter() - begin) / (repeats * batch)


def run(args: argparse.Namespace) -> int:
    """``idgbr gpu-check``: the table, printed and (with ``--out``) written."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from ..training.batches import load_training_samples, resolve_config
    from ..nn.config import RefinerConfig
    from ..nn.model import IDGBRModel
    from ..data.synthetic import write_synthetic_dataset

    device, smoke, start = torch.device(args.device), args.smoke, time.perf_counter()
    preset = "tiny" if smoke else "lite"
    table = Table(args.out, f"# gpu_check: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
                            f"torch {torch.__version__}{', SMOKE (not a measurement)' if smoke else ''}")

    def time_left() -> bool:
        return (time.perf_counter() - start) / 60 < args.budget_min

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(Path(tmp) / "d", n=3 if smoke else 10, size=96 if smoke else 512, seed=0)
        samples, dataset = load_training_samples(Path(tmp) / "d", None)
    base = resolve_config(RefinerConfig.preset_config(preset), dataset, samples)
    steps, warmup = (1, 1) if smoke else (20, 3)
    bf16 = torch.bfloat16 if device.type == "cuda" else None

    # --- lite training -----------------------------------------------------------------------------------------
    for crop in ((32,) if smoke else (128, 256)):
        for batch in ((2,) if smoke else (16, 64)):
            if not time_left():
                table.add(f"{preset} train", f"batch {batch}, crop {crop}", "skipped (time)")
                continue
            config = base.replace(batch_size=batch, crop_size=crop, allow_tf32=True, prefetch=2)
            rate, data_ms, _ = train_rate(config, samples, device, steps, warmup, None)
            table.add(f"{preset} train fp32 (TF32 on)", f"batch {batch}, crop {crop}",
                      f"{rate:.2f} steps/s ({rate * batch:.0f} crops/s); waiting for data {data_ms:.0f} ms/step")

    # --- lite inference ----------------------------------------------------------------------------------------
    tile = 32 if smoke else 512
    model = IDGBRModel(base.replace(tile_size=tile), load_weights=False)
    for dtype in (None, bf16) if bf16 is not None else (None,):
        for batch in ((2,) if smoke else (1, 16)):
            for nfe in (1, 4):
                if time_left():
                    ms = infer_ms(model, device, tile, batch, nfe, 1.0, dtype, 1 if smoke else 5)
                    result = f"{ms:.1f} ms/tile"
                else:
                    result = "skipped (time)"
                name = "bf16" if dtype is not None else "fp32"
                table.add(f"{preset} inference {name}", f"{tile}² tile, batch {batch}, {nfe} NFE", result)
    del model

    # --- sd15, random weights ----------------------------------------------------------------------------------
    # smoke: the sd15 preset (VAE codec, frozen guidance encoder, CLIP-sized context) with a narrow UNet
    narrow = dict(block_out_channels=(32,) * 4, layers_per_block=1, guidance_attention_width=16, guidance_heads=2)
    sd15 = RefinerConfig.preset_config("sd15", num_classes=base.num_classes, image_channels=3, dinov2=None,
                                       **(narrow if smoke else {}))
    size, batch = (128, 2) if smoke else (512, 4)
    name = "sd15 (narrow UNet)" if smoke else "sd15 (random init)"
    precision = "bf16" if bf16 is not None else "fp32"
    if time_left():
        rate, _, peak = train_rate(sd15.replace(batch_size=batch, crop_size=size), samples, device,
                                   steps if smoke else 5, 1 if smoke else 2, bf16, load_weights=False)
        table.add(f"{name} train {precision}", f"batch {batch}, {size}², REPA off", f"{1 / rate:.2f} s/step, peak {peak:.1f} GiB")
    else:
        table.add(f"{name} train {precision}", f"batch {batch}, {size}²", "skipped (time)")
    if time_left():
        tile = size
        model = IDGBRModel(sd15.replace(tile_size=tile), load_weights=False)
        for steps_, guidance in ((2, 3.0) if smoke else (25, 3.0), (1, 1.0) if smoke else (4, 1.0)):
            ms = infer_ms(model, device, tile, 1, steps_, guidance, bf16, 1 if smoke else 3)
            table.add(f"{name} inference {precision}", f"{tile}² tile, batch 1, {steps_} steps, CFG {guidance:g}",
                      f"{ms:.0f} ms/tile")
    return 0

