"""Split one refiner training step into phases and time each: ``python scripts/experiments/profile_train.py --preset lite``.

Phases: data (sampler + copy to the device; with ``--set prefetch=N`` the wait for the background thread), encode
(label and image latents), condition (guidance encoder), forward (noise, UNet with CG modules, loss; for
``--set objective=deterministic`` the one pass and the label decoder's cross-entropy), backward, optimiser
(clipping, AdamW, LR schedule, zero_grad) and logging (host syncs: finiteness check and ``.item()``, every
``--log-every`` steps as the training loop does). The step is the training loop's own: ``RefinerObjective``
(without REPA; it marks the ends of encode, condition and forward), sampler, optimiser and clipping helpers, so
their changes show up here. On CUDA every phase is bracketed by ``torch.cuda.synchronize()``; the summed phases
are then slower than an unsynchronised step.

Prints a markdown table: mean ms per phase over the timed steps (after ``--warmup`` steps), and steps/s.
Without ``--data`` a small synthetic dataset is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

PHASES = ("data", "encode", "condition", "forward", "backward", "optimiser", "logging")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="lite", choices=("lite", "tiny", "sd15"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--data", default=None, help="canonical dataset (default: synthetic, in a temp folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


class PhaseTimer:
    """Accumulates wall time per phase; synchronises CUDA before each reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.last = 0.0
        self.active = False

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def mark(self, phase: str) -> None:
        now = self._now()
        if self.active:
            self.totals[phase] += now - self.last
        self.last = now


def build(args: argparse.Namespace, data_root: str):
    from idgbr.nn.config import RefinerConfig, parse_overrides
    from idgbr.nn.model import IDGBRModel
    from idgbr.training.batches import load_training_samples, resolve_config

    overrides = {"batch_size": args.batch, "crop_size": args.crop, **parse_overrides(args.set)}
    config = RefinerConfig.preset_config(args.preset, **overrides)
    samples, dataset = load_training_samples(data_root, None)
    config = resolve_config(config, dataset, samples)
    model = IDGBRModel(config, load_weights=False).to(args.device)
    model.train()
    return config, model, samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from idgbr.training.batches import CropSampler, Prefetcher
    from idgbr.training.loop import apply_throughput_switches, lr_lambda, make_optimizer
    from idgbr.training.objective import RefinerObjective

    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data
        if data_root is None:
            from idgbr.data.synthetic import write_synthetic_dataset

            data_root = str(Path(tmp) / "synthetic")
            write_synthetic_dataset(data_root, n=10, size=256, seed=0)
        config, model, samples = build(args, data_root)
    device = torch.device(args.device)
    objective = RefinerObjective(model, config)
    params = model.trainable_parameters()
    apply_throughput_switches(config, model, device)
    model.label_embed.check_labels = False  # as the training loop: labels are checked once at load
    optimizer = make_optimizer(config, params, device)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    cuda = device.type == "cuda"
    sampler = CropSampler(samples, config, pin_memory=cuda)
    rng = np.random.default_rng(config.seed)
    prefetcher = Prefetcher(sampler, rng, config.prefetch) if config.prefetch else None
    next_batch = prefetcher if prefetcher is not None else (lambda: sampler(rng))
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(config.seed)
    timer = PhaseTimer(device)
    losses: list[float] = []
    total_steps = args.warmup + args.steps
    wall = 0.0
    for step in range(total_steps):
        timer.active = step >= args.warmup
        if step == args.warmup:
            begin = timer._now()
        timer.start()
        batch = {k: v.to(device, non_blocking=cuda) for k, v in next_batch().items()}
        batch["image"] = batch["image"].contiguous(memory_format=memory_format)
        timer.mark("data")
        loss = objective(batch["image"], batch["mask"], batch["coarse"], gen, mark=timer.mark)["loss"]
        loss.backward()
        timer.mark("backward")
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        timer.mark("optimiser")
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:  # the loop's only host syncs
            losses.append(loss.item())
            if not np.isfinite(losses[-1]):
                raise RuntimeError(f"non-finite loss at step {step}")
        timer.mark("logging")
    wall = timer._now() - begin
    if prefetcher is not None:
        prefetcher.close()
    ms = {p: 1000 * timer.totals[p] / args.steps for p in PHASES}
    print(f"preset {config.preset}, batch {config.batch_size}, crop {config.crop_size}, device {device}, "
          f"threads {torch.get_num_threads()}, {args.steps} timed steps after {args.warmup}, torch {torch.__version__}")
    print("\n| phase | ms/step |\n|---|---:|")
    for phase in PHASES:
        print(f"| {phase} | {ms[phase]:.1f} |")
    print(f"| **total** | **{sum(ms.values()):.1f}** |")
    print(f"\nsteps/s: {args.steps / wall:.3f} (wall {wall:.1f} s); last logged loss {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
