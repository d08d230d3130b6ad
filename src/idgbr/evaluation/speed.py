"""Fast refinement, measured (issue 6): network evaluations, seconds per tile and boundary quality per schedule.

The reference schedule is the paper's: 25 DDIM steps from pure noise with classifier-free guidance 3 (50 network
evaluations per tile). Every cell of the grid steps x strength x CFG is run on the *same* tiles in one process and
compared with it: WFm/mIoU, and the share of the reference's WFm gain over the coarse map that the cell keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REFERENCE = (25, 1.0, 3.0)  # steps, strength, guidance
FAST_DEFAULT = (2, 0.4, 1.0)


@dataclass
class Cell:
    steps: int
    strength: float
    guidance: float
    nfe: float = 0.0
    seconds_per_tile: float = 0.0
    wfm3: float = 0.0
    miou: float = 0.0
    gain_kept: float = float("nan")


def collect_tiles(data_root: str | Path, split: str, coarse: str, tile: int, count: int, seed: int = 0):
    """Up to ``count`` (image, gt, coarse) crops of ``tile``² taken at random from the split's images."""
    from ..data.dataset import SegmentationDataset

    dataset = SegmentationDataset(data_root, split, coarse=coarse)
    rng = np.random.default_rng(seed)
    tiles = []
    per_image = max(1, int(np.ceil(count / len(dataset))))
    for index in range(len(dataset)):
        sample = dataset[index]
        h, w = sample["mask"].shape
        for _ in range(per_image):
            if len(tiles) == count:
                return tiles
            th, tw = min(tile, h), min(tile, w)
            top, left = rng.integers(0, h - th + 1), rng.integers(0, w - tw + 1)
            crop = (slice(top, top + th), slice(left, left + tw))
            tiles.append((sample["image"][crop], sample["mask"][crop], sample["coarse"][crop]))
    return tiles


def run_grid(refiner, tiles, steps_grid: Sequence[int] = (25, 10, 4, 2, 1),
             strength_grid: Sequence[float] = (1.0, 0.6, 0.3), guidance_grid: Sequence[float] = (3.0, 1.0),
             seed: int = 0, log: Callable[[str], None] = print) -> tuple[dict, list[Cell]]:
    """Run every cell on the same tiles; returns (coarse metrics, cells). The reference cell is always included."""
    import torch

    from ..metrics import evaluate_maps

    num_classes = refiner.config.num_classes
    coarse_metrics = evaluate_maps([(gt, c) for _, gt, c in tiles], num_classes, tolerances=(3,))
    grid = [(s, st, g) for s in steps_grid for st in strength_grid for g in guidance_grid]
    if REFERENCE not in grid:
        grid.insert(0, REFERENCE)
    cells = []
    for steps, strength, guidance in grid:
        preds, nfe = [], 0
        start = time.perf_counter()
        for image, _, coarse in tiles:
            preds.append(refiner.refine(image, coarse, steps=steps, strength=strength, guidance=guidance,
                                        generator=torch.Generator().manual_seed(seed)))
            nfe += refiner.last_nfe
        seconds = (time.perf_counter() - start) / len(tiles)
        result = evaluate_maps([(gt, p) for (_, gt, _), p in zip(tiles, preds)], num_classes, tolerances=(3,))
        cell = Cell(steps, strength, guidance, nfe / len(tiles), seconds, result["wfm"]["3"], result["miou"])
        cells.append(cell)
        log(f"steps {steps:2d} strength {strength:.1f} guidance {guidance:.0f}: {cell.nfe:4.1f} NFE/tile, "
            f"{seconds:.3f} s/tile, WFm3 {100 * cell.wfm3:.2f}, mIoU {100 * cell.miou:.2f}")
    reference = next(c for c in cells if (c.steps, c.strength, c.guidance) == REFERENCE)
    ref_gain = reference.wfm3 - coarse_metrics["wfm"]["3"]
    for cell in cells:
        if ref_gain > 1e-9:  # a share of a loss means nothing
            cell.gain_kept = (cell.wfm3 - coarse_metrics["wfm"]["3"]) / ref_gain
    return coarse_metrics, cells


def pick_fast_mode(cells: Sequence[Cell], reference_nfe: float, min_keep: float = 0.9) -> Cell | None:
    """The fastest cell with >= 10x fewer NFE than the reference that keeps >= ``min_keep`` of its WFm gain."""
    ok = [c for c in cells if c.nfe * 10 <= reference_nfe and c.gain_kept == c.gain_kept and c.gain_kept >= min_keep]
    return min(ok, key=lambda c: (c.nfe, c.seconds_per_tile)) if ok else None


def markdown_table(coarse: dict, cells: Sequence[Cell], title: str) -> str:
    lines = [f"### {title}", "",
             f"Coarse map on these tiles: WFm(3px) {100 * coarse['wfm']['3']:.2f}, mIoU {100 * coarse['miou']:.2f}.", "",
             "| steps | strength | CFG | NFE/tile | s/tile | WFm 3px | mIoU | share of reference WFm gain |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        kept = f"{100 * c.gain_kept:.0f} %" if c.gain_kept == c.gain_kept else "–"
        lines.append(f"| {c.steps} | {c.strength:.1f} | {c.guidance:g} | {c.nfe:.0f} | {c.seconds_per_tile:.3f} | "
                     f"{100 * c.wfm3:.2f} | {100 * c.miou:.2f} | {kept} |")
    return "\n".join(lines)
