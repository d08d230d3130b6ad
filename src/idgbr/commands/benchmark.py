"""``idgbr benchmark DATA --coarse-arch A [--coarse-arch B ...] --preset lite --out RUN``."""

from __future__ import annotations

import argparse

from ..nn.device import add_device_argument


def register(sub) -> None:
    parser = sub.add_parser("benchmark", help="coarse models + refiner + controls on a dataset, with report.json/md",
                            description=__doc__)
    parser.add_argument("data", help="a prepared dataset folder")
    parser.add_argument("--coarse-arch", action="append", dest="archs", help="coarse architecture (repeatable)")
    parser.add_argument("--preset", default="lite", choices=("sd15", "lite", "tiny"))
    parser.add_argument("--out", required=True, help="run folder (stages already done there are reused)")
    parser.add_argument("--coarse-encoder", default="tu-mobilenetv3_small_100",
                        help="encoder of the coarse models (default: tu-mobilenetv3_small_100, light enough for 2 CPU "
                             "cores; 'resnet18' is smp's usual choice)")
    parser.add_argument("--coarse-encoder-weights", default=None, metavar="PATH|imagenet",
                        help="the coarse encoder's starting weights: a local file, or 'imagenet' (packaged, for "
                             "--coarse-encoder tu-tf_efficientnet_lite0: strong coarse models on any RGB data set; "
                             "default: random initialisation)")
    parser.add_argument("--coarse-iters", type=int, default=200)
    parser.add_argument("--coarse-crop", type=int, default=256)
    parser.add_argument("--coarse-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="refiner training steps (default: the preset's)")
    parser.add_argument("--train-minutes", type=float, default=None, metavar="M",
                        help="stop each refiner's training after M minutes, or at --steps if sooner")
    parser.add_argument("--sample-steps", type=int, default=4, help="DDIM steps (default 4; the paper: 25)")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (default 1 = off; the paper: 3)")
    parser.add_argument("--strength", type=float, default=1.0, help="SDEdit strength (default 1 = from noise)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples averaged per tile (default: the preset's)")
    parser.add_argument("--noise-scale", type=float, default=None,
                        help="starting-noise scale, 0 = deterministic start (default: the preset's)")
    parser.add_argument("--tta", default=None, choices=["none", "flips", "d4"],
                        help="test-time augmentation of the refiner (default: the preset's)")
    parser.add_argument("--flip-margin", type=float, default=None, metavar="P",
                        help="refined labels only where the refiner is surer of them than of the coarse label by P "
                             "(default: the refiner config's)")
    parser.add_argument("--area-match", type=float, default=None, metavar="A",
                        help="pull each class's refined area towards the coarse map's, 0 (off) to 1 (default: the "
                             "refiner config's)")
    parser.add_argument("--class-reach", type=int, default=None, metavar="PX",
                        help="a pixel takes only a class the coarse map holds within PX pixels of it (0 = any class; "
                             "default: the refiner config's, lite 8)")
    parser.add_argument("--sieve", type=int, default=None, metavar="PX",
                        help="score the maps with regions smaller than PX pixels merged into their largest neighbour "
                             "(0 = off; default: the refiner config's, lite 0); the report also scores them unsieved")
    parser.add_argument("--gate", type=int, default=8, metavar="PX",
                        help="also score the gated maps: refined within PX of coarse boundaries (default 8; -1: off)")
    parser.add_argument("--no-controls", action="store_true", help="skip the deterministic (and image-only) controls")
    parser.add_argument("--image-only", action="store_true",
                        help="also train the image-only control (the paper's Experiment A; no coarse guidance, so one "
                             "run of it serves every coarse track; off by default to keep the benchmark within 45 min)")
    parser.add_argument("--no-image-only", action="store_true", help=argparse.SUPPRESS)  # the default; old command lines
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="RefinerConfig override")
    parser.add_argument("--coarse-folds", type=int, default=None, metavar="K",
                        help="train the refiner on out-of-fold coarse train maps from K >= 2 fold models per coarse "
                             "model (see 'idgbr predict-coarse --folds'), pooled: one refiner learns the real errors "
                             "of every coarse model; 0: in-sample maps of the full coarse model (default: 3 when the "
                             "refiner learns from real errors, coarse_corruption < 1 as in lite; else 0)")
    parser.add_argument("--coarse-fold-group", default=None, metavar="REGEX",
                        help="with --coarse-folds: stems with the same first match of REGEX share a fold (e.g. "
                             "'tile\\d+' holds out whole source tiles, as a tile-wise test split does)")
    parser.add_argument("--coarse-maps", action="append", default=[], metavar="DIR",
                        help="a complete coarse track instead of training coarse models (repeatable): a folder with a "
                             "map for every train (out-of-fold) and test stem and provenance.json, e.g. the committed "
                             "fixtures/coarse/dubai_half/* or 'idgbr predict-coarse --folds K --with-test' output")
    parser.add_argument("--refiner-coarse-maps", action="append", default=[], metavar="DIR",
                        help="real errors: the shared refiner and its control train on the train (out-of-fold) maps "
                             "of these complete coarse tracks, pooled, mixed with synthetic ones at coarse_corruption "
                             "(e.g. --set coarse_corruption=0.5; repeatable); one refiner serves every coarse model")
    parser.add_argument("--sequential", action="store_true",
                        help="train the refiner, its control and the coarse models one after the other with every "
                             "thread (default on a CPU: two side by side, half the threads each, which takes less "
                             "time; the thread count changes float rounding, so the models are not bit-identical to a "
                             "sequential run's)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.benchmark import BenchmarkSettings, run_benchmark
    from ..nn.config import parse_overrides

    settings = BenchmarkSettings(
        coarse_archs=tuple(args.archs or ("deeplabv3plus", "unet")), preset=args.preset,
        coarse_encoder=args.coarse_encoder, coarse_encoder_weights=args.coarse_encoder_weights,
        refiner_coarse_maps=tuple(args.refiner_coarse_maps), device=args.device, coarse_iters=args.coarse_iters, coarse_crop=args.coarse_crop, coarse_batch=args.coarse_batch,
        refiner_steps=args.steps, sample_steps=args.sample_steps, guidance=args.guidance, strength=args.strength,
        samples=args.samples, noise_scale=args.noise_scale, tta=args.tta, controls=not args.no_controls, image_only=args.image_only and not args.no_image_only,
        gate_width=None if args.gate < 0 else args.gate, sieve=args.sieve, flip_margin=args.flip_margin, area_match=args.area_match, class_reach=args.class_reach, seed=args.seed, coarse_folds=args.coarse_folds,
        coarse_fold_group=args.coarse_fold_group, coarse_maps=tuple(args.coarse_maps),
        side_by_side=False if args.sequential else None,
        overrides={**parse_overrides(args.set), **({"train_minutes": args.train_minutes} if args.train_minutes else {})})
    if args.coarse_maps and (args.archs or args.coarse_folds):
        from ..errors import IdgbrError

        raise IdgbrError("--coarse-maps brings its own coarse maps; drop --coarse-arch / --coarse-folds")
    report = run_benchmark(args.data, args.out, settings)
    print(f"wrote {args.out}/report.json and report.md ({len(report['results'])} coarse models)")
    return 0
