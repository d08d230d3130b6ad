"""Issue 28, the area match on validation: dump the refined probabilities of the held-out tile once per run and TTA,
then score post-processing variants on them (docs/results/strong_maps.md, section 3).

    python scripts/experiments/area_match.py dump runs/v28_base_s0 --tta none --out runs/p28/s0_none
    python scripts/experiments/area_match.py score runs/p28/s{seed}_none --data runs/v28_base_s0/data \
        argmax argmax@s6 area:1 area:1,0.05 area:0.5 exact:1
    python scripts/experiments/area_match.py diagnose runs/p28/s0_flips --data runs/v28_base_s0/data
    python scripts/experiments/area_match.py dump runs/v30_base_t5_s0 --anchor runs/p31/ctl_t5_s0 --out runs/p33/cas_t5_s0
    python scripts/experiments/area_match.py dump runs/s40_soft_t5_s0 --tracks runs/soft/tracks --soft --out runs/p40/soft_t5_s0
    python scripts/experiments/area_match.py dump runs/v30_base_t5_s0 --start runs/p31/ctl_t5_s0 --strength 0.5 --out X

``dump --anchor`` refines another dump's labels (the cascade, section 5.6); ``dump --start --strength`` runs SDEdit
from another dump's labels, the coarse map still the condition (section 5.9). ``score`` takes a folder pattern with
``{seed}`` (seeds 0 and 1 averaged) and variants: ``argmax``; ``margin:P`` (the flip margin alone); ``area:A[,P]``
(:func:`idgbr.inference.postprocess.match_areas` at strength A, then the flip margin P); ``exact:A`` (areas matched
until they are, with steps that double while a class's gap keeps its sign: the negative row); ``reach:R`` (the class
reach, :func:`idgbr.inference.postprocess.within_reach`), alone or before another variant (``reach:8+area:1,0.05``);
``mix:W`` (the probabilities averaged with the ``--partner`` dumps', e.g. the deterministic control's, weight W on
the partner), alone or before another (``mix:0.5+reach:8``); ``cmix:W`` and ``cgate:P`` (the same with the coarse
model's own probabilities from ``--coarse-probs``, averaged in or taken wherever its confidence is P or more; tracks
without probabilities print n/a); any of them with ``@sN`` for the N-px sieve. One line
per variant: per track ΔWFm3 / ΔmIoU / IoU_RTm, then the strong and the all-track means. ``diagnose`` counts, per
class, the correct coarse pixels the refiner lost, the ones it gained, the false ones it added and the false ones it
removed.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

TRACKS = ["deeplabv3plus_pretrained", "unet_pretrained", "deeplabv3plus_converged", "unet_converged"]
# Weak maps of the held-out tile (added with the over-paint trial): the benchmark's cheap coarse models' maps of tile
# 6, copied into RUN/data/coarse/trk_weak_<arch>/ from DATA/coarse/bench_<arch>/ (those models trained on the whole
# train split, tile 6 included, so the maps are in-sample: less weak than on test). Scored when dumped.
WEAK = ["weak_deeplabv3plus", "weak_unet"]


def from_start(refiner, image: np.ndarray, coarse: np.ndarray, start: np.ndarray, strength: float) -> np.ndarray:
    """(K, H, W) probabilities of SDEdit from the ``start`` labels (another model's map) at ``strength``, conditioned
    on ``coarse``: the tiles, their order, their noise and their blending as ``Refiner.refine`` does them for one
    image (at strength 1 it gives ``refine``'s probabilities; ``dump`` checks that on its first image)."""
    import torch

    from idgbr.inference.pipeline import _one_hot
    from idgbr.nn.tiling import sliding_window

    cfg, k = refiner.config, refiner.config.num_classes
    bands = image.shape[-1]
    stacked = np.concatenate([np.moveaxis(image, -1, 0).astype(np.float32), coarse[None].astype(np.float32),
                              start[None].astype(np.float32)])
    generator = torch.Generator().manual_seed(0)

    def predict(batch: torch.Tensor) -> torch.Tensor:
        tiles = batch[:, :bands].to(torch.from_numpy(np.empty(0, dtype=image.dtype)).dtype)
        z_shape = refiner._latent_shape(tiles.shape[-2:])
        noise = torch.stack([torch.randn(z_shape, generator=generator) for _ in range(len(tiles))])
        prior, begin = _one_hot(batch[:, bands].long(), k), _one_hot(batch[:, bands + 1].long(), k)
        logits = refiner.sample(tiles, prior, cfg.sample_steps, cfg.guidance_scale, strength, noise, None,
                                cfg.noise_scale, "none", start=begin)
        probs = torch.softmax(logits.float(), dim=1)
        return torch.cat([probs, torch.ones_like(probs[:, :1])], 1)

    return sliding_window(predict, stacked, k + 1, tile=cfg.tile_size, overlap=cfg.tile_overlap, batch_size=4,
                          multiple=cfg.size_multiple)[:k]


def dump(run: Path, tta: str, out: Path, anchor: Path | None = None, tracks: Path | None = None,
         soft: bool = False, start: Path | None = None, strength: float = 1.0) -> None:
    """The refined probabilities of the held-out images, raw (no post-processing). With ``anchor`` (another run's dump
    folder, e.g. the control's) the refiner reads that run's labels at the class reach 8 as its coarse map (the
    cascade: the control first, the diffusion refiner on its output); the saved ``coarse`` stays the original.
    ``tracks``: a folder holding ``<track>/`` map folders to read instead of the run's own links (the soft-input
    trial's regenerated strong tracks); ``soft``: give the refiner a track's probabilities (``<track>_probs/``)
    where it has them. ``start`` (another run's dump folder) and ``strength``: SDEdit from that run's labels at the
    class reach 8 (section 5.9), the coarse map still the condition."""
    import torch

    from idgbr.data.dataset import IGNORE_INDEX, SegmentationDataset, probs_folder
    from idgbr.inference.pipeline import Refiner
    from idgbr.inference.postprocess import within_reach

    torch.set_num_threads(1)
    refiner = Refiner.from_pretrained(next((run / "models").glob("*/config.json")).parent, device="cpu")
    weak = [w for w in WEAK if (run / "data" / "coarse" / f"trk_{w}").is_dir() if tracks is None or (tracks / w).is_dir()]
    for track in TRACKS + weak:
        name = "val_coarse" if track == TRACKS[0] else f"trk_{track}"
        if tracks is not None:
            name = str((tracks / track).resolve())
        dataset = SegmentationDataset(run / "data", "test", coarse=name, load_mask=False)
        with_probs = soft and probs_folder(dataset.coarse_dir).is_dir()
        for index, stem in enumerate(dataset.stems):
            target = out / track / f"{stem}.npz"
            if target.exists():
                continue
            sample = dataset[index]
            given = sample["coarse"]
            if with_probs:
                given = dataset.read_coarse_probs(stem, given.shape)
            other = anchor if anchor is not None else start
            if other is not None:
                first = np.load(other / track / f"{stem}.npz")["probs"].astype(np.float32)
                first = within_reach(first, sample["coarse"], 8).argmax(0).astype(np.uint8)
                first[sample["coarse"] == IGNORE_INDEX] = IGNORE_INDEX
                given = first if anchor is not None else given
            if start is None or index == 0:  # with --start: only to check from_start against it
                labels, probs = refiner.refine(sample["image"], given, generator=torch.Generator().manual_seed(0),
                                               tta=tta, return_probs=True, sieve=0, flip_margin=0, area_match=0,
                                               class_reach=0)  # raw: the variants post-process them
            if start is not None:
                if with_probs:
                    raise SystemExit("--start reads label maps: leave out --soft")
                if index == 0 and not np.allclose(from_start(refiner, sample["image"], given, first, 1.0), probs,
                                                  atol=1e-4):
                    raise SystemExit("from_start at strength 1 does not reproduce Refiner.refine")
                probs = from_start(refiner, sample["image"], given, first, strength)
                labels = probs.argmax(0).astype(np.uint8)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(target, probs=probs.astype(np.float16), coarse=sample["coarse"], labels=labels)
            print(track, stem, flush=True)


def exact_match(probs: np.ndarray, coarse: np.ndarray, strength: float, iters: int = 40) -> np.ndarray:
    """The areas matched until they are (the rejected variant): per-class steps that double while the gap keeps its
    sign, the iterate closest to the target areas."""
    from idgbr.inference.postprocess import log_probs_of

    k = probs.shape[0]
    log_probs = log_probs_of(probs)
    sample, labels = log_probs[:, ::4, ::4].reshape(k, -1), coarse[::4, ::4].ravel()
    sample, labels = sample[:, labels < k], labels[labels < k].astype(np.int64)
    target = np.log(np.bincount(labels, minlength=k) + 1.0)
    if strength < 1:
        target = strength * target + (1 - strength) * np.log(np.bincount(sample.argmax(0), minlength=k) + 1.0)
    offsets, factor, previous, best, best_distance = np.zeros(k), np.ones(k), np.zeros(k), np.zeros(k), np.inf
    for _ in range(iters):
        areas = np.bincount((sample + offsets[:, None]).argmax(0), minlength=k)
        distance = np.abs(areas - np.expm1(target)).sum()
        if distance < best_distance:
            best, best_distance = offsets.copy(), distance
        gap = target - np.log(areas + 1.0)
        same = np.sign(gap) * np.sign(previous)
        factor = np.clip(np.where(same > 0, factor * 2, np.where(same < 0, factor / 2, factor)), 1, 64)
        offsets, previous = offsets + 0.5 * factor * gap, gap
    return (log_probs + best[:, None, None]).argmax(0).astype(np.uint8)


def variant(name: str, probs: np.ndarray, coarse: np.ndarray, labels: np.ndarray,
            partner: np.ndarray | None = None) -> np.ndarray:
    from idgbr.inference.postprocess import keep_unsure, match_areas, sieve_labels

    if name.startswith(("cmix", "cgate")):  # the coarse model's own probabilities (``partner`` here), then VARIANT
        head, _, name = name.partition("+")
        value = float(head.split(":")[1])
        if head.startswith("cmix"):  # cmix:W: (1 - W) x these probabilities + W x the coarse model's
            probs = (1 - value) * probs + value * partner
        else:  # cgate:P: the coarse model's probabilities where its confidence is P or more (its label kept there)
            probs = np.where(partner.max(0, keepdims=True) >= value, partner, probs)
        labels = probs.argmax(0).astype(np.uint8)
        name = name or "argmax"
    if name.startswith("mix"):  # mix:W[+VARIANT]: (1 - W) x these probabilities + W x the --partner run's
        head, _, name = name.partition("+")
        if partner is None:
            raise SystemExit("mix:W needs --partner")
        weight = float(head.split(":")[1])
        probs = (1 - weight) * probs + weight * partner
        labels = probs.argmax(0).astype(np.uint8)
        name = name or "argmax"
    if name.startswith("reach"):  # reach:R[+VARIANT]: the class reach first (idgbr.inference.postprocess.within_reach)
        from idgbr.inference.postprocess import within_reach

        head, _, name = name.partition("+")
        probs = within_reach(probs, coarse, int(head.split(":")[1]))
        labels = probs.argmax(0).astype(np.uint8)
        name = name or "argmax"
    name, _, sieve = name.partition("@s")
    kind, _, arg = name.partition(":")
    values = [float(v) for v in arg.split(",")] if arg else []
    if kind == "argmax":
        out = labels
    elif kind == "margin":
        out = keep_unsure(labels, probs, coarse, values[0])
    elif kind in ("area", "exact"):
        out = match_areas(probs, coarse, values[0]) if kind == "area" else exact_match(probs, coarse, values[0])
        if len(values) > 1 and values[1] > 0:
            out = keep_unsure(out, probs, coarse, values[1])
    else:
        raise SystemExit(f"unknown variant {name!r}")
    return sieve_labels(out, int(sieve or 0))


def load(folder: Path, track: str, stems: list[str]):
    for stem in stems:
        z = np.load(folder / track / f"{stem}.npz")
        yield stem, z["probs"].astype(np.float32), z["coarse"], z["labels"]


def score(pattern: str, data: Path, names: list[str], partner: str | None = None, coarse_probs: Path | None = None) -> None:
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.metrics import evaluate_maps

    dataset = SegmentationDataset(data, "test")
    masks = {stem: dataset.read_mask(stem) for stem in dataset.stems}
    k = dataset.classes.num_classes
    for name in names:
        rows = []
        tracks = TRACKS + [w for w in WEAK if Path(pattern.format(seed=0), w).is_dir()]
        for track in tracks:
            per_seed = []
            own = name.startswith(("cmix", "cgate"))
            if own and (coarse_probs is None or not (coarse_probs / f"{track}_probs").is_dir()):
                rows.append(None)  # no probabilities for this track
                continue
            for seed in (0, 1):
                mixed = ({stem: p for stem, p, _, _ in load(Path(partner.format(seed=seed)), track, dataset.stems)}
                         if partner and name.startswith("mix") else {})
                if own:
                    mixed = {stem: np.load(coarse_probs / f"{track}_probs" / f"{stem}.npy") for stem in dataset.stems}
                pairs = [(masks[stem], variant(name, probs, coarse, labels, mixed.get(stem)), coarse)
                         for stem, probs, coarse, labels in load(Path(pattern.format(seed=seed)), track, dataset.stems)]
                result = evaluate_maps(pairs, k, class_names=dataset.classes.names)
                base = result["coarse"]
                per_seed.append((100 * (result["wfm"]["3"] - base["wfm"]["3"]), 100 * (result["miou"] - base["miou"]),
                                 100 * result["repair"]["iou_rtm"]))
            rows.append([statistics.mean(values) for values in zip(*per_seed)])
        cells = " | ".join("n/a" if row is None else f"{row[0]:+.2f} / {row[1]:+.2f} / {row[2]:.1f}" for row in rows)

        def mean(sel: list) -> str:
            sel = [row for row in sel if row is not None]
            return " / ".join(f"{statistics.mean(row[i] for row in sel):+.2f}" for i in (0, 1)) if sel else "n/a"

        print(f"| {name} | {cells} | {mean(rows[:2])} | {mean(rows[:4])} |"
              + (f" {mean(rows[4:])} |" if len(rows) > 4 else ""), flush=True)


def diagnose(folder: Path, data: Path) -> None:
    from idgbr.data.dataset import SegmentationDataset

    dataset = SegmentationDataset(data, "test")
    k, names = dataset.classes.num_classes, dataset.classes.names
    for track in TRACKS[:2]:
        counts = np.zeros((k, 4))
        for stem, _, coarse, labels in load(folder, track, dataset.stems):
            gt = dataset.read_mask(stem)
            valid = gt < k
            for c in range(k):
                counts[c] += [(valid & (coarse == c) & (gt == c) & (labels != c)).sum(),
                              (valid & (coarse != c) & (gt == c) & (labels == c)).sum(),
                              (valid & (coarse != c) & (gt != c) & (labels == c)).sum(),
                              (valid & (coarse == c) & (gt != c) & (labels != c)).sum()]
        print(f"{track}: class | correct lost | correct gained | false added | false removed")
        for c in range(k):
            print(f"  {names[c]} | " + " | ".join(f"{v:.0f}" for v in counts[c]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump")
    p.add_argument("run", type=Path)
    p.add_argument("--tta", default="none", choices=["none", "flips"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--anchor", type=Path, help="another run's dump folder: refine its labels (reach 8) instead")
    p.add_argument("--tracks", type=Path, help="a folder of <track>/ map folders to read instead of the run's links")
    p.add_argument("--soft", action="store_true", help="give the refiner the tracks' probabilities where they exist")
    p.add_argument("--start", type=Path, help="another run's dump folder: SDEdit from its labels (reach 8)")
    p.add_argument("--strength", type=float, default=1.0, help="the SDEdit strength with --start")
    p = sub.add_parser("score")
    p.add_argument("pattern", help="dump folder with {seed}")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--partner", help="a second dump folder with {seed} (e.g. the control's), for mix:W")
    p.add_argument("--coarse-probs", type=Path,
                   help="a folder of <track>_probs/ (the coarse models' probabilities), for cmix:W and cgate:P")
    p.add_argument("variants", nargs="+")
    p = sub.add_parser("diagnose")
    p.add_argument("folder", type=Path)
    p.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.run, args.tta, args.out, args.anchor, args.tracks, args.soft, args.start, args.strength)
    elif args.command == "score":
        score(args.pattern, args.data, args.variants, args.partner, args.coarse_probs)
    else:
        diagnose(args.folder, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
