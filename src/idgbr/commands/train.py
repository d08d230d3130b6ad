"""``idgbr train``: train a refiner (see :mod:`idgbr.training.loop`); the number of classes and bands come from the data."""

from __future__ import annotations

import argparse
import os

PRESET_NAMES = ("sd15", "lite", "tiny")  # listed, not imported, so `idgbr --help` stays light


def register(sub) -> None:
    parser = sub.add_parser(
        "train", help="train an IDGBR refiner on DATA's train split",
        description="Train an IDGBR refiner. Several processes: `accelerate launch --multi_gpu --num_processes N -m idgbr "
                    "train ...` (GPUs, or gloo on a CPU-only host) or `torchrun --nproc_per_node N -m idgbr train ...`. "
                    "The run folder ends up holding the final model for `idgbr refine --model RUN`.")
    parser.add_argument("--preset", default="lite", choices=PRESET_NAMES, help="model size (default: lite)")
    parser.add_argument("--data", required=True, help="canonical dataset folder")
    parser.add_argument("--coarse", action="append", default=None, metavar="NAME",
                        help="coarse maps of the training images in DATA/coarse/NAME/; repeat it (or NAME,NAME) to pool "
                             "several coarse models' maps, each image once per model (default: synthetic degradations "
                             "only; --set coarse_corruption=P mixes a share P of synthetic ones in)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to write")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size per process (default: the preset's)")
    parser.add_argument("--crop", type=int, default=None, help="training crop size (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the preset's)")
    parser.add_argument("--train-minutes", type=float, default=None, metavar="M",
                        help="stop after M minutes of training (or at --steps, whichever comes first)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval in steps")
    parser.add_argument("--pretrained", default=None, metavar="PATH", help="SD-1.5 folder or .safetensors (sd15)")
    parser.add_argument("--dinov2", default=None, metavar="PATH", help="DINOv2 weights for REPA (off without)")
    parser.add_argument("--label-embed", default=None, metavar="DIR", help="trained label embedding (else trained first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set prediction_type=epsilon (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in RUN")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The preset, then the named flags, then ``--set`` overrides."""
    from ..nn.config import RefinerConfig, parse_overrides

    overrides = {"steps": args.steps, "batch_size": args.batch, "crop_size": args.crop, "lr": args.lr,
                 "checkpoint_every": args.checkpoint_every, "train_minutes": args.train_minutes,
                 "pretrained": args.pretrained, "dinov2": args.dinov2, "label_embed": args.label_embed}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(parse_overrides(args.set))
    if "image_channels" not in overrides:  # the preset's defaults may depend on the bands (lite: RGB or not)
        overrides["image_channels"] = image_bands(args.data)
    return RefinerConfig.preset_config(args.preset, **overrides)


def image_bands(data: str) -> int | None:
    """The band count of the first training image of a prepared dataset (training checks that all agree), or None
    when DATA is not one (training then says what is wrong with it)."""
    from pathlib import Path

    if not (Path(data) / "classes.json").exists():
        return None
    from ..data.dataset import SegmentationDataset

    return int(SegmentationDataset(data, "train", load_mask=False)[0]["image"].shape[-1])


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    from ..training.batches import check_paths
    from ..training.loop import train_refiner

    check_paths(config)  # before importing torch-heavy modules: a bad path fails within seconds
    out = train_refiner(config, args.data, args.coarse, args.out, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # once under accelerate launch / torchrun
        print(f"saved {out}")
    return 0
