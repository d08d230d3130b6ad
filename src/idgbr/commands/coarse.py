"""``idgbr train-coarse`` and ``idgbr predict-coarse``: the discriminative stage (see :mod:`idgbr.coarse`)."""

from __future__ import annotations

import argparse


# Listed here rather than imported so that `idgbr --help` does not import torch; tests check it matches ARCHS.
ARCH_NAMES = ("deeplabv3plus", "unet", "segformer")


def register(sub) -> None:
    train = sub.add_parser(
        "train-coarse", help="train a coarse segmentation model (smp) on DATA's train split",
        description="Train a coarse segmentation model on DATA's train split and save it (config.json + "
                    "model.safetensors) to --out. Paper defaults: batch 8, 20k iterations, 512 crops.")
    train.add_argument("--data", required=True, help="canonical dataset folder")
    train.add_argument("--arch", required=True, help=f"architecture: {', '.join(ARCH_NAMES)}")
    train.add_argument("--out", required=True, help="run folder to write")
    train.add_argument("--iters", type=int, default=20000, help="training iterations (default: 20000)")
    train.add_argument("--crop", type=int, default=512, help="training crop size, a multiple of 32 (default: 512)")
    train.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    train.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per architecture)")
    train.add_argument("--encoder", default=None, help="smp encoder name (default: resnet18; mit_b0 for segformer)")
    train.add_argument("--encoder-weights", default=None, metavar="PATH",
                       help="local .safetensors/.pth encoder weights (default: random initialisation)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="rewrite the run folder every N iterations")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)

    predict = sub.add_parser(
        "predict-coarse", help="write coarse maps DATA/coarse/NAME/<stem>.png with a trained model",
        description="Predict full-size coarse maps with sliding windows and write DATA/coarse/NAME/<stem>.png.")
    predict.add_argument("--model", required=True, help="run folder of 'idgbr train-coarse'")
    predict.add_argument("--data", required=True, help="canonical dataset folder")
    predict.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default: test)")
    predict.add_argument("--name", default=None, help="output name under DATA/coarse/ (default: the run folder's name)")
    predict.add_argument("--probs", choices=["npy", "tif"], default=None,
                         help="also write float32 (K, H, W) probabilities to DATA/coarse/NAME_probs/")
    predict.add_argument("--tile", type=int, default=512, help="sliding-window size (default: 512)")
    predict.add_argument("--overlap", type=int, default=64, help="sliding-window overlap (default: 64)")
    predict.add_argument("--batch", type=int, default=4, help="windows per forward pass (default: 4)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> int:
    from ..coarse import train_coarse

    train_coarse(args.data, args.arch, args.out, iters=args.iters, batch=args.batch, crop=args.crop, lr=args.lr,
                 encoder=args.encoder, encoder_weights=args.encoder_weights, seed=args.seed,
                 progress=not args.no_progress, num_workers=args.workers, checkpoint_every=args.checkpoint_every)
    print(f"saved {args.out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..coarse import predict_coarse

    out = predict_coarse(args.model, args.data, args.split, name=args.name, probs=args.probs, tile=args.tile,
                         overlap=args.overlap, batch=args.batch, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
