"""Training loop for the refiner (accelerate): optimiser, LR schedule, logging, resume, the loop itself.

The pieces it runs live beside it: the objective (:mod:`idgbr.training.objective`), the batches
(:mod:`idgbr.training.batches`) and the checkpoints (:mod:`idgbr.training.checkpoints`).

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
in ``docs/results/train_loader.md``); ``config.train_minutes`` bounds the wall time. ``scripts/experiments/profile_train.py`` times a step
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
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..nn.config import RefinerConfig
from ..errors import IdgbrError, file_error
from ..data.io import atomic_path
from ..nn.run_folder import CHECKPOINT_RE, latest_checkpoint, list_checkpoints
from .batches import (CropSampler, Prefetcher, WorkerBatches, _stored_sources, check_paths, check_sample_labels,
                      load_training_samples, resolve_config)
from .checkpoints import EMA_FILE, WeightAverage, load_training_state, save_checkpoint
from .objective import RefinerObjective


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

    if config.soft_coarse and not coarse:
        raise IdgbrError("soft_coarse trains on coarse models' probabilities: give --coarse maps written with "
                         "'idgbr predict-coarse --probs npy', or drop soft_coarse")
    samples, dataset = load_training_samples(data_root, coarse, soft=config.soft_coarse)
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
            losses = objective(batch["image"], batch["mask"], batch["coarse"], gen, teacher=tokens,
                               coarse_soft=batch.get("coarse_soft"))
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
