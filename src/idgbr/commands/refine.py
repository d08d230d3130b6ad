"""``idgbr refine``: one image (``--image/--coarse/--out``), a whole scene, or a dataset split (``--data/--split``).

Scene mode (:func:`idgbr.inference.scene.refine_scene`: windowed, blended, resumable) is used for GeoTIFF images, images
larger than one tile, and whenever a scene option (``--tile --overlap --samples --gate --confidence --bands
--no-resume``) is given; a ``.npy`` coarse map keeps the in-memory single-image path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..nn.device import add_device_argument


def register(sub) -> None:
    parser = sub.add_parser(
        "refine", help="refine coarse maps with a trained refiner",
        description="Refine one image (--image PATH --coarse PATH --out PATH) or every image of a dataset split "
                    "(--data DATA --split test --coarse NAME, writing DATA/refined/<run>/<stem>.png).")
    parser.add_argument("--model", default=None, metavar="RUN",
                        help="run (or checkpoint) folder of 'idgbr train', a shipped model name, or a Hugging Face "
                             "repo id (default: the shipped 'dubai-lite' refiner, when the class count fits)")
    parser.add_argument("--image", default=None, help="single-file mode: the image (PNG/JPEG/TIF)")
    parser.add_argument("--coarse", default=None,
                        help="single-file mode: coarse index map (PNG/TIF) or (K, H, W) .npy probabilities; "
                             "folder mode: NAME under DATA/coarse/")
    parser.add_argument("--out", default=None, help="output map (single file) or folder (default: DATA/refined/<run>)")
    parser.add_argument("--data", default=None, help="folder mode: canonical dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="folder mode split (default: test)")
    add_sampling_options(parser)
    scene = parser.add_argument_group("scene mode (GeoTIFF / large images)")
    scene.add_argument("--tile", type=int, default=None, help="tile size in px (default: the model's tile_size)")
    scene.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default: the model's tile_overlap)")
    scene.add_argument("--samples", type=int, default=None,
                       help="draw N refinements; scene mode writes the majority vote and <out>_uncertainty.tif, "
                            "folder mode averages their probabilities (default: the model's, 1)")
    scene.add_argument("--gate", type=int, default=None, metavar="PX",
                       help="refine only within PX px of coarse boundaries; keep the coarse label elsewhere")
    scene.add_argument("--confidence", type=float, default=None, metavar="P",
                       help="with a K-band probability --coarse: also refine pixels whose max probability < P")
    scene.add_argument("--bands", default=None, metavar="B1,B2,...",
                       help="1-based image bands fed to the model, e.g. 4,3,2 (sd15 takes 3 bands; default: all "
                            "non-alpha bands)")
    scene.add_argument("--no-resume", action="store_true", help="start over even if <out>.progress.json exists")
    parser.add_argument("--skip-existing", action="store_true", help="folder mode: keep maps already written")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def add_sampling_options(parser) -> None:
    """The sampling and post-processing flags that every refining command shares (refine, refine-archive)."""
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's config: lite 4, sd15 25)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale, 1 = off (default: the model's config: lite 1, sd15 3)")
    parser.add_argument("--strength", type=float, default=None, help="SDEdit strength in (0, 1] (default: 1)")
    parser.add_argument("--noise-scale", type=float, default=None,
                        help="scale of the starting noise, 0 = deterministic start (default: the model's)")
    parser.add_argument("--tta", default=None, choices=["none", "flips", "d4"],
                        help="test-time augmentation: average over flips (4 passes) or all 8 rotations/mirrors "
                             "(default: the model's, none)")
    parser.add_argument("--flip-margin", type=float, default=None, metavar="P",
                        help="take a refined label only where its probability beats the coarse label's by more than P, "
                             "keep the coarse label elsewhere (0 = plain argmax; default: the model's)")
    parser.add_argument("--area-match", type=float, default=None, metavar="A",
                        help="pull each class's refined area towards the coarse map's: 0 = off, 1 = the coarse map's "
                             "class areas (one offset per class; default: the model's)")
    parser.add_argument("--class-reach", type=int, default=None, metavar="PX",
                        help="a pixel takes only a class that the coarse map holds within PX pixels of it: boundaries "
                             "move at most PX, no class appears far from where the coarse map has it (0 = any class; "
                             "default: the model's, lite 8)")
    parser.add_argument("--sieve", type=int, default=None, metavar="PX",
                        help="minimum mapping unit: merge regions smaller than PX pixels into their largest neighbour, "
                             "0 = off (default: the model's; lite and the shipped dubai-lite 0)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per network batch (default: 4)")


def parse_bands(text: str | None) -> list[int] | None:
    """``--bands 4,3,2`` -> [4, 3, 2] (1-based), or None; a one-line error for anything else."""
    from ..errors import IdgbrError

    if text is None:
        return None
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise IdgbrError(f"--bands {text!r}: expected 1-based band numbers separated by commas, e.g. 3,2,1") from None


def run(args: argparse.Namespace) -> int:
    from ..errors import IdgbrError

    single, folder = args.image is not None, args.data is not None
    if single == folder:
        raise IdgbrError("give either --image PATH --coarse PATH --out PATH, or --data DATA --coarse NAME")
    if args.coarse is None:
        raise IdgbrError("--coarse is required (a coarse map file, or a NAME under DATA/coarse/ in folder mode)")
    if single and args.out is None:
        raise IdgbrError("--out PATH is required with --image")

    import torch

    from ..inference.pipeline import Refiner

    model = args.model if args.model is not None else _default_model(args)
    refiner = Refiner.from_pretrained(model, device=args.device)
    kw = dict(steps=args.steps, guidance=args.guidance, strength=args.strength, batch_size=args.batch, tta=args.tta,
              sieve=args.sieve, flip_margin=args.flip_margin, area_match=args.area_match, class_reach=args.class_reach)
    if folder:
        out = Path(args.out) if args.out else Path(args.data) / "refined" / (Path(model).resolve() if Path(model).exists() else Path(model)).name
        written = refiner.refine_folder(args.data, args.split, args.coarse, out, seed=args.seed,
                                        skip_existing=args.skip_existing, progress=not args.no_progress,
                                        samples=args.samples, noise_scale=args.noise_scale, **kw)
        print(f"wrote {len(written)} maps to {out}")
        return 0
    if _scene_mode(args, refiner.config.tile_size):
        return _run_scene(args, refiner)
    image, geo = _read_inputs(args, refiner.config.num_classes, refiner.config.image_channels)
    refined = refiner.refine(image[0], image[1], generator=torch.Generator().manual_seed(args.seed),
                             noise_scale=args.noise_scale, **kw)
    from ..data.io import write_label

    write_label(args.out, refined, geo, nodata=255 if geo else None)
    print(f"wrote {args.out}")
    return 0


def _default_model(args: argparse.Namespace) -> str:
    """The shipped refiner, when the data's classes fit it; else a one-line error that says how to train one."""
    from ..nn.zoo import shipped_refiner

    return shipped_refiner(coarse=None if args.data is not None else Path(args.coarse), data=args.data, split=args.split)


SCENE_OPTIONS = ("tile", "overlap", "samples", "gate", "confidence", "bands")


def _scene_mode(args: argparse.Namespace, tile_size: int) -> bool:
    """Scene mode for GeoTIFF images, images larger than one tile, or any scene option; never for .npy coarse."""
    from ..errors import IdgbrError
    from ..data.io import is_geotiff

    options = [name for name in SCENE_OPTIONS if getattr(args, name) is not None] + (["no_resume"] if args.no_resume else [])
    if Path(args.coarse).suffix.lower() == ".npy":
        if options:
            raise IdgbrError(f"{args.coarse}: scene options ({', '.join('--' + o.replace('_', '-') for o in options)}) need a "
                             "raster coarse map; save the probabilities as a K-band float32 GeoTIFF")
        return False
    if options or is_geotiff(args.image):
        return True
    from ..data.io import read_image

    image, _ = read_image(args.image)
    return max(image.shape[:2]) > tile_size


def _run_scene(args: argparse.Namespace, refiner) -> int:
    from ..inference.scene import refine_scene

    bands = parse_bands(args.bands)
    summary = refine_scene(refiner, args.image, args.coarse, args.out, tile=args.tile, overlap=args.overlap,
                           steps=args.steps, guidance=args.guidance, strength=args.strength, seed=args.seed,
                           samples=args.samples or 1, gate_width=args.gate, confidence=args.confidence,
                           batch_size=args.batch, bands=bands, resume=not args.no_resume, progress=not args.no_progress,
                           noise_scale=args.noise_scale, tta=args.tta, sieve=args.sieve,
                           flip_margin=args.flip_margin, area_match=args.area_match, class_reach=args.class_reach)
    extra = f" and {summary['uncertainty']}" if summary["uncertainty"] else ""
    print(f"wrote {summary['out']}{extra}: {summary['tiles']} tiles, {summary['computed']} computed now, "
          f"{summary['done_before']} resumed, {100 * summary['skipped_fraction']:.1f}% skipped "
          f"({summary['skipped_nodata']} nodata, {summary['skipped_gate']} gated), {summary['seconds']:.1f} s")
    return 0


def _read_inputs(args: argparse.Namespace, num_classes: int, channels: int):
    """((image (H, W, C), coarse (H, W) or (K, H, W)), geo) from the single-file arguments, checked against the
    model so that every error names the file."""
    import numpy as np

    from ..data.dataset import read_index_map, read_probs
    from ..errors import file_error
    from ..data.io import read_image

    image, geo = read_image(args.image)
    if image.shape[-1] != channels:
        raise file_error(args.image, f"{image.shape[-1]} band{'s' if image.shape[-1] != 1 else ''} but the model was "
                         f"trained on {channels}", f"give {channels}-band imagery like the training images")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise file_error(args.image, "contains NaN/inf pixels", "fill nodata first, or refine it as a GeoTIFF scene "
                         "(NaN pixels become nodata)")
    coarse_path = Path(args.coarse)
    if coarse_path.suffix.lower() == ".npy":
        coarse = read_probs(coarse_path, num_classes, image.shape[:2])
    else:
        coarse = read_index_map(coarse_path, num_classes, image.shape[:2])
    return (image, coarse), geo
