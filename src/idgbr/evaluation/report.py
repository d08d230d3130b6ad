"""Pictures and Markdown reports.

The comparison panel shows image | coarse | refined above ground truth | coarse errors | refined errors. Its error
pictures use colours no class uses: black where a map is wrong, and on the refined map's picture cyan where the
refiner fixed a coarse error and magenta where it broke a right coarse pixel. :func:`error_map` keeps the paper's
one-class convention (false negatives blue, false positives red, other errors yellow, ignored grey).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.dataset import IGNORE_INDEX

FN_COLOUR = (40, 90, 255)
FP_COLOUR = (235, 40, 40)
OTHER_ERROR_COLOUR = (250, 215, 60)


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    from ..data.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def palette(num_classes: int) -> np.ndarray:
    """A fixed, distinguishable (K+1, 3) uint8 palette; the last row is for ignore/nodata."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    colours = (np.array([cmap(i % cmap.N)[:3] for i in range(num_classes)]) * 255).astype(np.uint8)
    return np.vstack([colours, np.zeros((1, 3), np.uint8)])


def colourise(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) index map -> (H, W, 3) uint8 colours; ignore pixels are black."""
    pal = palette(num_classes)
    index = np.where(label == IGNORE_INDEX, num_classes, np.minimum(label, num_classes))
    return pal[index]


def error_map(gt: np.ndarray, pred: np.ndarray, positive: int) -> np.ndarray:
    """(H, W, 3) uint8 error picture for class ``positive``: white where correct, blue for its false negatives,
    red for its false positives, yellow for other errors, grey for ignored pixels."""
    out = np.full(gt.shape + (3,), 255, np.uint8)
    valid = gt != IGNORE_INDEX
    out[~valid] = (200, 200, 200)
    out[valid & (gt != pred)] = OTHER_ERROR_COLOUR
    out[valid & (gt == positive) & (pred != positive)] = FN_COLOUR
    out[valid & (gt != positive) & (pred == positive)] = FP_COLOUR
    return out


def to_display(image: np.ndarray) -> np.ndarray:
    """(H, W, C) image of any dtype -> (H, W, 3) uint8 for display (first 3 bands, 2-98 % stretch if not uint8)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] < 3:
        image = np.repeat(image[..., :1], 3, axis=-1)
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float32)
    lo, hi = np.percentile(image, [2, 98])
    return (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


# The demo panel's error pictures use only black, white, grey and two saturated colours that no class of the
# tab10/tab20 palette uses, so an error colour never reads as a class.
WRONG_COLOUR = (0, 0, 0)
FIXED_COLOUR = (0, 255, 255)  # coarse wrong, refined right
BROKEN_COLOUR = (255, 0, 255)  # coarse right, refined wrong
IGNORED_COLOUR = (200, 200, 200)


def change_map(gt: np.ndarray, coarse: np.ndarray, pred: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: white where ``coarse`` is right, black where it is wrong, grey where ignored. With ``pred``
    (the refined map) the picture is ``pred``'s errors instead, and the pixels the refinement changed are coloured:
    cyan where it fixed a coarse error, magenta where it broke a right coarse pixel."""
    valid = gt != IGNORE_INDEX
    shown = coarse if pred is None else pred
    out = np.full(gt.shape + (3,), 255, np.uint8)
    out[valid & (shown != gt)] = WRONG_COLOUR
    if pred is not None:
        out[valid & (coarse != gt) & (pred == gt)] = FIXED_COLOUR
        out[valid & (coarse == gt) & (pred != gt)] = BROKEN_COLOUR
    out[~valid] = IGNORED_COLOUR
    return out


def comparison_panel(path: str | Path, image: np.ndarray, gt: np.ndarray, coarse: np.ndarray, refined: np.ndarray,
                     num_classes: int, title: str = "", max_side: int = 640, focus_class: int = 1,
                     class_names: Sequence[str] | None = None) -> Path:
    """Save a 2 x 3 PNG: image | coarse | refined above ground truth | coarse errors | refined errors, with a legend of
    the class colours (by name) and of the error colours underneath. The error pictures are :func:`change_map`'s
    (black: wrong; cyan: fixed by the refiner; magenta: broken by it); ``focus_class`` is accepted for older
    callers and unused (the paper's one-class picture is :func:`error_map`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    step = max(1, int(np.ceil(max(gt.shape) / max_side)))
    sl = (slice(None, None, step), slice(None, None, step))
    names = list(class_names) if class_names else [f"class {i}" for i in range(num_classes)]
    valid = gt != IGNORE_INDEX
    total = max(int(valid.sum()), 1)

    def accuracy(pred: np.ndarray) -> str:
        return f"{100 * float((pred[valid] == gt[valid]).sum()) / total:.1f} % correct"

    fixed = 100 * float((valid & (coarse != gt) & (refined == gt)).sum()) / total
    broken = 100 * float((valid & (coarse == gt) & (refined != gt)).sum()) / total
    tiles = [
        ("image", to_display(image)[sl]),
        (f"coarse map ({accuracy(coarse)})", colourise(coarse, num_classes)[sl]),
        (f"refined map ({accuracy(refined)})", colourise(refined, num_classes)[sl]),
        ("ground truth", colourise(gt, num_classes)[sl]),
        ("coarse map's errors (black)", change_map(gt, coarse)[sl]),
        (f"refined map's errors: fixed {fixed:.1f} %, broken {broken:.1f} %", change_map(gt, coarse, refined)[sl]),
    ]
    height, width = tiles[0][1].shape[:2]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8 * height / max(width, 1) + 2.6), layout="constrained")
    for ax, (name, picture) in zip(axes.ravel(), tiles):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=10)
    colours = palette(num_classes) / 255.0
    classes = [Patch(facecolor=colours[i], edgecolor="0.3", label=names[i]) for i in range(num_classes)]
    classes.append(Patch(facecolor="black", edgecolor="0.3", label="nodata / ignored"))
    rgb = lambda colour: np.array(colour) / 255  # noqa: E731
    errors = [Patch(facecolor=rgb(WRONG_COLOUR), edgecolor="0.3", label="wrong"),
              Patch(facecolor="white", edgecolor="0.3", label="right"),
              Patch(facecolor=rgb(FIXED_COLOUR), edgecolor="0.3", label="fixed by the refiner (coarse was wrong)"),
              Patch(facecolor=rgb(BROKEN_COLOUR), edgecolor="0.3", label="broken by the refiner (coarse was right)"),
              Patch(facecolor=rgb(IGNORED_COLOUR), edgecolor="0.3", label="ignored")]
    fig.legend(handles=classes, loc="outside lower left", ncol=min(len(classes), 4), fontsize=9, title="map colours",
               frameon=False)
    fig.legend(handles=errors, loc="outside lower right", ncol=2, fontsize=9, title="error pictures", frameon=False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=80)


def bar_chart(path: str | Path, rows: dict[str, dict[str, float]], metrics: Sequence[str], title: str = "") -> Path:
    """Grouped bars (one group per metric, one bar per row name), values as percentages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    names = list(rows)
    x = np.arange(len(metrics))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics), 3.6))
    for i, name in enumerate(names):
        values = [100 * rows[name].get(m, np.nan) for m in metrics]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def flat_metrics(result: dict) -> dict[str, float]:
    """Pick the headline numbers of an ``evaluate_maps`` result: mIoU, mF1, OA, Kappa, WFm@1/3/5, boundary F@1/3/5
    (``bf1``...) and the connected components per ground-truth component (``components_ratio``), where present."""
    out = {k: float(result[k]) for k in ("miou", "mf1", "oa", "kappa", "components_ratio") if k in result}
    for tol, value in result.get("wfm", {}).items():
        out[f"wfm{tol}"] = float(value)
    for tol, value in result.get("bf", {}).items():
        out[f"bf{tol}"] = float(value["f"])
    return out


def metrics_table(rows: dict[str, dict], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """A Markdown table, one row per named result, values in percent with 2 decimals."""
    columns = columns or [("miou", "mIoU"), ("mf1", "mF1"), ("oa", "OA"), ("kappa", "Kappa"),
                          ("wfm1", "WFm 1px"), ("wfm3", "WFm 3px"), ("wfm5", "WFm 5px"), ("bf3", "boundary F 3px")]
    lines = ["| | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, result in rows.items():
        flat = flat_metrics(result) if "wfm" in result else result
        cells = [f"{100 * flat[key]:.2f}" if key in flat and flat[key] == flat[key] else "–" for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
