"""Conditional guidance: the pseudo-siamese guidance encoder and the CG modules (paper §III-B; reference §3.3-3.5).

* :class:`GuidanceEncoder` - a copy of the denoiser's conv_in, time embedding, down blocks and mid block (so for
  ``sd15`` it is the pretrained SD encoder, frozen). It runs at the constant timestep 1 with the same context on the
  image latent and on the coarse-label latent; its features do not depend on t and are computed once per tile.
  The image latent has its own conv_in (a copy of the denoiser's when the channel counts match, else a new conv).
  In ``lite``/``tiny`` it trains: a frozen *random* encoder guides poorly (issue 3), so there it is initialised as a
  copy of the (random) denoiser encoder and learns with the rest.
  With ``RefinerConfig.image_encoder`` set to a pretrained encoder, the image half of every level comes from
  :class:`idgbr.nn.image_branch.PretrainedImageBranch` instead, and this copy encodes the coarse-label latent only.
* :class:`CGModule` - one per feature level:
  ``f' = Conv1x1(concat(f_zt, f_img, f_coarse))`` (3C -> C, zero-initialised, ControlNet-style) and
  ``f_g = f' + proj(MHA(query=LN(W_q f' + pos), key=value=LN(W_k f_c + pos)))`` with ``f_c = concat(f_img, f_coarse)``
  over spatial tokens. ``f_g`` is added to the denoiser's skip (or mid) feature.

  Modes (``RefinerConfig.guidance_attention``): ``"live"`` zero-initialises only ``proj`` (the branch starts as a
  no-op and trains); ``"reference"`` zeroes every parameter, as the authors did, which makes the attention branch
  receive exactly zero gradient forever (reference §3.5); ``"none"`` has no attention (``f_g = f'``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_parts
from .image_branch import PretrainedImageBranch

AttentionMode = Literal["live", "reference", "none"]

GUIDANCE_TIMESTEP = 1  # the frozen encoder always runs at t = 1 (reference §3.3)


@dataclass
class GuidanceFeatures:
    """t-independent guidance features of one batch of tiles: per level, ``concat(f_img, f_coarse)`` (B, 2C, h, w).

    ``base``: the coarse label latent (B, C_lat, h, w) when the model predicts a residual on it, else None.
    ``band``: (B, 1, h, w) float mask of the latent cells near a coarse boundary, where alone the residual may
    correct the coarse latent (``residual_band``), else None.
    """

    levels: list[torch.Tensor]
    base: torch.Tensor | None = None
    band: torch.Tensor | None = None

    def _map(self, fn) -> "GuidanceFeatures":
        return GuidanceFeatures([fn(f) for f in self.levels], *(None if t is None else fn(t) for t in (self.base, self.band)))

    @property
    def batch_size(self) -> int:
        return self.levels[0].shape[0]

    def to(self, *args, **kwargs) -> "GuidanceFeatures":
        return self._map(lambda t: t.to(*args, **kwargs))

    def expand(self, batch: int) -> "GuidanceFeatures":
        """Broadcast a batch of 1 to ``batch``; a batch equal to ``batch`` is returned as is."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"guidance features have batch {self.batch_size}, expected 1 or {batch}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def __getitem__(self, index) -> "GuidanceFeatures":
        return self._map(lambda t: t[index])


class GuidanceEncoder(nn.Module):
    """Copy of a UNet's encoder half, with a second conv_in for the image latent."""

    def __init__(self, unet: nn.Module, image_latent_channels: int | None):
        super().__init__()
        unet_parts.check_supported(unet)
        self.conv_in = copy.deepcopy(unet.conv_in)
        if image_latent_channels is None:  # the image features come from a pretrained branch
            self.conv_in_image = None
        elif image_latent_channels == unet.conv_in.in_channels:
            self.conv_in_image = copy.deepcopy(unet.conv_in)
        else:
            c = unet.conv_in
            self.conv_in_image = nn.Conv2d(image_latent_channels, c.out_channels, c.kernel_size, padding=c.padding)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.time_embed_act = copy.deepcopy(getattr(unet, "time_embed_act", None))
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)

    def forward(self, z_img: torch.Tensor | None, z_coarse: torch.Tensor | None, context: torch.Tensor,
                image_levels: list[torch.Tensor] | None = None) -> GuidanceFeatures:
        """Encode both latents at t = 1 in one batched pass.

        Args:
            z_img: (B, C_img, h, w); z_coarse: (B, C_lbl, h, w), or None for image-only guidance (Exp. A: the
                coarse features are zeros); context: (1 or B, L, D).
            image_levels: per level (B, C, h_l, w_l) image features from a pretrained branch; then ``z_img`` is
                not encoded here (pass None).
        Returns:
            per level ``concat(f_img, f_coarse)`` of shape (B, 2C, h_l, w_l).
        """
        if image_levels is not None:
            if z_coarse is None:
                return GuidanceFeatures([torch.cat([f, torch.zeros_like(f)], 1) for f in image_levels])
            batch, hidden = 0, self.conv_in(z_coarse)
        else:
            batch = z_img.shape[0]
            hidden = self.conv_in_image(z_img)
            if z_coarse is not None:
                hidden = torch.cat([hidden, self.conv_in(z_coarse)], 0)
        n = hidden.shape[0]
        context = context.expand(n, *context.shape[1:]) if context.shape[0] == 1 else context.repeat(n // context.shape[0], 1, 1)
        emb = unet_parts.time_embedding(self, GUIDANCE_TIMESTEP, n, hidden)
        skips, mid = unet_parts.encode_features(self, hidden, emb, context)
        levels = []
        for level, feature in enumerate(skips + [mid]):
            image_part = feature[:batch] if image_levels is None else image_levels[level]
            coarse_part = feature[batch:] if z_coarse is not None else torch.zeros_like(image_part)
            levels.append(torch.cat([image_part, coarse_part], 1))
        return GuidanceFeatures(levels)


class CGModule(nn.Module):
    """One conditional-guidance module for a level with ``channels`` channels.

    Shapes: ``f_zt`` (B, C, h, w), ``f_c`` (B, 2C, h, w) -> ``f_g`` (B, C, h, w).
    ``kv_grid`` > 0 average-pools the key/value tokens to at most kv_grid x kv_grid (cheap attention on CPU at
    high resolution; 0 = full resolution, as in the reference).
    """

    def __init__(self, channels: int, width: int, heads: int, mode: AttentionMode = "live", grid: int = 16, kv_grid: int = 0):
        super().__init__()
        if mode not in ("live", "reference", "none"):
            raise ValueError(f"unknown guidance attention mode {mode!r}")
        self.mode = mode
        self.kv_grid = kv_grid
        self.fuse = nn.Conv2d(3 * channels, channels, kernel_size=1)  # the "zero conv"
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)
        if mode == "none":
            return
        self.query_in = nn.Conv2d(channels, width, kernel_size=1, bias=False)
        self.key_in = nn.Conv2d(2 * channels, width, kernel_size=1, bias=False)
        self.pos_embed = nn.Parameter(torch.randn(1, width, grid, grid) * width**-0.5)
        self.norm_query = nn.LayerNorm(width)
        self.norm_key = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.proj = nn.Conv2d(width, channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.proj.weight)  # live: the branch starts as a no-op but receives gradient
        if mode == "reference":  # every parameter zero: the authors' dead branch (reference §3.5)
            for p in self.parameters():
                nn.init.zeros_(p)

    def attention_parameters(self) -> list[nn.Parameter]:
        """Parameters of the cross-attention branch (empty in mode "none")."""
        return [p for n, p in self.named_parameters() if not n.startswith("fuse.")]

    def _position(self, size: torch.Size) -> torch.Tensor:
        """The positional embedding at grid ``size``: the parameter itself at its own size; otherwise bicubic
        interpolated, and outside training kept per size until the parameter changes (once per size, not per call)."""
        pos = self.pos_embed
        if pos.shape[-2:] == size:
            return pos
        if self.training and torch.is_grad_enabled():
            return F.interpolate(pos, size=size, mode="bicubic", align_corners=False)
        key = (tuple(size), pos._version, pos.device, pos.dtype)
        cache = self.__dict__.setdefault("_pos_cache", {})
        if key not in cache:
            if len(cache) >= 8:
                cache.clear()
            with torch.no_grad():
                cache[key] = F.interpolate(pos, size=size, mode="bicubic", align_corners=False)
        return cache[key]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, h, w) + positional embedding -> (B, h w, W)."""
        return (x + self._position(x.shape[-2:])).flatten(2).transpose(1, 2)

    def forward(self, f_zt: torch.Tensor, f_c: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([f_zt, f_c], 1))
        if self.mode == "none":
            return fused
        height, width = fused.shape[-2:]
        query = self.norm_query(self._tokens(self.query_in(fused)))
        key_map = self.key_in(f_c)
        if self.kv_grid and max(key_map.shape[-2:]) > self.kv_grid:
            key_map = F.adaptive_avg_pool2d(key_map, (min(self.kv_grid, height), min(self.kv_grid, width)))
        key = self.norm_key(self._tokens(key_map))
        attended, _ = self.attn(query, key, key, need_weights=False)
        attended = attended.transpose(1, 2).reshape(fused.shape[0], -1, height, width)
        return fused + self.proj(attended)


class GuidanceNetwork(nn.Module):
    """The guidance encoder plus one CG module per level (levels and channels from the UNet config).

    ``image_encoder`` "copy" (the default) encodes the image latent with the copied encoder; a registered pretrained
    encoder name gives the image features to a :class:`~idgbr.nn.image_branch.PretrainedImageBranch` instead, whose
    levels sit at ``latent_factor`` x the UNet's strides in image pixels.
    """

    def __init__(
        self,
        unet: nn.Module,
        image_latent_channels: int,
        width: int,
        heads: int,
        mode: AttentionMode = "live",
        base_grid: int = 64,
        kv_grid: int = 0,
        freeze_encoder: bool = False,
        attention_stride: int = 1,
        image_encoder: str = "copy",
        latent_factor: int = 1,
        trainable_stages: int = 0,
        load_weights: bool = True,
    ):
        super().__init__()
        pretrained = image_encoder != "copy"
        self.encoder = GuidanceEncoder(unet, None if pretrained else image_latent_channels)
        self.image_branch: PretrainedImageBranch | None = None
        if pretrained:
            self.image_branch = PretrainedImageBranch(
                image_encoder, [s * latent_factor for s in unet_parts.level_strides(unet)],
                unet_parts.level_channels(unet), trainable_stages, load_weights)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        channels = unet_parts.level_channels(unet)
        strides = unet_parts.level_strides(unet)
        self.cg = nn.ModuleList(
            CGModule(c, width, heads, mode if s >= attention_stride else "none", grid=max(1, base_grid // s), kv_grid=kv_grid)
            for c, s in zip(channels, strides)
        )

    def train(self, mode: bool = True) -> "GuidanceNetwork":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, z_img: torch.Tensor, z_coarse: torch.Tensor | None, context: torch.Tensor,
               image: torch.Tensor | None = None, normalization: str = "minus_one_one") -> GuidanceFeatures:
        """t-independent features; under no_grad when the encoder is frozen. ``image``: the model-range image
        (B, 3, H, W) in ``normalization``, which the pretrained image branch reads (ignored without one)."""
        image_levels = None
        if self.image_branch is not None:
            if image is None:
                raise ValueError("the pretrained image branch needs the image: encode(..., image=x)")
            image_levels = self.image_branch(image, normalization)
            z_img = None
        if self.freeze_encoder and image_levels is None:
            with torch.no_grad():
                return self.encoder(z_img, z_coarse, context)
        if self.freeze_encoder:  # no graph through the frozen copy, but the image levels keep theirs
            context = context.detach()
        return self.encoder(z_img, z_coarse, context, image_levels)

    def residuals(self, query_levels: list[torch.Tensor], cond: GuidanceFeatures) -> list[torch.Tensor]:
        """Per level ``f_g = CG_l(f_zt_l, f_c_l)``; ``query_levels`` are the denoiser's skips + mid."""
        if len(query_levels) != len(self.cg) or len(cond.levels) != len(self.cg):
            raise ValueError(f"expected {len(self.cg)} levels, got {len(query_levels)} and {len(cond.levels)}")
        return [module(f_zt, f_c) for module, f_zt, f_c in zip(self.cg, query_levels, cond.levels)]
