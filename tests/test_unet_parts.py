"""Encoder/decoder halves of UNet2DConditionModel reproduce diffusers' forward and its ControlNet residual path."""

import torch
from diffusers import UNet2DConditionModel

from idgbr.nn import unet_parts
from idgbr.nn.config import RefinerConfig
from idgbr.nn.model import unet_config

torch.set_num_threads(1)  # the CI/dev box is small and shared: avoid thread oversubscription


def _tiny_unet(types=("DownBlock2D", "CrossAttnDownBlock2D"), up=("CrossAttnUpBlock2D", "UpBlock2D")):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=types, up_block_types=up,
                                cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()


def test_halves_equal_forward_and_residuals():
    unet = _tiny_unet()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    context = torch.randn(2, 3, 8)
    with torch.no_grad():
        emb, skips, mid = unet_parts.encode(unet, x, t, context)
        assert len(skips) + 1 == unet_parts.num_levels(unet) == 5
        assert [s.shape[1] for s in skips] + [mid.shape[1]] == unet_parts.level_channels(unet)
        assert [8 // s.shape[-1] for s in skips] + [8 // mid.shape[-1]] == unet_parts.level_strides(unet)
        torch.testing.assert_close(unet_parts.decode(unet, emb, skips, mid, context), unet(x, t, context).sample,
                                   atol=1e-5, rtol=1e-5)
        residuals = [torch.randn_like(s) for s in skips]
        mid_residual = torch.randn_like(mid)
        ours = unet_parts.decode(unet, emb, [s + r for s, r in zip(skips, residuals)], mid + mid_residual, context)
        theirs = unet(x, t, context, down_block_additional_residuals=residuals,
                      mid_block_additional_residual=mid_residual).sample
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_odd_size_upsample():
    unet = _tiny_unet(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"))
    x = torch.randn(1, 4, 7, 10)  # 7 is not a multiple of 2: upsample_size is forwarded
    context = torch.randn(1, 2, 8)
    with torch.no_grad():
        emb, skips, mid = unet_parts.encode(unet, x, 10, context)
        torch.testing.assert_close(unet_parts.decode(unet, emb, skips, mid, context), unet(x, 10, context).sample,
                                   atol=1e-5, rtol=1e-5)


def test_sd15_level_count_on_meta():
    config = RefinerConfig.preset_config("sd15")
    assert unet_parts.num_levels(unet_config(config, 4)) == 13
    assert unet_parts.level_channels(unet_config(config, 4)) == [320] * 4 + [640] * 3 + [1280] * 6
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(config, 4))
    assert unet_parts.level_channels(unet) == unet_parts.level_channels(unet_config(config, 4))
    assert 850e6 < sum(p.numel() for p in unet.parameters()) < 870e6  # SD-1.5 UNet, ~859.5M (reference §3.1)
