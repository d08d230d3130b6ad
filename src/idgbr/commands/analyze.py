"""``idgbr analyze wiener|frequency``: the paper's frequency analyses (§III-B, Figs. 1 and 3)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser("analyze", help="frequency analyses of the diffusion refiner (paper Figs. 1 and 3)",
                            description=__doc__)
    inner = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    wiener = inner.add_parser("wiener", help="plot the normalised |H*_t(f)| of the optimal (Wiener) denoiser")
    wiener.add_argument("--data", required=True, help="a prepared dataset (its label maps give S(f))")
    wiener.add_argument("--split", default="train")
    wiener.add_argument("--images", type=int, default=8, help="label maps used for the spectrum")
    wiener.add_argument("--schedule", default="linear", choices=("linear", "scaled_linear"))
    wiener.add_argument("--timesteps", type=int, nargs="+", default=[999, 750, 500, 250, 100, 10])
    wiener.add_argument("--out", default="out/analysis")
    wiener.set_defaults(func=run_wiener)

    freq = inner.add_parser("frequency", help="low/high-frequency content along the denoising trajectory")
    freq.add_argument("--model", required=True, help="a refiner run directory")
    freq.add_argument("--data", required=True)
    freq.add_argument("--split", default="test")
    freq.add_argument("--coarse", required=True, help="coarse-map folder name under DATA/coarse/")
    freq.add_argument("--samples", type=int, default=2)
    freq.add_argument("--steps", type=int, default=25)
    freq.add_argument("--size", type=int, default=256, help="centre crop analysed (pixels)")
    freq.add_argument("--cutoff", type=float, default=0.1, help="low/high split, fraction of Nyquist")
    freq.add_argument("--seed", type=int, default=0)
    freq.add_argument("--out", default="out/analysis")
    freq.set_defaults(func=run_frequency)


def run_wiener(args) -> int:
    import numpy as np

    from ..evaluation.analysis import label_spectrum, plot_wiener, wiener_curves
    from ..nn.config import RefinerConfig
    from ..data.dataset import SegmentationDataset
    from ..data.io import atomic_path

    dataset = SegmentationDataset(args.data, args.split)
    labels = []
    for index in range(min(args.images, len(dataset))):
        mask = dataset.read_mask(dataset.stems[index])
        h, w = mask.shape
        side = min(h, w, 512)
        labels.append(mask[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side])
    freq, spectrum = label_spectrum(labels, dataset.classes.num_classes)
    scheduler = RefinerConfig(beta_schedule=args.schedule)
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(num_train_timesteps=scheduler.num_train_timesteps, beta_start=scheduler.beta_start,
                         beta_end=scheduler.beta_end, beta_schedule=args.schedule)
    curves = wiener_curves(ddim.alphas_cumprod.numpy(), args.timesteps, freq, spectrum)
    out = Path(args.out)
    png = plot_wiener(out / "wiener.png", freq, curves, f"Wiener filter of the {args.schedule} schedule, S(f) from {Path(args.data).name}")
    # the frequency at which each curve falls to one half: how much detail is recoverable at step t
    half = {t: float(freq[np.argmax(c < 0.5)]) if (c < 0.5).any() else 1.0 for t, c in curves.items()}
    with atomic_path(out / "wiener.json") as tmp:
        tmp.write_text(json.dumps({"half_power_frequency": half, "freq": freq.tolist(),
                                   "curves": {t: c.tolist() for t, c in curves.items()}}, indent=1))
    print(f"wrote {png}; |H*| falls to 1/2 at f = " + ", ".join(f"{f:.3f} (t={t})" for t, f in half.items()))
    return 0


def run_frequency(args) -> int:
    from ..evaluation.analysis import frequency_report

    result = frequency_report(args.model, args.data, args.split, args.coarse, Path(args.out), samples=args.samples,
                              steps=args.steps, size=args.size, cutoff=args.cutoff, seed=args.seed)
    print(result["summary"])
    return 0
