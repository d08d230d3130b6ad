"""A trained refiner must improve a map: the lite preset, trained for a fixed small budget through the real
training loop on a synthetic task whose right answer is known, moves shifted boundaries back onto the image edges.

The task: scenes of flat-coloured blobs on a background (three classes, mild sensor noise); the coarse map is the
ground truth shifted by 3 px, so every error sits on a boundary that the image shows. The refiner trains on the
train scenes (their shifted maps as coarse maps) and refines held-out scenes; the refined WFm(3 px) must beat the
coarse one by ``MIN_GAIN``.

``MIN_GAIN`` was set from five seeds (the numbers are beside it): half the smallest gain measured, and well above
what a broken training step gives (the loss detached before backward: the lite refiner stays the identity on the
coarse map, gain exactly 0). Budget: 500 steps of 64² crops, ~35 s on one idle core.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from idgbr.nn.config import RefinerConfig
from idgbr.data.io import write_label

torch.set_num_threads(1)  # shared CI box: one thread per test process

SIZE = 64
SHIFT = 3
CLASSES = 3
COLOURS = np.array([[150, 140, 110], [200, 200, 205], [40, 110, 60]], np.float32)  # land, roof, vegetation
# Refined minus coarse WFm(3 px). Measured (issue 23, 500 steps, 1 thread) for seeds 0-4 (data and training):
# +0.143, +0.148, +0.116, +0.138, +0.101; with the loss detached before backward: +0.000 (the identity).
MIN_GAIN = 0.05
SEED = int(os.environ.get("IDGBR_LEARNS_SEED", "0"))  # to re-measure the margin: IDGBR_LEARNS_SEED=1 pytest -s ...


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image (S, S, 3) uint8, mask (S, S) uint8): rectangles and ellipses of classes 1 and 2 on class 0."""
    import cv2

    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(int(rng.integers(3, 6))):
        cls = int(rng.integers(1, CLASSES))
        cx, cy = (int(v) for v in rng.integers(8, SIZE - 8, 2))
        if rng.random() < 0.5:
            h, w = (int(v) for v in rng.integers(6, 18, 2))
            mask[max(0, cy - h // 2):cy + h // 2, max(0, cx - w // 2):cx + w // 2] = cls
        else:
            axes = tuple(int(v) for v in rng.integers(4, 10, 2))
            cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, cls, -1)
    image = COLOURS[mask] + rng.normal(0, 8, (SIZE, SIZE, 3))
    return image.clip(0, 255).astype(np.uint8), mask


def _shifted(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask shifted by SHIFT px along a random axis and direction (edges repeated, not wrapped)."""
    axis, sign = int(rng.integers(0, 2)), int(rng.choice([-1, 1]))
    out = np.roll(mask, sign * SHIFT, axis=axis)
    edge = [slice(None), slice(None)]
    edge[axis] = slice(0, SHIFT) if sign > 0 else slice(-SHIFT, None)
    src = [slice(None), slice(None)]
    src[axis] = slice(SHIFT, SHIFT + 1) if sign > 0 else slice(-SHIFT - 1, -SHIFT)
    out[tuple(edge)] = out[tuple(src)]
    return out


def make_task(root: Path, train: int = 6, test: int = 4, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder in ("images", "masks", "splits", "coarse/shifted"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    stems = [f"s{i}" for i in range(train + test)]
    for stem in stems:
        image, mask = _scene(rng)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        write_label(root / "masks" / f"{stem}.png", mask)
        write_label(root / "coarse" / "shifted" / f"{stem}.png", _shifted(mask, rng))
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": n, "value": i} for i, n in
                                                               enumerate(("land", "roof", "vegetation"))]}))
    (root / "splits" / "train.txt").write_text("\n".join(stems[:train]) + "\n")
    (root / "splits" / "test.txt").write_text("\n".join(stems[train:]) + "\n")
    return root


def train_and_score(root: Path, run: Path, seed: int, **overrides) -> tuple[float, float]:
    """(coarse, refined) WFm(3 px) on the test split after training lite on the train split."""
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.metrics import evaluate_maps
    from idgbr.inference.pipeline import Refiner
    from idgbr.training.loop import train_refiner

    config = RefinerConfig.preset_config(
        "lite", steps=500, crop_size=SIZE, tile_size=SIZE, tile_overlap=0, batch_size=4, lr=1e-3, coarse_corruption=0.0,
        embed_steps=150, seed=seed, checkpoint_every=10_000, prefetch=0, **overrides)
    train_refiner(config, root, "shifted", run, progress=False, log_every=50)
    refiner = Refiner.from_pretrained(run)
    dataset = SegmentationDataset(root, "test", coarse="shifted")
    pairs = []
    for index in range(len(dataset)):
        sample = dataset[index]
        refined = refiner.refine(sample["image"], sample["coarse"], generator=torch.Generator().manual_seed(0))
        pairs.append((sample["mask"], refined, sample["coarse"]))
    result = evaluate_maps(pairs, CLASSES, tolerances=(3,))
    return result["coarse"]["wfm"]["3"], result["wfm"]["3"]


def test_trained_lite_refiner_fixes_shifted_boundaries(tmp_path: Path) -> None:
    root = make_task(tmp_path / "data", seed=SEED)
    coarse, refined = train_and_score(root, tmp_path / "run", SEED)
    print(f"seed {SEED}: coarse WFm3 {coarse:.4f} refined {refined:.4f} gain {refined - coarse:+.4f}")
    assert refined - coarse > MIN_GAIN, (coarse, refined)
