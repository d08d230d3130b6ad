"""The refiner's training objective: one nn.Module whose forward returns the losses, so accelerate/DDP wrap a
single forward; with the timestep and x0 helpers it uses.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.config import RefinerConfig
from ..data.dataset import IGNORE_INDEX


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
                mark: Callable[[str], None] | None = None,
                coarse_soft: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses for one batch.

        Args:
            image: (B, C, H, W) uint8 imagery.
            mask: (B, H, W) long target with ``IGNORE_INDEX``.
            coarse: (B, H, W) long coarse map (no ignore values).
            generator: CPU generator for t, noise and dropout.
            teacher: (B, N, D) REPA teacher tokens, or None.
            mark: called with "encode", "condition" and "forward" as each phase ends (the profiler's timer).
            coarse_soft: (B, K, H, W) float coarse probabilities (soft coarse input), embedded in place of ``coarse``.
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
            given = coarse if coarse_soft is None else coarse_soft
            z_c = model.encode_labels(given) if cfg.use_coarse else torch.zeros_like(z0)
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
