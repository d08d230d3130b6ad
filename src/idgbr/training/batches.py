"""Training batches: decoded samples cached in memory, random crops, paper augmentations, synthetic coarse maps,
drawn in a background thread (:class:`Prefetcher`) or in DataLoader worker processes (:class:`WorkerBatches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..nn.config import RefinerConfig
from ..data.dataset import IGNORE_INDEX, SegmentationDataset
from ..errors import IdgbrError, file_error


# --------------------------------------------------------------------------------------------------------------
# Data: decoded samples cached in memory, random crops, paper augmentations, synthetic coarse maps.
# --------------------------------------------------------------------------------------------------------------
class CropSampler:
    """Draws training batches of random crops from samples cached in memory.

    Each sample: ``image`` (H, W, C), ``mask`` (H, W) uint8 with ``IGNORE_INDEX``, ``coarse`` (H, W) or absent.
    Crops follow :func:`augment.paper_train_transform` (resize by ``config.augment_scale_range`` and crop in one
    warp of the crop window, flip, with ``config.augment_dihedral`` a rotation by k x 90 degrees, jitter);
    ``config.boundary_crops`` of them are centred on a boundary pixel of the mask or the coarse map.
    With probability ``config.coarse_corruption`` (always, without coarse maps) the coarse crop is replaced by
    ``synthetic.degrade_mask`` of the target: coarse models fit their own training images too well, so their
    training-set maps are cleaner than the test-time ones; this mixes in realistic errors (at a strength drawn from
    ``[config.corruption_min_strength, 1]``). A
    ``config.region_errors`` share of those also gets ``synthetic.degrade_regions`` (segment-level errors), and a
    ``config.overpaint`` share ``synthetic.overpaint`` (small classes closed and grown over their neighbours).
    ``pin_memory``: return page-locked tensors (for asynchronous copies to a GPU).
    """

    def __init__(self, samples: list[dict[str, Any]], config: RefinerConfig, pin_memory: bool = False):
        from ..data.augment import boundary_pixels, paper_train_transform

        self.config = config
        self.crop = config.crop_size
        self.pin_memory = pin_memory
        self.samples = []
        for sample in samples:  # padded once; boundary pixels found once
            padded = _pad_to(sample, self.crop)
            if config.boundary_crops > 0:
                padded["boundary"] = boundary_pixels(padded["mask"], padded.get("coarse"))
            self.samples.append(padded)
        self.transform = paper_train_transform(self.crop, ratio_range=config.augment_scale_range,
                                               boundary_share=config.boundary_crops, dihedral=config.augment_dihedral)

    def __call__(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch: ``image`` (B, C, S, S) uint8, ``mask`` and ``coarse`` (B, S, S) long; with
        ``config.soft_coarse`` also ``coarse_soft`` (B, K, S, S) float32 (:func:`soft_crop`)."""
        from ..data.synthetic import degrade_mask, degrade_regions, overpaint

        images, masks, coarses, softs = [], [], [], []
        for _ in range(self.config.batch_size):
            out = self.transform(self.samples[int(rng.integers(len(self.samples)))], rng)
            mask, coarse, probs = out["mask"], out.get("coarse"), out.get("coarse_probs")
            if coarse is None or rng.random() < self.config.coarse_corruption:
                probs = None
                low = self.config.corruption_min_strength
                strength = 1.0 if low >= 1 else float(rng.uniform(low, 1.0))
                coarse = degrade_mask(mask, rng, self.config.num_classes, strength=strength)
                if self.config.region_errors > 0 and rng.random() < self.config.region_errors:
                    coarse = degrade_regions(coarse, rng, self.config.num_classes)
                if self.config.overpaint > 0 and rng.random() < self.config.overpaint:
                    coarse = overpaint(coarse, rng, self.config.num_classes)
            coarse = np.where(coarse == IGNORE_INDEX, np.where(mask == IGNORE_INDEX, 0, mask), coarse)
            images.append(out["image"].transpose(2, 0, 1))
            masks.append(mask)
            coarses.append(coarse)
            if self.config.soft_coarse:
                softs.append(soft_crop(coarse, probs, self.config.num_classes))
        batch = {
            "image": torch.from_numpy(np.stack(images)),
            "mask": torch.from_numpy(np.stack(masks).astype(np.int64)),
            "coarse": torch.from_numpy(np.stack(coarses).astype(np.int64)),
            **({"coarse_soft": torch.from_numpy(np.stack(softs))} if softs else {}),
        }
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch


class Prefetcher:
    """Draws ``sampler`` batches in a background thread, up to ``depth`` ahead of the training step.

    The generator ``rng`` belongs to the thread while it runs. Each batch carries the generator state right after it
    was drawn; :attr:`rng` returns a generator in the state after the last *consumed* batch, which is what a
    checkpoint stores (so resuming replays exactly the batches that were drawn ahead but not trained on).
    """

    def __init__(self, sampler: CropSampler, rng: np.random.Generator, depth: int):
        import queue
        import threading

        self.sampler, self._rng, self._state = sampler, rng, rng.bit_generator.state
        self._queue: Any = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idgbr-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                item: Any = (self.sampler(self._rng), self._rng.bit_generator.state)
            except Exception as exc:  # noqa: BLE001 - re-raised in the training thread
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def __call__(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        batch, self._state = item
        return batch

    @property
    def rng(self) -> np.random.Generator:
        """A generator in the state after the last consumed batch (a copy; the thread keeps its own)."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self._state
        return rng

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _StepBatches(torch.utils.data.IterableDataset):
    """The batches of steps ``start..stop-1``, each drawn by ``sampler`` from ``step_rng(seed, rank, step)``; in a
    DataLoader worker ``w`` of ``N``, the steps ``start + w, start + w + N, ...`` (the DataLoader hands the workers'
    batches out in turn, so they come back in step order)."""

    def __init__(self, sampler: CropSampler, seed: int, rank: int, start: int, stop: int):
        self.sampler, self.seed, self.rank, self.start, self.stop = sampler, seed, rank, start, stop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in range(self.start + worker, self.stop, workers):
            yield step, self.sampler(step_rng(self.seed, self.rank, step))


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator that draws the batch of optimiser step ``step`` on process ``rank`` with ``loader_workers`` > 0."""
    return np.random.default_rng([seed, rank, step])


def _quiet_worker(worker: int) -> None:
    """A DataLoader worker runs one thread of OpenCV too (torch already sets one thread per worker)."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass


class WorkerBatches:
    """Training batches drawn in ``workers`` DataLoader worker processes (``config.loader_workers``).

    The batch of step k is ``sampler(step_rng(seed, rank, k))``: it depends on the seed, the process rank and the
    step only, not on the number of workers nor on which worker drew it, so a given seed gives the same batch
    sequence for any worker count (N >= 1) and a run resumed at step s draws exactly the batches s, s+1, ... of an
    uninterrupted run (no generator state to checkpoint). ``depth`` batches per worker are drawn ahead; with
    ``pin_memory`` the DataLoader pins them (for asynchronous copies to a GPU).

    Worker processes start from a fork server (a clean process; the sampler is pickled to them); a daemonic
    process (e.g. a multiprocessing pool's worker) cannot have them: use ``loader_workers=0`` there.
    """

    def __init__(self, sampler: CropSampler, seed: int, rank: int, start: int, stop: int, workers: int,
                 depth: int = 2, pin_memory: bool = False):
        loader = torch.utils.data.DataLoader(
            _StepBatches(sampler, seed, rank, start, stop), batch_size=None, num_workers=workers,
            prefetch_factor=max(1, depth), pin_memory=pin_memory, worker_init_fn=_quiet_worker,
            # forkserver, not fork: a worker forked from a process that runs other threads (a prefetch or reading
            # thread, a dask client's) can inherit a lock held by one of them and hang in OpenCV (seen in the suite)
            multiprocessing_context="forkserver",
            generator=torch.Generator().manual_seed(seed))  # leaves the global torch generator alone
        self._iterator: Any = iter(loader)
        self._step = start

    def __call__(self) -> dict[str, torch.Tensor]:
        step, batch = next(self._iterator)
        if step != self._step:  # the DataLoader's in-order hand-out is what makes the sequence deterministic
            raise IdgbrError(f"training loader returned the batch of step {step} at step {self._step}")
        self._step += 1
        return batch

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def soft_crop(coarse: np.ndarray, probs: np.ndarray | None, num_classes: int) -> np.ndarray:
    """(K, S, S) float32 soft coarse input of one crop: the coarse model's probabilities ``probs`` ((S, S, K) uint8,
    255 = 1) renormalised, or the one-hot ``coarse`` labels where there are none (synthetic maps, and pixels the crop
    took from outside the image, whose probabilities are 0)."""
    onehot = np.eye(num_classes, dtype=np.float32)[coarse].transpose(2, 0, 1)
    if probs is None:
        return onehot
    soft = probs.transpose(2, 0, 1).astype(np.float32)
    total = soft.sum(0, keepdims=True)
    return np.where(total > 127.5, soft / np.maximum(total, 1.0), onehot)


def _pad_to(sample: dict[str, Any], size: int) -> dict[str, np.ndarray]:
    """Pad image (reflect), mask (ignore), coarse and its probabilities (edge) so both sides are at least ``size``."""
    out = {key: sample[key] for key in ("image", "mask", "coarse", "coarse_probs") if sample.get(key) is not None}
    ph, pw = max(0, size - out["mask"].shape[0]), max(0, size - out["mask"].shape[1])
    if ph or pw:
        for key, value in out.items():
            pads = ((0, ph), (0, pw)) + ((0, 0),) * (value.ndim - 2)
            out[key] = (np.pad(value, pads, constant_values=IGNORE_INDEX) if key == "mask"
                        else np.pad(value, pads, mode="reflect" if key == "image" else "edge"))
    return out


def coarse_sources(coarse: str | Sequence[str] | None) -> list[str]:
    """``--coarse`` as a list of sources: None, one name, ``"a,b"`` or a list of names (pooled)."""
    if coarse is None:
        return []
    items = [coarse] if isinstance(coarse, (str, Path)) else list(coarse)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


def _stored_sources(coarse: str | Sequence[str] | None) -> str | list[str] | None:
    """How train_config.json records the coarse source(s): None, one name, or the pooled list."""
    sources = coarse_sources(coarse)
    return None if not sources else sources[0] if len(sources) == 1 else sources


def load_training_samples(data_root: str | Path, coarse: str | Sequence[str] | None, soft: bool = False
                          ) -> tuple[list[dict[str, Any]], SegmentationDataset]:
    """Decode the whole training split once (the datasets this targets fit in memory).

    With several coarse sources (e.g. the out-of-fold train maps of several coarse models: their real errors,
    pooled), every training image appears once per source, sharing its decoded image and mask. ``soft`` also reads
    each map's probabilities (``SegmentationDataset.read_coarse_probs``) as ``coarse_probs`` (H, W, K) uint8, 255 = 1
    (a quarter of float32's memory)."""
    sources = coarse_sources(coarse)
    dataset = SegmentationDataset(data_root, "train", coarse=sources[0] if sources else None)
    samples = [{k: v for k, v in dataset[i].items() if k in ("image", "mask", "coarse")} for i in range(len(dataset))]
    first = samples
    for source in sources[1:]:
        other = SegmentationDataset(data_root, "train", coarse=source, load_mask=False)
        samples = samples + [{"image": s["image"], "mask": s["mask"], "coarse": other.read_coarse(stem, s["mask"].shape)}
                             for stem, s in zip(other.stems, first)]
    if soft and sources:
        readers = [SegmentationDataset(data_root, "train", coarse=source, load_mask=False) for source in sources]
        for index, sample in enumerate(samples):
            reader = readers[index // len(first)]
            probs = reader.read_coarse_probs(reader.stems[index % len(first)], sample["mask"].shape)
            sample["coarse_probs"] = np.rint(np.moveaxis(probs, 0, -1).clip(0, 1) * 255).astype(np.uint8)
    return samples, dataset


def resolve_config(config: RefinerConfig, dataset: SegmentationDataset, samples: list[dict[str, Any]]) -> RefinerConfig:
    """Take the number of classes and bands from the dataset; check the crop size."""
    bands = {int(s["image"].shape[-1]) for s in samples}
    if len(bands) != 1:
        raise file_error(dataset.root / "images", f"images have different band counts {sorted(bands)}", "give all images the same bands")
    if config.image_encoder != "copy" and bands != {3}:
        raise file_error(dataset.root / "images", f"{bands.pop()}-band images, but image_encoder "
                         f"{config.image_encoder!r} reads RGB", "use image_encoder='copy' (--set image_encoder=copy)")
    config = config.replace(num_classes=dataset.classes.num_classes, image_channels=bands.pop())
    if config.crop_size % config.size_multiple:
        raise IdgbrError(f"crop_size {config.crop_size} must be a multiple of {config.size_multiple} for this model; "
                         "change --crop")
    if config.preset == "sd15" and config.image_channels != 3:
        raise file_error(dataset.root / "images", f"{config.image_channels}-band images", "the sd15 preset needs RGB; use lite")
    return config


def check_paths(config: RefinerConfig) -> None:
    """Fail within seconds on missing weight paths (before any training starts)."""
    if config.preset == "sd15" and not config.pretrained:
        raise IdgbrError("the sd15 preset needs --pretrained PATH (a Stable Diffusion 1.5 diffusers folder or .safetensors)")
    for name, value in (("--pretrained", config.pretrained), ("--dinov2", config.dinov2), ("--label-embed", config.label_embed)):
        if value and not Path(value).exists():
            raise file_error(value, f"{name} path not found", "give a local folder or file (nothing is downloaded)")


def check_sample_labels(samples: list[dict[str, Any]], num_classes: int) -> None:
    """Every mask and coarse map holds classes in [0, num_classes) or ``IGNORE_INDEX``: checked once at load, so
    the label embedding can skip its per-batch check (a host sync) during training."""
    for index, sample in enumerate(samples):
        for key in ("mask", "coarse"):
            values = np.unique(sample[key]) if sample.get(key) is not None else np.empty(0)
            bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
            if bad.size:
                raise IdgbrError(f"training sample {index}: {key} values {bad[:5].tolist()} are outside the "
                                 f"{num_classes} classes")
