"""The pretrained image branch of the guidance (issue 21): ImageNet features instead of the copied encoder's.

With ``RefinerConfig.image_encoder`` set to a registered encoder (:data:`idgbr.nn.encoders.ENCODERS`, e.g.
``tf_efficientnet_lite0``), the image half of every guidance level comes from that encoder at the level's stride in
image pixels (latent stride x codec factor: 4, 8, 16, 16, ... in lite) through a trained 1x1 projection to the
level's width. The coarse-label half still comes from the copied encoder (:class:`idgbr.nn.guidance.GuidanceEncoder`).

* The encoder is timm's features-only model, cut after the deepest stage a level needs (lite: stride 16, 0.7 M
  parameters). It is frozen, except its last ``image_encoder_trainable_stages`` blocks, which fine-tune at
  ``lr x image_encoder_lr_scale`` (:meth:`IDGBRModel.optimizer_groups`). Its BatchNorm layers always run in eval
  mode with the ImageNet statistics (training batches of 4 crops would give noisy statistics).
* It reads RGB in its own normalisation (:func:`encoder_input` converts from the model's range explicitly); other
  band counts are refused (an ImageNet stem patched to N bands, the smp way, would be a guess, not pretraining).
* Its weights are part of the model's ``model.safetensors``, like every other parameter: fine-tuned stages change
  them anyway, and a saved run then rebuilds (and refines) without the weights package installed, as the coarse
  models do (:mod:`idgbr.training.coarse`). Building a fresh model (``load_weights=True``) loads them from the package.
* Its features do not depend on t: ``IDGBRModel.condition`` computes them once per tile (once per batch in training).
"""

from __future__ import annotations

import torch
from torch import nn

from .encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, get_encoder, load_pretrained_encoder, normalize
from ..errors import IdgbrError

__all__ = ["IMAGE_ENCODERS", "encoder_input", "features_model", "PretrainedImageBranch"]

IMAGE_ENCODERS = ("copy", *ENCODERS)  # "copy": the copied denoiser encoder reads the image latent (the paper's lite)


def encoder_input(x: torch.Tensor, normalization: str, name: str) -> torch.Tensor:
    """Model-range RGB (B, 3, H, W) (``RefinerConfig.image_normalization``) -> the input the encoder's weights expect."""
    if x.shape[1] != 3:
        raise IdgbrError(f"the pretrained image encoder {name} reads RGB, got {x.shape[1]} bands; "
                         "use image_encoder='copy' for other imagery")
    if normalization == "minus_one_one":
        rgb = (x + 1) * 127.5
    elif normalization == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        rgb = (x * std + mean) * 255
    else:
        raise IdgbrError(f"unknown image normalisation {normalization!r}")
    return normalize(rgb, name)


def features_model(name: str, strides: list[int], load_weights: bool = True) -> tuple[nn.Module, list[int]]:
    """timm's features-only ``name`` returning one map per distinct stride in ``strides`` (image pixels), cut after
    the deepest block it needs; and for each entry of ``strides`` the index of its map in the output list."""
    import timm

    get_encoder(name)  # a registered name, else a one-line error
    reductions = timm.create_model(name, pretrained=False, features_only=True).feature_info.reduction()
    wanted = sorted(set(strides))
    missing = [s for s in wanted if s not in reductions]
    if missing:
        raise IdgbrError(f"image_encoder {name} has no features at stride {missing[0]} px (it has {reductions}); "
                         "use image_encoder='copy' with this UNet/codec geometry")
    indices = tuple(reductions.index(s) for s in wanted)
    if load_weights:
        model = load_pretrained_encoder(name, features_only=True, out_indices=indices)
    else:  # the architecture only; the weights come from the refiner's model.safetensors
        model = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)
    last = max(int(module.split(".")[1]) for module in model.feature_info.module_name())
    model.blocks = model.blocks[: last + 1]  # the deeper blocks would run for nothing
    return model, [wanted.index(s) for s in strides]


class PretrainedImageBranch(nn.Module):
    """A (mostly) frozen ImageNet encoder and one trained 1x1 projection per guidance level.

    Args:
        name: registry name (``tf_efficientnet_lite0``).
        strides: each level's stride in image pixels; channels: each level's width.
        trainable_stages: how many of the encoder's last blocks fine-tune (0: all frozen).
        load_weights: ImageNet weights from the package (False: architecture only, for loading a saved model).
    """

    def __init__(self, name: str, strides: list[int], channels: list[int], trainable_stages: int = 0,
                 load_weights: bool = True):
        super().__init__()
        self.name = name
        self.encoder, self.level_index = features_model(name, strides, load_weights)
        blocks = len(self.encoder.blocks)
        if not 0 <= trainable_stages <= blocks:
            raise IdgbrError(f"image_encoder_trainable_stages must lie in [0, {blocks}] for {name} here, "
                             f"got {trainable_stages}")
        self.encoder.requires_grad_(False)
        for block in self.encoder.blocks[blocks - trainable_stages:] if trainable_stages else []:
            block.requires_grad_(True)
        widths = self.encoder.feature_info.channels()
        self.proj = nn.ModuleList(nn.Conv2d(widths[i], c, kernel_size=1) for i, c in zip(self.level_index, channels))
        self.encoder.eval()

    def train(self, mode: bool = True) -> "PretrainedImageBranch":
        super().train(mode)
        self.encoder.eval()  # BatchNorm keeps the ImageNet statistics, also in fine-tuned blocks
        return self

    def finetuned_parameters(self) -> list[nn.Parameter]:
        """The encoder's trainable parameters (the last blocks when fine-tuning), for the low-lr group."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor, normalization: str) -> list[torch.Tensor]:
        """Model-range RGB (B, 3, H, W) -> per level (B, C_l, H / s_l, W / s_l)."""
        inputs = encoder_input(x, normalization, self.name)
        if self.finetuned_parameters():
            features = self.encoder(inputs)
        else:
            with torch.no_grad():
                features = self.encoder(inputs)
        return [proj(features[i]) for proj, i in zip(self.proj, self.level_index)]
