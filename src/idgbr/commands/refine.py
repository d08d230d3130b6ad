"""``idgbr refine``: one image (``--image/--coarse/--out``) or a dataset split (``--data/--split/--coarse``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser(
        "refine", help="refine coarse maps with a trained refiner",
        description="Refine one image (--image PATH --coarse PATH --out PATH) or every image of a dataset split "
                    "(--data DATA --split test --coarse NAME, writing DATA/refined/<run>/<stem>.png).")
    parser.add_argument("--model", required=True, metavar="RUN", help="run (or checkpoint) folder of 'idgbr train'")
    parser.add_argument("--image", default=None, help="single-file mode: the image (PNG/JPEG/TIF)")
    parser.add_argument("--coarse", default=None,
                        help="single-file mode: coarse index map (PNG/TIF) or (K, H, W) .npy probabilities; "
                             "folder mode: NAME under DATA/coarse/")
    parser.add_argument("--out", default=None, help="output map (single file) or folder (default: DATA/refined/<run>)")
    parser.add_argument("--data", default=None, help="folder mode: canonical dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="folder mode split (default: test)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's, 25)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale, 1 = off (default: the model's, 3)")
    parser.add_argument("--strength", type=float, default=None, help="SDEdit strength in (0, 1] (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--batch", type=int, default=4, help="tiles per network batch (default: 4)")
    parser.add_argument("--skip-existing", action="store_true", help="folder mode: keep maps already written")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


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

    from ..pipeline import Refiner

    refiner = Refiner.from_pretrained(args.model)
    kw = dict(steps=args.steps, guidance=args.guidance, strength=args.strength, batch_size=args.batch)
    if folder:
        out = Path(args.out) if args.out else Path(args.data) / "refined" / Path(args.model).resolve().name
        written = refiner.refine_folder(args.data, args.split, args.coarse, out, seed=args.seed,
                                        skip_existing=args.skip_existing, progress=not args.no_progress, **kw)
        print(f"wrote {len(written)} maps to {out}")
        return 0
    image, geo = _read_inputs(args, refiner.config.num_classes)
    refined = refiner.refine(image[0], image[1], generator=torch.Generator().manual_seed(args.seed), **kw)
    from ..io import write_label

    write_label(args.out, refined, geo, nodata=255 if geo else None)
    print(f"wrote {args.out}")
    return 0


def _read_inputs(args: argparse.Namespace, num_classes: int):
    """((image (H, W, C), coarse (H, W) or (K, H, W)), geo) from the single-file arguments."""
    import numpy as np

    from ..data import read_index_map
    from ..errors import file_error
    from ..io import read_image

    image, geo = read_image(args.image)
    coarse_path = Path(args.coarse)
    if coarse_path.suffix.lower() == ".npy":
        if not coarse_path.exists():
            raise file_error(coarse_path, "file not found", "check the path")
        try:
            coarse = np.load(coarse_path, allow_pickle=False)
        except ValueError as exc:
            raise file_error(coarse_path, f"unreadable .npy ({exc})", "save a float (K, H, W) array with numpy.save") from None
        if coarse.ndim != 3 or coarse.shape[1:] != image.shape[:2] or coarse.dtype.kind != "f":
            raise file_error(coarse_path, f"expected float probabilities ({num_classes}, {image.shape[0]}, {image.shape[1]}), "
                             f"got {coarse.dtype} {coarse.shape}", "save class probabilities of the image's size")
    else:
        coarse = read_index_map(coarse_path, num_classes, image.shape[:2])
    return (image, coarse), geo
