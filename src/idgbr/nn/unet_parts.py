"""Run a diffusers ``UNet2DConditionModel`` as two halves: encoder (time embedding, conv_in, down blocks, mid) and
decoder (up blocks, norm, act, conv_out).

With the halves apart the denoiser's own encoder runs once per step: its features feed the CG modules and, with
the CG residuals added, its decoder. (The reference runs the encoder twice per step, reference §10.18.) The
functions follow ``UNet2DConditionModel.forward`` for the plain configuration used by SD-1.5 and our presets
(no class/addition embeddings, no encoder_hid_proj); other configurations are refused.

Feature levels (reference §3.2): ``skips[0]`` is the conv_in output, then every down-block residual in diffusers
order (resnet/attention outputs, then the downsampler); ``mid`` is the mid-block output. SD-1.5 has 12 skips + mid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _config(unet_or_config: Any) -> Any:
    return getattr(unet_or_config, "config", unet_or_config)


def _get(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, dict) else getattr(config, key)


def level_channels(unet_or_config: Any) -> list[int]:
    """Channels of every feature level (skips, then mid) from a UNet or its config; 13 entries for SD-1.5."""
    config = _config(unet_or_config)
    channels = list(_get(config, "block_out_channels"))
    layers = _get(config, "layers_per_block")
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out = [channels[0]]
    for i, (c, n) in enumerate(zip(channels, layers)):
        out += [c] * n
        if i < len(channels) - 1:
            out.append(c)  # downsampler
    out.append(channels[-1])  # mid
    return out


def level_strides(unet_or_config: Any) -> list[int]:
    """Spatial downsampling (relative to the latent) of every level, same order as :func:`level_channels`."""
    config = _config(unet_or_config)
    channels = list(_get(config, "block_out_channels"))
    layers = _get(config, "layers_per_block")
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    out = [1]
    for i, n in enumerate(layers):
        out += [2**i] * n
        if i < len(channels) - 1:
            out.append(2 ** (i + 1))
    out.append(2 ** (len(channels) - 1))
    return out


def num_levels(unet_or_config: Any) -> int:
    return len(level_channels(unet_or_config))


def check_supported(unet: nn.Module) -> None:
    """Refuse UNet configurations whose forward uses embeddings these halves do not reproduce."""
    config = unet.config
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim"):
        if config.get(key) is not None:
            raise ValueError(f"unet_parts does not support UNet2DConditionModel with {key}={config.get(key)!r}")
    if config.get("num_class_embeds") is not None or config.get("center_input_sample"):
        raise ValueError("unet_parts does not support class embeddings or center_input_sample")


def time_embedding(unet: nn.Module, timestep: torch.Tensor | int | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Timestep(s) -> (batch, time_embed_dim), as in ``UNet2DConditionModel.get_time_embed`` + ``time_embedding``.

    ``unet`` is anything with ``time_proj``, ``time_embedding`` and optional ``time_embed_act`` (a UNet or a
    :class:`~idgbr.nn.guidance.GuidanceEncoder`).
    """
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], dtype=torch.float32 if isinstance(timestep, float) else torch.long)
    timestep = timestep.to(like.device)
    if timestep.ndim == 0:
        timestep = timestep[None]
    timestep = timestep.expand(batch)
    t_emb = unet.time_proj(timestep).to(dtype=like.dtype)
    emb = unet.time_embedding(t_emb)
    act = getattr(unet, "time_embed_act", None)
    return act(emb) if act is not None else emb


def encode_features(
    unet: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Down blocks + mid on a conv_in output.

    Args:
        hidden: (B, C0, h, w) conv_in output; emb: (B, E) time embedding; context: (B, L, D) cross-attention tokens.
    Returns:
        skips (conv_in output, then every down residual) and mid (B, C_last, h/2^(n-1), w/2^(n-1)).
    """
    skips = [hidden]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, residuals = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
        else:
            hidden, residuals = block(hidden_states=hidden, temb=emb)
        skips.extend(residuals)
    if getattr(unet.mid_block, "has_cross_attention", False):
        mid = unet.mid_block(hidden, emb, encoder_hidden_states=context)
    else:
        mid = unet.mid_block(hidden, emb)
    return skips, mid


def encode(
    unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | int | float, context: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Encoder half: (B, C_in, h, w) -> (emb (B, E), skips, mid). See :func:`encode_features`."""
    emb = time_embedding(unet, timestep, sample.shape[0], sample)
    hidden = unet.conv_in(sample)
    skips, mid = encode_features(unet, hidden, emb, context)
    return emb, skips, mid


def decode(
    unet: nn.Module, emb: torch.Tensor, skips: list[torch.Tensor], mid: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Decoder half: up blocks consume ``skips`` (last first), then norm, act, conv_out -> (B, C_out, h, w)."""
    skips = list(skips)
    hidden = mid
    upsample_factor = 2 ** len([b for b in unet.up_blocks if getattr(b, "upsamplers", None)])
    forward_upsample_size = any(d % upsample_factor for d in skips[0].shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        residuals, skips = tuple(skips[-n:]), skips[:-n]
        upsample_size = skips[-1].shape[2:] if (forward_upsample_size and i < len(unet.up_blocks) - 1) else None
        if getattr(block, "has_cross_attention", False):
            hidden = block(
                hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals,
                encoder_hidden_states=context, upsample_size=upsample_size,
            )
        else:
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_norm_out(hidden)
        hidden = unet.conv_act(hidden)
    return unet.conv_out(hidden)
