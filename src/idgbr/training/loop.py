"""Training loop for the refiner (accelerate): data, objective, checkpoints, resume.

    >>> from idgbr.nn.config import RefinerConfig
    >>> from idgbr.training.loop import train_refiner
    >>> run = train_refiner(RefinerConfig.preset_config("lite"), "data/dubai", "c1", "runs/lite")

The loop follows the authors' ``tools/train.py`` (reference doc §1, §5, §7) with their defects fixed:
conditioning dropout is applied (so the CFG unconditional branch is trained, §3.7), the LR schedule is stepped
once per optimiser step whatever the number of processes (§7), and checkpoints are complete or absent (each is
written to a temporary folder and renamed into place, so ``kill -9`` never leaves a half-checkpoint that
``--resume`` would take).

Throughput (issue 12; figures in ``docs/results/train_throughput.md``): a step reads nothing back to the host
except every ``log_every`` steps and at checkpoints (labels are validated once at load); AdamW is foreach on CPU
and fused on CUDA (``config.optimizer_impl``); crops resample only their window; ``config.prefetch`` draws batches
in a background thread, or ``config.loader_workers`` in DataLoader worker processes (:class:`WorkerBatches`; figures
in ``docs/results/train_loader.md``); ``config.train_minutes`` bounds the wall time. ``scripts/profile_train.py`` times a step
per phase.

Run layout::

    RUN/config.json, *.safetensors      the final model (``Refiner.from_pretrained(RUN)``)
    RUN/train_config.json               the resolved training config (+ data root and coarse source)
    RUN/label_embed/                    the label embedding trained before the refiner (when none was given)
    RUN/checkpoints/step-000100/        model + training_state.pt (optimiser, LR schedule) + rng-<rank>.json
                                        (+ ema.safetensors, the averaged weights, with ``ema_decay`` > 0)
    RUN/logs/                           TensorBoard scalars (loss, lr, repa)
    RUN/train.log                       the text log (resumed from step N, REPA off, ...)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.config import RefinerConfig
from ..data.dataset import IGNORE_INDEX, SegmentationDataset
from ..errors import IdgbrError, file_error
from ..data.io import atomic_path

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TRAINING_STATE = "training_state.pt"
EMA_FILE = "ema.safetensors"


# --------------------------------------------------------------------------------------------------------------
# The objective: one nn.Module whose forward returns the losses, so accelerate/DDP wrap a single forward.
# --------------------------------------------------------------------------------------------------------------
class RefinerObjective(nn.Module):
    """Wraps an ``IDGBRModel``; ``forward`` draws t, noise and dropout from ``generator`` and returns the losses."""

    def __init__(self, model: nn.Module, config: RefinerConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.scheduler = model.make_scheduler()
        self.visited = sampler_timesteps(model.make_scheduler(), config.sample_steps)  # train_timesteps="sampler"

    def forward(self, image: torch.Tensor, mask: torch.Tensor, coarse: torch.Tensor, generator: torch.Generator,
                teacher: torch.Tensor | None = None,
                mark: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """Losses for one batch.

        Args:
            image: (B, C, H, W) uint8 imagery.
            mask: (B, H, W) long target with ``IGNORE_INDEX``.
            coarse: (B, H, W) long coarse map (no ignore values).
            generator: CPU generator for t, noise and dropout.
            teacher: (B, N, D) REPA teacher tokens, or None.
            mark: called with "encode", "condition" and "forward" as each phase ends (the profiler's timer).
        Returns:
            ``{"loss", "main", "ce", "repa"}`` scalar tensors.
        """
        cfg, model = self.config, self.model
        batch = image.shape[0]
        target = torch.where(mask == IGNORE_INDEX, coarse, mask)  # ignore -> coarse label for the embedding
        with torch.no_grad():  # the label embedding and the codecs are frozen
            z0 = model.encode_labels(target)
            x = model.normalize_image(image)
            z_img = model.encode_image(x)
            z_c = model.encode_labels(coarse) if cfg.use_coarse else torch.zeros_like(z0)
        mark = mark or (lambda phase: None)
        mark("encode")
        cond = model.condition(z_img, z_c, coarse, image=x)  # once per batch: the features do not depend on t
        mark("condition")
        zero = z0.new_zeros(())
        losses = {"main": zero, "ce": zero, "repa": zero}
        want_aux = teacher is not None
        last = cfg.num_train_timesteps - 1
        if cfg.objective == "deterministic":  # same network and inputs, no noise, cross-entropy on x0
            t = torch.full((batch,), last, dtype=torch.long, device=z0.device)
            out = model(torch.zeros_like(z0), t, cond, drop=None, return_aux=want_aux)
            x0_hat, aux = out if want_aux else (out, {})
            losses["main"] = label_loss(model.decode_logits(x0_hat), mask, target, cfg)
        else:
            t = self.draw_timesteps(batch, generator)
            noise = torch.randn(z0.shape, generator=generator).to(z0)
            drop = torch.rand(batch, generator=generator) < cfg.cond_dropout  # trains the CFG uncond branch (§3.7)
            t, drop = t.to(z0.device), drop.to(z0.device)
            z_t = self.scheduler.add_noise(z0, noise, t)
            out = model(z_t, t, cond, drop=drop, return_aux=want_aux)
            pred, aux = out if want_aux else (out, {})
            if cfg.prediction_type == "epsilon":
                goal = noise
            elif cfg.prediction_type == "sample":
                goal = z0
            else:
                goal = self.scheduler.get_velocity(z0, noise, t)
            losses["main"] = F.mse_loss(pred.float(), goal.float())
            if cfg.ce_weight > 0:
                x0_hat = predicted_x0(self.scheduler, cfg.prediction_type, z_t, t, pred)
                losses["ce"] = label_loss(model.decode_logits(x0_hat), mask, target, cfg)
        if want_aux:
            from ..nn.repa import repa_loss

            losses["repa"] = repa_loss(aux["repa"], teacher, model.projector)
        losses["loss"] = losses["main"] + cfg.ce_weight * losses["ce"] + cfg.repa_weight * losses["repa"]
        mark("forward")
        return losses

    def draw_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) training timesteps: ``train_timesteps="sampler"`` draws uniformly among the ones that sampling with
        ``sample_steps`` visits; "all" draws from 0..T-1, warped to t' = (1 - (t/T)^3) T with cubic_timesteps."""
        cfg, last = self.config, self.config.num_train_timesteps - 1
        if cfg.train_timesteps == "sampler":
            return self.visited[torch.randint(0, len(self.visited), (batch,), generator=generator)]
        t = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=generator)
        if cfg.cubic_timesteps:  # reference §5
            t = ((1 - (t.float() / cfg.num_train_timesteps) ** 3) * cfg.num_train_timesteps).clamp(max=last).long()
        return t


def sampler_timesteps(scheduler: Any, steps: int) -> torch.Tensor:
    """The timesteps (long, descending) that DDIM sampling with ``steps`` steps visits, as ``Refiner`` runs it."""
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.clone().long()


def label_loss(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, cfg: RefinerConfig) -> torch.Tensor:
    """Pixel cross-entropy of (B, K, H, W) logits against ``mask`` (ignore masked); with ``boundary_weight`` the
    pixels within ``boundary_width`` of a boundary of ``target`` (the mask, ignore filled) weigh 1 + boundary_weight."""
    if cfg.boundary_weight <= 0:
        return F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX)
    per_pixel = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="none")
    from ..nn.model import boundary_map

    weight = 1 + cfg.boundary_weight * boundary_map(target, cfg.boundary_width).float()
    weight = weight * (mask != IGNORE_INDEX)
    return (per_pixel * weight).sum() / weight.sum().clamp(min=1)


def predicted_x0(scheduler: Any, prediction_type: str, z_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by a network output ``pred`` at timesteps ``t`` (B,); all tensors (B, C, h, w)."""
    if prediction_type == "sample":
        return pred
    alpha = scheduler.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1).to(z_t.dtype)
    if prediction_type == "epsilon":
        return (z_t - (1 - alpha).sqrt() * pred) / alpha.sqrt()
    return alpha.sqrt() * z_t - (1 - alpha).sqrt() * pred  # v-prediction


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
    ``config.region_errors`` share of those also gets ``synthetic.degrade_regions`` (segment-level errors).
    ``pin_memory``: return page-locked tensors (for asynchronous copies to a GPU).
    """

    def __init__(self, samples: list[dict[str, Any]], config: RefinerConfig, pin_memory: bool = False):
        from ..data.augment import boundary_pixels, paper_train_transform

        self.config = config
        self.crop = config.crop_size
        self.pin_memory = pin_memory
        self.samples = []
        for sample in samples:  # padded once; boundary pixels found once
            image, mask, coarse = _pad_to(sample, self.crop)
            padded = {"image": image, "mask": mask, **({"coarse": coarse} if coarse is not None else {})}
            if config.boundary_crops > 0:
                padded["boundary"] = boundary_pixels(mask, coarse)
            self.samples.append(padded)
        self.transform = paper_train_transform(self.crop, ratio_range=config.augment_scale_range,
                                               boundary_share=config.boundary_crops, dihedral=config.augment_dihedral)

    def __call__(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A batch: ``image`` (B, C, S, S) uint8, ``mask`` and ``coarse`` (B, S, S) long."""
        from ..data.synthetic import degrade_mask, degrade_regions

        images, masks, coarses = [], [], []
        for _ in range(self.config.batch_size):
            out = self.transform(self.samples[int(rng.integers(len(self.samples)))], rng)
            mask, coarse = out["mask"], out.get("coarse")
            if coarse is None or rng.random() < self.config.coarse_corruption:
                low = self.config.corruption_min_strength
                strength = 1.0 if low >= 1 else float(rng.uniform(low, 1.0))
                coarse = degrade_mask(mask, rng, self.config.num_classes, strength=strength)
                if self.config.region_errors > 0 and rng.random() < self.config.region_errors:
                    coarse = degrade_regions(coarse, rng, self.config.num_classes)
            coarse = np.where(coarse == IGNORE_INDEX, np.where(mask == IGNORE_INDEX, 0, mask), coarse)
            images.append(out["image"].transpose(2, 0, 1))
            masks.append(mask)
            coarses.append(coarse)
        batch = {
            "image": torch.from_numpy(np.stack(images)),
            "mask": torch.from_numpy(np.stack(masks).astype(np.int64)),
            "coarse": torch.from_numpy(np.stack(coarses).astype(np.int64)),
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


def _pad_to(sample: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pad image (reflect), mask (ignore) and coarse (edge) so both sides are at least ``size``."""
    image, mask, coarse = sample["image"], sample["mask"], sample.get("coarse")
    ph, pw = max(0, size - mask.shape[0]), max(0, size - mask.shape[1])
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        coarse = None if coarse is None else np.pad(coarse, ((0, ph), (0, pw)), mode="edge")
    return image, mask, coarse


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


def load_training_samples(data_root: str | Path, coarse: str | Sequence[str] | None
                          ) -> tuple[list[dict[str, Any]], SegmentationDataset]:
    """Decode the whole training split once (the datasets this targets fit in memory).

    With several coarse sources (e.g. the out-of-fold train maps of several coarse models: their real errors,
    pooled), every training image appears once per source, sharing its decoded image and mask."""
    sources = coarse_sources(coarse)
    dataset = SegmentationDataset(data_root, "train", coarse=sources[0] if sources else None)
    samples = [{k: v for k, v in dataset[i].items() if k in ("image", "mask", "coarse")} for i in range(len(dataset))]
    for source in sources[1:]:
        other = SegmentationDataset(data_root, "train", coarse=source, load_mask=False)
        samples += [{"image": s["image"], "mask": s["mask"],
                     "coarse": other.read_coarse(stem, s["mask"].shape)} for stem, s in zip(other.stems, samples)]
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


# --------------------------------------------------------------------------------------------------------------
# Throughput switches.
# --------------------------------------------------------------------------------------------------------------
def make_optimizer(config: RefinerConfig, params: list[nn.Parameter] | list[dict[str, Any]],
                   device: torch.device | str) -> torch.optim.AdamW:
    """AdamW as ``config.optimizer_impl`` says; "auto": fused kernels on CUDA, foreach (multi-tensor) on CPU.
    ``params``: parameters, or parameter groups (:meth:`IDGBRModel.optimizer_groups`; a group's own lr wins).

    On CPU, foreach gives the same numbers as the per-parameter loop (bit for bit) with fewer kernel launches;
    fused is faster still but rounds differently, so it is opt-in there.
    """
    impl = config.optimizer_impl
    if impl == "auto":
        impl = "fused" if torch.device(device).type == "cuda" else "foreach"
    kwargs = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **kwargs)


def apply_throughput_switches(config: RefinerConfig, model: nn.Module, device: torch.device | str) -> None:
    """``allow_tf32`` (CUDA), ``channels_last`` and ``compile`` (see :class:`RefinerConfig`), in place."""
    if config.allow_tf32 and torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile:  # in place: the state-dict keys (and so the checkpoints) stay as they are
        model.compile()
        model.guidance.encoder.compile()
        if model.guidance.image_branch is not None:  # the pretrained image encoder runs outside model.forward too
            model.guidance.image_branch.compile()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, renamed into place; only complete ones are ever resumed from.
# --------------------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)``, oldest first; partial (temporary) folders are ignored."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT_RE.match(path.name)
            if match and path.is_dir() and (path / TRAINING_STATE).exists() and (path / "config.json").exists():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _rng_state(rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    return {"numpy": rng.bit_generator.state, "torch": gen.get_state().tolist()}


def _set_rng_state(state: dict[str, Any], rng: np.random.Generator, gen: torch.Generator) -> None:
    rng.bit_generator.state = state["numpy"]
    gen.set_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(accelerator: Any, model: nn.Module, optimizer: Any, lr_schedule: Any, step: int, run_dir: Path,
                    rng: np.random.Generator, gen: torch.Generator, ema: "WeightAverage | None" = None) -> Path:
    """Write ``checkpoints/step-N`` atomically: every rank writes its RNG state, the main rank the rest, then rename.

    The checkpoint's model holds the raw weights (what training resumes from); ``ema`` adds the averaged ones."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = run_dir / "checkpoints" / f".step-{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    (tmp / f"rng-{accelerator.process_index}.json").write_text(json.dumps(_rng_state(rng, gen)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()}
        if getattr(accelerator, "scaler", None) is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        torch.save(state, tmp / TRAINING_STATE)
        if ema is not None:
            ema.save(tmp / EMA_FILE)
        if final.exists():  # only after a crash between two saves of the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_training_state(path: Path, accelerator: Any, optimizer: Any, lr_schedule: Any,
                        rng: np.random.Generator, gen: torch.Generator) -> int:
    """Restore optimiser, LR schedule and this rank's RNG from a checkpoint; returns its step."""
    try:
        state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or pickle-bearing file
        raise file_error(path / TRAINING_STATE, f"unreadable training state ({type(exc).__name__})",
                         "delete this checkpoint folder to resume from the previous one") from None
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    if "scaler" in state and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng-{accelerator.process_index}.json"
    if rng_file.exists():
        _set_rng_state(json.loads(rng_file.read_text()), rng, gen)
    return int(state["step"])


class WeightAverage:
    """An exponential moving average of named parameters: diffusers' ``EMAModel`` (warm-up decay
    ``1 - (1 + step)^(-2/3)``, capped at ``decay``), saved as safetensors keyed by parameter name."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        wanted = {id(p) for p in params}
        self.named = [(name, p) for name, p in model.named_parameters() if id(p) in wanted]
        self.params = [p for _, p in self.named]
        self.ema = EMAModel(self.params, decay=decay, use_ema_warmup=True, foreach=True)

    def step(self) -> None:
        self.ema.step(self.params)

    def copy_to_model(self) -> None:
        self.ema.copy_to(self.params)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({name: shadow.detach().cpu().contiguous() for (name, _), shadow in
                   zip(self.named, self.ema.shadow_params)}, str(path))

    def load(self, path: Path, step: int) -> None:
        """Restore the averaged weights of a checkpoint written at optimiser step ``step``."""
        from safetensors.torch import load_file

        if not path.exists():
            raise file_error(path, "missing: this checkpoint was written without ema_decay",
                             "resume with --set ema_decay=0, or start a new run")
        saved = load_file(str(path))
        missing = [name for name, _ in self.named if name not in saved]
        if missing:
            raise file_error(path, f"lacks {len(missing)} averaged weights (e.g. {missing[0]})",
                             "delete this checkpoint folder to resume from the previous one")
        for (name, _), shadow in zip(self.named, self.ema.shadow_params):
            shadow.copy_(saved[name].to(shadow.device, shadow.dtype))
        self.ema.optimization_step = step


def lr_lambda(config: RefinerConfig):
    """Multiplier of ``config.lr`` at an optimiser step: linear warm-up, then constant or half-cosine to 0."""
    def factor(step: int) -> float:
        if config.lr_warmup and step < config.lr_warmup:
            return (step + 1) / config.lr_warmup
        if config.lr_schedule == "cosine":
            progress = (step - config.lr_warmup) / max(1, config.steps - config.lr_warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


# --------------------------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------------------------
class _Log:
    """Prints on the main process (above the progress bar) and appends to ``RUN/train.log``."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active

    def __call__(self, message: str) -> None:
        if not self.active:
            return
        from tqdm import tqdm

        tqdm.write(f"idgbr train: {message}", file=sys.stderr)
        with open(self.path, "a") as fh:
            fh.write(message + "\n")


def _label_embedding(config: RefinerConfig, out_dir: Path, accelerator: Any, log: _Log) -> nn.Module:
    """``RUN/label_embed`` if there, else one trained on the main process (and saved there) before the refiner."""
    from ..nn.labelembed import train_label_embedding
    from ..nn.model import load_label_embedding

    saved = out_dir / "label_embed"
    if not (saved / "config.json").exists():
        if accelerator.is_main_process:
            log(f"training the label embedding ({config.embed_steps} steps, noise std {config.embed_noise_std})")
            embed = train_label_embedding(config.num_classes, config.embed_steps, config.embed_noise_std,
                                          hidden=config.embed_hidden, seed=config.seed, progress=False)
            tmp = out_dir / ".label_embed.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            embed.save_pretrained(tmp)
            os.replace(tmp, saved)
        accelerator.wait_for_everyone()
    else:
        log(f"using the label embedding in {saved}")
    return load_label_embedding(saved)


def _checkpoint_step(path: Path | None) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1)) if path is not None else 0  # type: ignore[union-attr]


def _repa_teacher(config: RefinerConfig, model: nn.Module, start: int, log: _Log) -> nn.Module | None:
    """The frozen REPA teacher (and the model's projector) while REPA is active, else None (reference §4): DINOv2,
    or with ``repa_target`` a packaged encoder (:class:`idgbr.nn.repa.EncoderTeacher`)."""
    if not config.repa_on:
        log("REPA off: no --dinov2 weights" if config.repa_target == "dinov2" and not config.dinov2
            else "REPA off: repa_steps or repa_weight is 0")
        return None
    if start >= config.repa_steps:
        log(f"REPA already finished (step {start} >= repa_steps {config.repa_steps})")
        return None
    if config.image_channels < 3:
        log(f"REPA off: DINOv2 needs RGB, the images have {config.image_channels} band(s)")
        return None
    if config.repa_target != "dinov2":
        from ..nn.repa import EncoderTeacher

        teacher = EncoderTeacher(config.repa_target)
        model.build_projector(teacher.dim)
        log(f"REPA on for steps < {config.repa_steps} (weight {config.repa_weight}) with {config.repa_target}")
        return teacher
    from ..nn.repa import load_dinov2

    dinov2 = load_dinov2(config.dinov2)
    model.build_projector(dinov2.config.hidden_size)
    log(f"REPA on for steps < {config.repa_steps} (weight {config.repa_weight}) with {config.dinov2}")
    return dinov2


def train_refiner(config: RefinerConfig, data_root: str | Path, coarse: str | Sequence[str] | None, out_dir: str | Path,
                  resume: bool = False, progress: bool = True, log_every: int = 10, progress_desc: str = "train",
                  progress_position: int | None = None) -> Path:
    """Train an IDGBR refiner on ``data_root``'s train split; returns ``out_dir`` holding the final model.

    Args:
        config: the resolved configuration (``num_classes``/``image_channels`` are taken from the dataset).
        data_root: a canonical dataset folder (see :mod:`idgbr.data.dataset`).
        coarse: name of ``coarse/<name>/`` maps predicted on the training images, several names (a list or
            ``"a,b"``: pooled, each image once per source), or None (synthetic coarse only).
        out_dir: the run folder.
        resume: continue from the latest complete checkpoint in ``out_dir/checkpoints``.
        progress: show a tqdm bar; ``progress_desc`` labels it and ``progress_position`` pins it to a terminal line
            (for runs that train side by side, e.g. :func:`idgbr.evaluation.benchmark.train_side_by_side`).
        log_every: interval in steps of TensorBoard logging, of the progress bar's loss and of the finiteness
            check (each reads values back to the host; a non-finite loss is also caught at every checkpoint).

    Training stops at ``config.steps`` or after ``config.train_minutes`` of wall time in the loop, whichever comes
    first; a time stop writes a checkpoint (so ``resume`` continues from it) and the final model as usual.

    The learning rate is not rescaled with the batch size: when changing ``batch_size`` (or the number of
    processes, which multiplies the global batch), scale ``lr`` by the square-root rule,
    ``lr * sqrt(new_global_batch / old_global_batch)`` (the usual rule for Adam-type optimisers).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm import tqdm

    from ..nn.model import IDGBRModel

    out_dir = Path(out_dir)
    check_paths(config)
    if config.loader_workers < 0:
        raise IdgbrError(f"loader_workers must be >= 0, got {config.loader_workers}")
    if not resume and list_checkpoints(out_dir):
        raise file_error(out_dir, "already holds checkpoints", "pass --resume to continue or choose another --out")
    mixed = config.mixed_precision if torch.cuda.is_available() or config.mixed_precision == "bf16" else "no"
    accelerator = Accelerator(
        # cpu=True on CPU-only hosts makes torchrun-spawned processes (`accelerate launch --multi_gpu`) use gloo
        cpu=not torch.cuda.is_available(), mixed_precision=mixed, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.repa_on)],  # REPA projector
    )
    main = accelerator.is_main_process
    if main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise file_error(out_dir, f"cannot create the run folder ({exc.strerror})", "choose a writable --out") from None
    accelerator.wait_for_everyone()
    log = _Log(out_dir / "train.log", main)
    if mixed != config.mixed_precision:
        log(f"mixed precision {config.mixed_precision} needs a GPU; training in fp32")

    samples, dataset = load_training_samples(data_root, coarse)
    config = resolve_config(config, dataset, samples)
    check_sample_labels(samples, config.num_classes)
    if coarse is None and config.use_coarse:
        log("no --coarse maps: every training coarse map is a synthetic degradation of the ground truth")
    if main:
        resolved = {**config.to_dict(), "data": str(Path(data_root).resolve()), "coarse": _stored_sources(coarse),
                    "num_processes": accelerator.num_processes}
        with atomic_path(out_dir / "train_config.json") as tmp:
            tmp.write_text(json.dumps(resolved, indent=2) + "\n")

    set_seed(config.seed)
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        log("no complete checkpoint to resume from; starting at step 0")
    model = IDGBRModel.from_pretrained(checkpoint) if checkpoint else IDGBRModel(config)  # fails fast on bad paths
    if checkpoint is None and not config.label_embed:  # a given --label-embed is loaded by IDGBRModel
        model.set_label_embedding(_label_embedding(config, out_dir, accelerator, log))
    dinov2 = _repa_teacher(config, model, start=_checkpoint_step(checkpoint), log=log)
    projector = list(model.projector.parameters()) if model.projector is not None else []
    main_params = [p for p in model.trainable_parameters() if all(p is not q for q in projector)]
    model.label_embed.check_labels = False  # every label map was checked at load
    model.to(accelerator.device)
    apply_throughput_switches(config, model, accelerator.device)
    objective = RefinerObjective(model, config)
    optimizer = make_optimizer(config, model.optimizer_groups(main_params), accelerator.device)
    # The REPA projector is never saved (reference §4), so it gets its own optimiser, left out of checkpoints.
    repa_optimizer = make_optimizer(config, projector, accelerator.device) if projector else None
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))  # stepped once per step, not per process
    ema = WeightAverage(model, main_params, config.ema_decay) if config.ema_decay > 0 else None

    rank = accelerator.process_index
    rng = np.random.default_rng([config.seed, rank])
    gen = torch.Generator().manual_seed(config.seed * 1000 + rank)
    start = 0
    if checkpoint is not None:
        start = load_training_state(checkpoint, accelerator, optimizer, lr_schedule, rng, gen)
        if ema is not None:
            ema.load(checkpoint / EMA_FILE, start)
        log(f"resumed from step {start} ({checkpoint})")
    objective, optimizer = accelerator.prepare(objective, optimizer)
    unwrapped = accelerator.unwrap_model(objective).model
    if dinov2 is not None:
        dinov2.to(accelerator.device)

    if main:
        accelerator.init_trackers("tb")
    cuda = accelerator.device.type == "cuda"
    workers = config.loader_workers
    sampler = CropSampler(samples, config, pin_memory=cuda and workers == 0)
    if workers > 0:  # the batch of step k from step_rng(seed, rank, k): resume needs no generator state
        prefetcher: Any = WorkerBatches(sampler, config.seed, rank, start, config.steps, workers,
                                        depth=config.prefetch, pin_memory=cuda)
        log(f"drawing batches in {workers} loader worker processes")
    else:
        prefetcher = Prefetcher(sampler, rng, config.prefetch) if config.prefetch > 0 else None
    next_batch = prefetcher if prefetcher is not None else (lambda: sampler(rng))
    bar = tqdm(total=config.steps, initial=start, disable=not (progress and main), desc=progress_desc,
               position=progress_position, dynamic_ncols=True)
    objective.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    clock = _Clock(config.train_minutes, accelerator, check_every=1 if accelerator.num_processes == 1 else log_every)
    clip_params = unwrapped.trainable_parameters()  # listed once, not every step
    done = start
    try:
        for step in range(start, config.steps):
            batch = {k: v.to(accelerator.device, non_blocking=cuda) for k, v in next_batch().items()}
            batch["image"] = batch["image"].contiguous(memory_format=memory_format)
            tokens = None
            if dinov2 is not None and step < config.repa_steps:
                from ..nn.repa import teacher_tokens, to_imagenet

                with torch.no_grad():
                    x = unwrapped.normalize_image(batch["image"])
                    if config.repa_target == "dinov2":
                        tokens = teacher_tokens(dinov2, to_imagenet(x, config.image_normalization))
                    else:
                        tokens = dinov2(x, config.image_normalization)
            elif dinov2 is not None:
                dinov2 = None  # free the DINOv2 teacher once REPA is over
                log(f"REPA finished at step {step}; teacher freed")
            losses = objective(batch["image"], batch["mask"], batch["coarse"], gen, teacher=tokens)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(clip_params, config.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step()
            if repa_optimizer is not None:
                if tokens is not None:
                    repa_optimizer.step()
                repa_optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            out_of_time = clock.expired(done)
            last = done == config.steps or out_of_time
            if done % log_every == 0 or last:  # the only host syncs of a step, every log_every steps
                loss = _finite_loss(losses, step, data_root)
                bar.set_postfix(loss=f"{loss:.4f}")
                scalars = {"loss": loss, "lr": lr_schedule.get_last_lr()[0], "main": losses["main"].item()}
                if tokens is not None:
                    scalars["repa"] = losses["repa"].item()
                if config.ce_weight > 0:
                    scalars["ce"] = losses["ce"].item()
                accelerator.log(scalars, step=done)
            if done % config.checkpoint_every == 0 or last:
                loss = _finite_loss(losses, step, data_root)  # never checkpoint a diverged model
                path = save_checkpoint(accelerator, unwrapped, optimizer, lr_schedule, done, out_dir,
                                       prefetcher.rng if isinstance(prefetcher, Prefetcher) else rng, gen, ema)
                log(f"checkpoint {path.name} (loss {loss:.4f})")
            if out_of_time:
                break
    finally:
        if prefetcher is not None:
            prefetcher.close()
    bar.close()

    accelerator.wait_for_everyone()
    if main:
        if ema is not None:  # the final model is the average (the last checkpoint keeps the raw weights too)
            ema.copy_to_model()
            log(f"final model: exponential moving average of the weights (decay "
                f"{ema.ema.get_decay(ema.ema.optimization_step):.4f} at step {done})")
        _save_final(unwrapped, out_dir)
        if clock.stopped:
            log(f"stopped by the time limit (train_minutes {config.train_minutes}) at step {done} of {config.steps}; "
                f"model saved to {out_dir}")
        else:
            log(f"finished {config.steps} steps (the step limit); model saved to {out_dir}")
    accelerator.end_training()
    return out_dir


def _finite_loss(losses: dict[str, torch.Tensor], step: int, data_root: str | Path) -> float:
    """The total loss as a float (a host sync); a non-finite one is a one-line error."""
    loss = losses["loss"].item()
    if not math.isfinite(loss):
        raise IdgbrError(f"non-finite loss by step {step}; lower --lr or check the data in {data_root}")
    return loss


class _Clock:
    """The wall-time budget of the loop (``train_minutes``), measured from its construction.

    With several processes the main process decides and broadcasts, every ``check_every`` steps, so that all ranks
    stop at the same step.
    """

    def __init__(self, minutes: float | None, accelerator: Any, check_every: int = 1):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.accelerator, self.check_every = accelerator, max(1, check_every)
        self.stopped = False

    def expired(self, done: int) -> bool:
        if self.deadline is None or done % self.check_every:
            return False
        late = time.monotonic() >= self.deadline
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            flag = torch.tensor([float(late)], device=self.accelerator.device)
            late = bool(broadcast(flag, from_process=0).item())
        self.stopped = late
        return late


def _save_final(model: nn.Module, out_dir: Path) -> None:
    """``model.save_pretrained(out_dir)`` file by file through a temporary folder (each file lands atomically)."""
    tmp = out_dir / ".final.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            target = out_dir / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(tmp, ignore_errors=True)
