"""Several predictions per tile: the test-time-augmentation transforms (:data:`TTA_TRANSFORMS`), the repetition of
a batch for classifier-free guidance and for several samples, the samples' agreement, and the check that several
samples can differ at all. Used by :class:`idgbr.inference.pipeline.Refiner`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..errors import IdgbrError


def _repeat_batch(tree: Any, times: int = 2) -> Any:
    """Concatenate every tensor of a (nested) conditioning structure ``times`` times along the batch axis (CFG,
    several samples per tile)."""
    if isinstance(tree, torch.Tensor):
        return torch.cat([tree] * times)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # e.g. guidance.GuidanceFeatures
        return dataclasses.replace(tree, **{f.name: _repeat_batch(getattr(tree, f.name), times)
                                            for f in dataclasses.fields(tree)})
    if isinstance(tree, dict):
        return {key: _repeat_batch(value, times) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_repeat_batch(value, times) for value in tree)
    return tree


def _dihedral(k: int, transpose: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(forward, inverse) on the last two axes: optional transpose, then ``k`` quarter turns."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x.transpose(-1, -2) if transpose else x, k, dims=(-2, -1))

    def inverse(x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, -k, dims=(-2, -1))
        return x.transpose(-1, -2) if transpose else x

    return forward, inverse


def _flip(dims: tuple[int, ...]) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    def flip(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims) if dims else x

    return flip, flip


TTA_TRANSFORMS = {
    "none": [_flip(())],
    "flips": [_flip(()), _flip((-1,)), _flip((-2,)), _flip((-2, -1))],
    "d4": [_dihedral(k, t) for t in (False, True) for k in range(4)],
}


def check_tta(tta: str) -> str:
    """``tta`` if it names a transform group of ``TTA_TRANSFORMS``, else a one-line error."""
    if tta not in TTA_TRANSFORMS:
        raise IdgbrError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_TRANSFORMS)}")
    return tta


def check_noise_for_samples(samples: int, noise_scale: float) -> None:
    """Several samples differ only through their starting noise: refuse ``samples > 1`` with ``noise_scale`` 0."""
    if samples > 1 and noise_scale == 0:
        raise IdgbrError(f"--samples {samples} draws identical maps with a zero-noise start (this model's default); "
                         "add --noise-scale 1")


def _agreement(probs: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B, h, w) share of the S samples ``probs`` (S, B, K, h, w) whose label is that of their ``mean``; 1 for S = 1
    (not computed: a class argmax over a 512² tile costs tens of ms on a CPU)."""
    if len(probs) == 1:
        return torch.ones_like(mean[:, 0])
    return (probs.max(2).indices == mean.max(1).indices).float().mean(0)
