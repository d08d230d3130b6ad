"""Issue 28, section 5.8: how much can any gate over the learners' proposals give on the validation tiles?

A gate keeps or rejects each pixel that a refined map changes (at the class reach 8) against the coarse map. Two
bounds and one trial, on the dumps of sections 5.4-5.6 (tiles 5 and 6, seeds 0 and 1; no retraining):

- **oracle gates** keep exactly the changes that are right (the ground truth decides), for the diffusion refiner's
  proposals, the control's, and the two together (per pixel whichever of the two is right, else the coarse label);
- **a learned gate**: a gradient-boosted classifier (scikit-learn) over per-pixel features (both learners'
  probabilities of the proposed and the coarse class, whether the other learner agrees, the distance to the coarse
  boundary, the share of changed pixels around it, the two classes), trained on one tile's changed pixels (both seeds,
  the four tracks) and applied to the other tile's: tile 5 gates tile 6 and tile 6 gates tile 5.

    python scripts/experiments/gate_ceiling.py --proposer refiner
    python scripts/experiments/gate_ceiling.py --proposer control
    python scripts/experiments/gate_ceiling.py --refiner 'p50/l2_t{tile}_s{s}'   # another refiner's dumps
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))
from area_match import TRACKS, load  # noqa: E402

RUNS = Path("runs")
# tile -> (the held-out run's data folder, the refiner's dumps, the control's dumps); {s} is the seed
TILES = {5: ("v30_base_t5_s0/data", "p30/t5_s{s}", "p31/ctl_t5_s{s}"),
         6: ("v32_base_t6_s0/data", "p32/base_t6_s{s}", "p32/ctl_t6_s{s}")}
REACH = 8


def distance_to_boundary(labels: np.ndarray) -> np.ndarray:
    from idgbr.metrics.boundary import label_edges

    return ndimage.distance_transform_edt(~label_edges(labels, ignore_index=None))


def images(tile: int, seed: int, track: str, proposer: str, refiner_dumps: str | None = None):
    """Per image: ground truth, coarse, proposal, the changed pixels, their features and who is right there (0: the
    proposal, 1: the coarse label, 2: neither), and the other learner's labels (for the joint oracle)."""
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.inference.postprocess import within_reach

    data, refiner, control = TILES[tile]
    refiner = refiner_dumps.replace("{tile}", str(tile)) if refiner_dumps else refiner
    dataset = SegmentationDataset(RUNS / data, "test")
    k = dataset.classes.num_classes
    mine, other = (refiner, control) if proposer == "refiner" else (control, refiner)
    others = {stem: p for stem, p, _, _ in load(RUNS / other.format(s=seed), track, dataset.stems)}
    for stem, probs, coarse, _ in load(RUNS / mine.format(s=seed), track, dataset.stems):
        gt = dataset.read_mask(stem)
        p = within_reach(probs, coarse, REACH)
        q = within_reach(others[stem], coarse, REACH)
        proposal, second = p.argmax(0).astype(np.uint8), q.argmax(0).astype(np.uint8)
        where = np.nonzero((proposal != coarse) & (coarse < k) & (gt < k))
        known = np.clip(coarse, 0, k - 1).astype(np.int64)[None]
        pick = lambda a, idx: np.take_along_axis(a, idx, 0)[0][where]  # noqa: E731
        proposed = proposal[None].astype(np.int64)
        density = ndimage.uniform_filter((proposal != coarse).astype(np.float32), 9)
        features = np.stack([pick(p, proposed), pick(p, known), pick(q, proposed), pick(q, known),
                             (second == proposal)[where], (second == coarse)[where],
                             distance_to_boundary(coarse)[where], density[where]]
                            + [proposal[where] == c for c in range(k)] + [coarse[where] == c for c in range(k)],
                            1).astype(np.float32)
        right = np.where(proposal[where] == gt[where], 0, np.where(coarse[where] == gt[where], 1, 2))
        yield gt, coarse, proposal, second, where, features, right, k


def learned_gate(tile: int, proposer: str, refiner_dumps: str | None = None):
    """A classifier trained on the other tile's changed pixels; keeps a change where 'the proposal is right' is more
    likely than 'the coarse label is right'."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    xs, ys = [], []
    for track in TRACKS:
        for seed in (0, 1):
            for *_, features, right, _ in images(11 - tile, seed, track, proposer, refiner_dumps):
                xs.append(features)
                ys.append(right)
    x, y = np.concatenate(xs), np.concatenate(ys)
    take = np.random.default_rng(0).permutation(len(y))[:400_000]
    model = HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(x[take], y[take])
    share = np.bincount(y, minlength=3) / len(y)
    print(f"gate for tile {tile}: trained on tile {11 - tile}'s {len(y)} changed pixels "
          f"(proposal right {share[0]:.0%}, coarse right {share[1]:.0%}, neither {share[2]:.0%})", flush=True)

    def keep(features: np.ndarray) -> np.ndarray:
        p = model.predict_proba(features)
        return p[:, 0] > p[:, 1]
    return keep


ROWS = ["the proposal (reach 8)", "the learned gate", "the oracle gate", "the oracle over both learners"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proposer", choices=["refiner", "control"], default="refiner")
    parser.add_argument("--refiner", help="the refiner's dumps under runs/, with {tile} and {s} (default: the base's)")
    args = parser.parse_args()
    from idgbr.metrics import evaluate_maps

    cells = {}
    for tile in TILES:
        keep = learned_gate(tile, args.proposer, args.refiner)
        for track in TRACKS:
            per_seed = []
            for seed in (0, 1):
                maps = [[] for _ in ROWS]
                for gt, coarse, proposal, second, where, features, right, k in images(
                        tile, seed, track, args.proposer, args.refiner):
                    gated, oracle = proposal.copy(), proposal.copy()
                    if len(right):
                        drop = ~keep(features)
                        gated[where[0][drop], where[1][drop]] = coarse[where[0][drop], where[1][drop]]
                        wrong = right != 0
                        oracle[where[0][wrong], where[1][wrong]] = coarse[where[0][wrong], where[1][wrong]]
                    both = np.where(proposal == gt, proposal, np.where(second == gt, second, coarse))
                    both[coarse >= k] = coarse[coarse >= k]
                    for row, labels in zip(maps, (proposal, gated, oracle, both)):
                        row.append((gt, labels, coarse))
                scores = []
                for pairs in maps:
                    result = evaluate_maps(pairs, k)
                    base = result["coarse"]
                    scores.append((100 * (result["wfm"]["3"] - base["wfm"]["3"]), 100 * (result["miou"] - base["miou"]),
                                   100 * result["repair"]["iou_rtm"]))
                per_seed.append(scores)
            cells[tile, track] = [[statistics.mean(v) for v in zip(*(s[i] for s in per_seed))]
                                  for i in range(len(ROWS))]
            print(f"tile {tile} {track}: " + " | ".join("%+.2f / %+.2f / %.1f" % tuple(c) for c in cells[tile, track]),
                  flush=True)
    print(f"\nproposer: {args.proposer}; pooled over tiles 5 and 6 and seeds 0 and 1 (ΔWFm3 / ΔmIoU)\n")
    print("| row | strong mean | four-track mean | lowest IoU_RTm |\n|---|---|---|---|")
    for i, name in enumerate(ROWS):
        def mean(tracks: list[str]) -> str:
            sel = [cells[t, k][i] for t in TILES for k in tracks]
            return f"{statistics.mean(c[0] for c in sel):+.2f} / {statistics.mean(c[1] for c in sel):+.2f}"
        lowest = min(cells[t, k][i][2] for t in TILES for k in TRACKS)
        print(f"| {name} | {mean(TRACKS[:2])} | {mean(TRACKS)} | {lowest:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
