"""Latent codecs: where images and label embeddings live while the denoiser works on them.

Two codecs share one interface (``encode_image``, ``encode_embedding``, ``decode_embedding``, ``factor``,
``image_latent_channels(bands)``, ``label_latent_channels``):

* :class:`VAECodec` - the paper's codec (§III-A; reference §2.2): ``E_S(y) = VAE_enc(E_e(y)) * s`` and
  ``D_S(z) = D_e(VAE_dec(z / s))`` with the frozen SD-1.5 ``AutoencoderKL`` (s = 0.18215). This class handles the VAE
  part; the label embedding (E_e, D_e) is applied by the model around it.
* :class:`SpaceToDepthCodec` - weight-free and exactly invertible, for the ``lite``/``tiny`` presets: a latent is
  ``pixel_unshuffle`` of the normalised image (any number of bands) or of the 3-channel label embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpaceToDepthCodec(nn.Module):
    """Weight-free codec: (B, C, H, W) <-> (B, C f^2, H/f, W/f) by pixel (un)shuffle; exact inverse."""

    def __init__(self, factor: int, embed_dim: int = 3):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self._factor = factor
        self.embed_dim = embed_dim

    @property
    def factor(self) -> int:
        return self._factor

    def image_latent_channels(self, bands: int) -> int:
        return bands * self._factor**2

    @property
    def label_latent_channels(self) -> int:
        return self.embed_dim * self._factor**2

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] % self._factor or x.shape[-2] % self._factor:
            raise ValueError(f"spatial size {tuple(x.shape[-2:])} is not a multiple of the codec factor {self._factor}")

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, bands, H, W) normalised image -> (B, bands f^2, H/f, W/f)."""
        self._check(x)
        return F.pixel_unshuffle(x, self._factor)

    def encode_embedding(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) label embedding -> (B, 3 f^2, H/f, W/f)."""
        self._check(e)
        return F.pixel_unshuffle(e, self._factor)

    def decode_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 3 f^2, h, w) -> (B, 3, h f, w f)."""
        return F.pixel_shuffle(z, self._factor)


class VAECodec(nn.Module):
    """The SD VAE as a codec (frozen): images and embeddings in [-1, 1] -> 4-channel latents at 1/8 size.

    Multi-band imagery: the VAE sees the first three bands (documented limitation; the lite/tiny presets use the
    space-to-depth codec, which takes any number of bands).
    """

    def __init__(self, vae: nn.Module, scaling_factor: float = 0.18215, sample_posterior: bool = False):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        # The reference samples the posterior (reference §1.3); the mode is the deterministic default here.
        self.sample_posterior = sample_posterior

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_latent_channels(self, bands: int) -> int:
        return self.vae.config.latent_channels

    @property
    def label_latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def _encode(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(x.to(dtype)).latent_dist
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return z * self.scaling_factor

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, bands, H, W) in [-1, 1] -> (B, 4, H/8, W/8); bands beyond the first three are not used."""
        if x.shape[1] < 3:
            x = x.repeat(1, 3, 1, 1)[:, :3] if x.shape[1] == 1 else torch.cat([x, x[:, :1]], 1)[:, :3]
        return self._encode(x[:, :3], generator)

    def encode_embedding(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """E_S without E_e: (B, 3, H, W) embedding in [-1, 1] -> (B, 4, H/8, W/8)."""
        return self._encode(e, generator)

    def decode_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """D_S without D_e: (B, 4, h, w) -> (B, 3, 8h, 8w) (not clamped, as in the reference)."""
        dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(z.to(dtype) / self.scaling_factor).sample
