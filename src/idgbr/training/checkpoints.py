"""Checkpoints of a training run (optimiser, LR schedule, generators, averaged weights) and the weight average
(EMA) itself. A checkpoint is written to a temporary folder and renamed into place, so only complete ones exist.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import file_error
from ..nn.run_folder import TRAINING_STATE

EMA_FILE = "ema.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, renamed into place; only complete ones are ever resumed from.
# --------------------------------------------------------------------------------------------------------------
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
