"""``idgbr evaluate``: score predicted index maps against a dataset split (mIoU, mF1, OA, Kappa, WFm, repair)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser("evaluate", help="score a prediction folder against a dataset split",
                            description=__doc__ + " Predictions are PRED/<stem>.png|.tif class-index maps.")
    parser.add_argument("--data", required=True, help="a prepared dataset folder (classes.json, masks/, splits/)")
    parser.add_argument("--pred", required=True, help="folder of predicted maps (or a name under DATA/coarse/)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--coarse", default=None,
                        help="coarse maps the predictions refine (folder or name under DATA/coarse/): adds the "
                             "coarse vs refined comparison and the repair analysis")
    parser.add_argument("--format", default="md", choices=("md", "json", "csv"), help="report format (default md)")
    parser.add_argument("--tolerances", type=int, nargs="+", default=[1, 3, 5], metavar="PX",
                        help="boundary-band widths for WFm (default 1 3 5)")
    parser.add_argument("--k", type=float, default=1.0, help="penalty k of IoU_imp = IoU_RFm - k (1 - IoU_RTm)")
    parser.add_argument("--gate", type=int, default=None, metavar="PX",
                        help="score the gated prediction: refined labels within PX of a coarse boundary, coarse "
                             "labels elsewhere (needs --coarse)")
    parser.add_argument("--sieve", type=int, default=0, metavar="PX",
                        help="score the maps with regions smaller than PX pixels merged into their largest neighbour "
                             "(what 'idgbr refine --sieve PX' writes; default 0: as they are)")
    parser.add_argument("--out", default=None, help="write the report to this file instead of stdout")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.evaluate import FORMATTERS, evaluate_folder, format_markdown
    from ..data.io import atomic_path

    result = evaluate_folder(args.data, args.pred, args.split, coarse_dir=args.coarse,
                             tolerances=args.tolerances, k=args.k, progress=sys.stderr.isatty(),
                             gate_width=args.gate, sieve=args.sieve)
    if args.format == "md":
        text = format_markdown(result, f"Evaluation of {Path(args.pred).name} ({args.split})")
    else:
        text = FORMATTERS[args.format](result)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
