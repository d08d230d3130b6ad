"""Latent codecs: exact space-to-depth round trip (any bands), VAE codec with a tiny random AutoencoderKL."""

import torch
from diffusers import AutoencoderKL

from idgbr.nn.codecs import SpaceToDepthCodec, VAECodec

torch.set_num_threads(1)  # the CI/dev box is small and shared: avoid thread oversubscription


def test_space_to_depth_roundtrip_multiband():
    codec = SpaceToDepthCodec(4)
    image = torch.randn(2, 5, 16, 24)
    z = codec.encode_image(image)
    assert z.shape == (2, codec.image_latent_channels(5), 4, 6) == (2, 80, 4, 6)
    e = torch.rand(2, 3, 16, 24) * 2 - 1
    ze = codec.encode_embedding(e)
    assert ze.shape[1] == codec.label_latent_channels == 48
    assert torch.equal(codec.decode_embedding(ze), e)
    assert codec.factor == 4 and not list(codec.parameters())


def test_vae_codec_tiny():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1).eval()
    codec = VAECodec(vae, scaling_factor=0.5)
    assert codec.factor == 2 and codec.label_latent_channels == 4 and codec.image_latent_channels(7) == 4
    e = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = codec.encode_embedding(e)
        assert z.shape == (1, 4, 4, 4)
        mode = vae.encode(e).latent_dist.mode() * 0.5
        torch.testing.assert_close(z, mode)  # deterministic: the posterior mode
        assert codec.decode_embedding(z).shape == (1, 3, 8, 8)
        torch.testing.assert_close(codec.decode_embedding(z), vae.decode(z / 0.5).sample)
        # multi-band images: the first three bands are used
        image = torch.rand(1, 5, 8, 8) * 2 - 1
        torch.testing.assert_close(codec.encode_image(image), codec.encode_embedding(image[:, :3]))
        sampling = VAECodec(vae, 0.5, sample_posterior=True)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        assert torch.equal(sampling.encode_embedding(e, g1), sampling.encode_embedding(e, g2))
