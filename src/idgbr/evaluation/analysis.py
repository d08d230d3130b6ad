"""The paper's frequency analyses (§III-B, Figs. 1 and 3).

*Wiener view.* The forward process is z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps. For a stationary signal with power
spectrum S(f), the linear MMSE (Wiener) estimate of z_0 from z_t has the transfer function

    H*_t(f) = sqrt(a_t) S(f) / (a_t S(f) + 1 - a_t),

so at large t (small a_t) only the strong low-frequency components pass and the high frequencies — the boundaries
of a label map — are restored only in the last steps. ``wiener_curves`` computes |H*_t(f)| normalised by its
maximum for several t, with S(f) measured from real label maps (radially averaged) or a power law.

*Trajectory view.* ``trajectory_spectra`` follows the sampler from z_T to z_0, decodes the predicted clean map at
each step and splits its Fourier energy into low and high frequencies (radius below/above ``cutoff`` of Nyquist).
It reports, per stage of the trajectory, the fraction of the total change of each band — for the diffusion refiner
and, as a reference point, for the coarse map itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def radial_profile(power: np.ndarray, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Radially average a centred 2-D power spectrum; returns (normalised frequency in [0, 1], mean power)."""
    h, w = power.shape
    yy, xx = np.indices((h, w))
    radius = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)) / np.sqrt(2)
    index = np.minimum((radius * bins).astype(int), bins - 1)
    total = np.bincount(index.ravel(), power.ravel(), minlength=bins)
    count = np.maximum(np.bincount(index.ravel(), minlength=bins), 1)
    freq = (np.arange(bins) + 0.5) / bins
    return freq, total / count


def power_spectrum(field: np.ndarray) -> np.ndarray:
    """Centred power spectrum of a (C, H, W) or (H, W) field (summed over channels, mean removed)."""
    field = np.asarray(field, dtype=np.float64)
    if field.ndim == 2:
        field = field[None]
    field = field - field.mean(axis=(1, 2), keepdims=True)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(field), axes=(1, 2))) ** 2
    return spectrum.sum(axis=0)


def band_energy(field: np.ndarray, cutoff: float = 0.1) -> tuple[float, float]:
    """(low, high) Fourier energy of a field, split at ``cutoff`` x Nyquist (radially)."""
    power = power_spectrum(field)
    h, w = power.shape
    yy, xx = np.indices((h, w))
    radius = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    low = float(power[radius < cutoff].sum())
    return low, float(power[radius >= cutoff].sum())


def band_split(field: np.ndarray, cutoff: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Low-pass and high-pass parts of a (C, H, W) field (ideal radial filter at ``cutoff`` x Nyquist)."""
    field = np.asarray(field, dtype=np.float64)
    h, w = field.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None] * 2
    fx = np.fft.fftfreq(w)[None, :] * 2
    mask = np.hypot(fy, fx) < cutoff
    spectrum = np.fft.fft2(field)
    low = np.real(np.fft.ifft2(spectrum * mask))
    return low, field - low


def label_spectrum(labels: Iterable[np.ndarray], num_classes: int, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean radial power spectrum of label maps as +-1 one-hot fields, per channel and per pixel.

    Normalised by the pixel count (Parseval), so unit-variance white noise has power 1 at every frequency: the
    scale in which the forward process adds noise of power 1 - a_t.
    """
    profiles = []
    for label in labels:
        onehot = np.stack([(label == k).astype(np.float64) * 2 - 1 for k in range(num_classes)])
        freq, profile = radial_profile(power_spectrum(onehot) / (label.size * num_classes), bins)
        profiles.append(profile)
    return freq, np.mean(profiles, axis=0)


def wiener_curves(alphas_cumprod: np.ndarray, timesteps: Sequence[int], freq: np.ndarray, spectrum: np.ndarray
                  ) -> dict[int, np.ndarray]:
    """|H*_t(f)| / max_f |H*_t(f)| for each t (see the module docstring)."""
    curves = {}
    for t in timesteps:
        a = float(alphas_cumprod[t])
        h = np.sqrt(a) * spectrum / (a * spectrum + (1 - a))
        curves[int(t)] = h / h.max()
    return curves


def plot_wiener(path: str | Path, freq: np.ndarray, curves: dict[int, np.ndarray], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for t, curve in sorted(curves.items(), reverse=True):
        ax.plot(freq, curve, label=f"t = {t}")
    ax.set_xscale("log")
    ax.set_xlabel("normalised spatial frequency")
    ax.set_ylabel("normalised |H*_t(f)|")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def change_fractions(fields: Sequence[np.ndarray], cutoff: float = 0.1) -> dict[str, list[float]]:
    """For successive states of a field, the fraction of the total low/high-frequency change made in each stage."""
    lows, highs = zip(*(band_split(f, cutoff) for f in fields))
    out = {}
    for name, parts in (("low", lows), ("high", highs)):
        steps = [float(np.linalg.norm(b - a)) for a, b in zip(parts[:-1], parts[1:])]
        total = sum(steps) or 1.0
        out[name] = [s / total for s in steps]
    return out


def plot_trajectory(path: str | Path, timesteps: Sequence[int], energies: dict[str, list[tuple[float, float]]],
                    title: str) -> Path:
    """Low/high-frequency energy of the predicted map along the trajectory, one line pair per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, values in energies.items():
        low, high = np.array(values).T
        xs = list(timesteps)[: len(low)] if len(low) == len(timesteps) else np.arange(len(low))
        style = "--" if name.startswith("coarse") else "-"
        axes[0].plot(xs, low, style, label=name)
        axes[1].plot(xs, high, style, label=name)
    for ax, band in zip(axes, ("low", "high")):
        ax.set_xlabel("timestep t (sampling runs right to left)")
        ax.set_ylabel(f"{band}-frequency energy")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def frequency_report(model_dir: str | Path, data_root: str | Path, split: str, coarse: str, out: Path,
                     samples: int = 2, steps: int = 25, size: int = 256, cutoff: float = 0.1, seed: int = 0) -> dict:
    """Run the refiner from pure noise on centre crops, record the predicted clean map at every step, and write
    ``frequency.png`` / ``frequency.json``: low/high-frequency energy along the trajectory for the refiner's
    prediction and for the coarse map, and the fraction of each band's change made in the stages
    z_T -> z_~500 -> z_0."""
    import json

    import torch

    from ..data.dataset import SegmentationDataset
    from ..data.io import atomic_path
    from ..inference.pipeline import Refiner

    refiner = Refiner.from_pretrained(model_dir)
    model = refiner.model
    dataset = SegmentationDataset(data_root, split, coarse=coarse)
    num_classes = dataset.classes.num_classes
    energies: dict[str, list[tuple[float, float]]] = {}
    fractions = []
    timesteps: list[int] = []
    for index in range(min(samples, len(dataset))):
        sample = dataset[index]
        h, w = sample["mask"].shape
        side = min(size, h, w) // model.config.size_multiple * model.config.size_multiple
        top, left = (h - side) // 2, (w - side) // 2
        crop = (slice(top, top + side), slice(left, left + side))
        states: list[np.ndarray] = []
        steps_seen: list[int] = []

        def record(step: int, t: int, x0: torch.Tensor) -> None:
            with torch.no_grad():
                probs = model.decode_logits(x0).softmax(1)[0].numpy()
            states.append(probs * 2 - 1)
            steps_seen.append(int(t))

        generator = torch.Generator().manual_seed(seed)
        refiner.refine(sample["image"][crop], sample["coarse"][crop], steps=steps, guidance=1.0, strength=1.0,
                       generator=generator, callback=record)
        timesteps = steps_seen
        coarse_onehot = np.stack([(sample["coarse"][crop] == k) * 2.0 - 1 for k in range(num_classes)])
        energies.setdefault(f"refiner (sample {index})", []).extend(band_energy(s, cutoff) for s in states)
        energies[f"coarse map (sample {index})"] = [band_energy(coarse_onehot, cutoff)] * len(states)
        middle = int(np.argmin([abs(t - 500) for t in steps_seen]))
        fractions.append(change_fractions([states[0], states[middle], states[-1]], cutoff))
    stage_share = {band: np.mean([f[band] for f in fractions], axis=0).tolist() for band in ("low", "high")}
    png = plot_trajectory(out / "frequency.png", timesteps, energies,
                          f"predicted map along the trajectory ({steps} DDIM steps, cutoff {cutoff} Nyquist)")
    result = {"timesteps": timesteps, "energies": energies, "change_fraction_T_to_500_to_0": stage_share}
    with atomic_path(out / "frequency.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    result["summary"] = (f"wrote {png}; share of change in z_T->z_500 vs z_500->z_0: low "
                         f"{stage_share['low'][0]:.2f}/{stage_share['low'][1]:.2f}, high "
                         f"{stage_share['high'][0]:.2f}/{stage_share['high'][1]:.2f}")
    return result
