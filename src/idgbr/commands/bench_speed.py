"""``idgbr bench-speed --model RUN --data DATA --coarse NAME``: NFE, s/tile and quality per sampling schedule."""

from __future__ import annotations

from pathlib import Path

from ..nn.device import add_device_argument


def register(sub) -> None:
    parser = sub.add_parser("bench-speed", help="grid of steps x strength x CFG vs the paper's 25-step CFG-3 schedule",
                            description=__doc__)
    parser.add_argument("--model", required=True, metavar="RUN")
    parser.add_argument("--data", required=True)
    parser.add_argument("--coarse", required=True, metavar="NAME", help="coarse maps under DATA/coarse/NAME")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tile", type=int, default=512, help="tile side in pixels (default 512)")
    parser.add_argument("--tiles", type=int, default=8, help="number of tiles (default 8)")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 10, 4, 2, 1])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.6, 0.3])
    parser.add_argument("--guidances", type=float, nargs="+", default=[3.0, 1.0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tile-size", type=int, default=None, metavar="PX",
                        help="the refiner's own window size (default: the model's tile_size; a 512² tile in 256² "
                             "windows with 32 px overlap runs 9 of them)")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..data.io import atomic_path
    from ..inference.pipeline import Refiner
    from ..evaluation.speed import collect_tiles, markdown_table, pick_fast_mode, run_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    refiner = Refiner.from_pretrained(args.model, device=args.device)
    if args.tile_size:
        refiner.model.config = refiner.config.replace(tile_size=args.tile_size)
    tiles = collect_tiles(args.data, args.split, args.coarse, args.tile, args.tiles)
    coarse, cells = run_grid(refiner, tiles, args.steps, args.strengths, args.guidances)
    reference_nfe = next(c.nfe for c in cells if (c.steps, c.strength, c.guidance) == (25, 1.0, 3.0))
    fast = pick_fast_mode(cells, reference_nfe)
    table = markdown_table(coarse, cells, f"{len(tiles)} tiles of {args.tile}² from {Path(args.data).name}/{args.split}, "
                                          f"{torch.get_num_threads()} threads, windows of {refiner.config.tile_size}²")
    verdict = ("no cell keeps >= 90 % of the reference WFm gain with >= 10x fewer NFE" if fast is None else
               f"fast mode: steps={fast.steps} strength={fast.strength} guidance={fast.guidance:g} "
               f"({fast.nfe:.0f} NFE vs {reference_nfe:.0f}, {100 * fast.gain_kept:.0f} % of the gain)")
    print(table + "\n\n" + verdict)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n\n" + verdict + "\n")
    return 0
