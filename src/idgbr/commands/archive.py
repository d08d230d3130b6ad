"""``idgbr refine-archive SCENES COARSE OUT``: refine many GeoTIFF scenes on dask.distributed (:mod:`idgbr.inference.archive`)."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    parser = sub.add_parser(
        "refine-archive", help="refine a folder of GeoTIFF scenes on a dask cluster (resumable, with a manifest)",
        description="Refine every GeoTIFF of SCENES with the coarse map of the same stem in COARSE, one dask task per "
                    "scene, into OUT/<stem>.tif, recording OUT/manifest.json. Scenes already done are skipped, "
                    "half-done ones resume; rerun the same command after a crash. Exit code 2 when a scene failed.")
    parser.add_argument("scenes", nargs="?", metavar="SCENES", help="folder of GeoTIFF scenes")
    parser.add_argument("coarse", nargs="?", metavar="COARSE", help="folder of coarse maps, matched by file stem")
    parser.add_argument("out", metavar="OUT", help="output folder (one <stem>.tif per scene and manifest.json)")
    parser.add_argument("--pairs", default=None, metavar="CSV",
                        help="instead of SCENES COARSE: a CSV of image,coarse paths (relative to the CSV)")
    parser.add_argument("--model", default=None, metavar="RUN",
                        help="run folder of 'idgbr train' or a shipped model name (default: the shipped 'dubai-lite' "
                             "refiner, for the scenes whose classes fit it)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="local worker processes (default: the GPU count on a GPU host, else 1)")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch threads per worker (default: CPU cores / workers)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="use an existing dask cluster (tcp://HOST:8786) instead of a local one")
    from .refine import add_sampling_options

    add_sampling_options(parser)
    parser.add_argument("--tile", type=int, default=None, help="tile size in px (default: the model's)")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default: the model's)")
    parser.add_argument("--gate", type=int, default=None, metavar="PX", help="refine only within PX px of coarse boundaries")
    parser.add_argument("--bands", default=None, metavar="B1,B2,...", help="1-based image bands fed to the model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.archive import MANIFEST, find_pairs, read_pairs, refine_archive
    from ..errors import IdgbrError

    if args.pairs is not None:
        if args.scenes is not None or args.coarse is not None:
            raise IdgbrError("give either SCENES COARSE OUT or --pairs CSV OUT, not both")
        pairs = read_pairs(args.pairs)
    elif args.scenes is None or args.coarse is None:
        raise IdgbrError("give SCENES COARSE OUT (folders of GeoTIFFs matched by stem), or --pairs CSV OUT")
    else:
        pairs = find_pairs(args.scenes, args.coarse)
    if (args.workers is not None and args.workers < 1) or (args.threads is not None and args.threads < 1):
        raise IdgbrError(f"need --workers >= 1 and --threads >= 1; got {args.workers}, {args.threads}")
    if args.scheduler is not None and args.workers is not None:
        raise IdgbrError("--workers sizes a local cluster; with --scheduler the cluster decides (drop --workers)")
    from .refine import parse_bands

    bands = parse_bands(args.bands)
    if args.model is None:
        from ..nn.zoo import shipped_refiner

        shipped_refiner()  # says which model runs; each scene's classes are checked on its worker
    manifest = refine_archive(pairs, args.out, args.model, workers=args.workers, threads=args.threads,
                              scheduler=args.scheduler, progress=not args.no_progress, tile=args.tile,
                              overlap=args.overlap, steps=args.steps, guidance=args.guidance, strength=args.strength,
                              noise_scale=args.noise_scale, tta=args.tta, sieve=args.sieve, flip_margin=args.flip_margin,
                              area_match=args.area_match, class_reach=args.class_reach, seed=args.seed,
                              batch_size=args.batch, gate_width=args.gate, bands=bands)
    statuses = list(manifest["job"].values())
    failed = [stem for stem, status in manifest["job"].items() if status == "failed"]
    print(f"{args.out}: {statuses.count('done')} done, {statuses.count('skipped')} skipped, {len(failed)} failed "
          f"of {len(statuses)} scenes in {manifest['wall_seconds']:.1f} s")
    for stem in failed:
        print(f"  {stem}: {manifest['scenes'][stem]['error']}", file=sys.stderr)
    if failed:
        raise IdgbrError(f"{args.out}/{MANIFEST}: {len(failed)} of {len(statuses)} scenes failed (listed above); fix "
                         "them and rerun the same command (done scenes are skipped)")
    return 0
