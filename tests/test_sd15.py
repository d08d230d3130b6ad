"""The paper's model (the ``sd15`` preset) in CI, at toy width: the same code path as SD-1.5 (VAE codec, frozen
guidance encoder copied from the UNet, 13 CG levels, CLIP("") context, epsilon prediction), with every width 32.

* an objective step whose gradient reaches the denoiser and every CG module, and not the frozen parts;
* a 1-step refine and a 2-step CFG refine (CFG is u + g (c - u), two network evaluations per step);
* a save/load round trip;
* a tiny diffusers-format SD folder (random weights, written by diffusers' and transformers' own
  ``save_pretrained``) loaded by ``load_sd15`` and by ``idgbr train --preset sd15 --pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from idgbr.nn.config import RefinerConfig
from idgbr.nn.model import IDGBRModel, unet_config

torch.set_num_threads(1)  # shared CI box

WIDTH = 32
TOY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(WIDTH,) * 4, layers_per_block=1,
               latent_channels=4, norm_num_groups=32, sample_size=64)
# 8 norm groups (SD: 32 of 320+ channels): at a 64² input the deepest UNet level is 1 x 1, and a group needs > 1 value
TOY = dict(num_classes=3, block_out_channels=(WIDTH,) * 4, norm_num_groups=8, cross_attention_dim=WIDTH,
           guidance_attention_width=WIDTH, guidance_heads=4, crop_size=64, tile_size=64, tile_overlap=0, embed_hidden=16)


def toy_config(**overrides) -> RefinerConfig:
    return RefinerConfig.preset_config("sd15", **{**TOY, **overrides})


def toy_model(**overrides) -> IDGBRModel:
    torch.manual_seed(0)
    return IDGBRModel(toy_config(**overrides), load_weights=False, architecture={"vae": TOY_VAE})


def _batch(batch: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    mask = torch.zeros(batch, size, size, dtype=torch.long)
    mask[:, 16:48, 8:40] = 1
    mask[:, 40:, 40:] = 2
    coarse = torch.roll(mask, 3, dims=2)
    mask[:, 0, :4] = 255
    return image, mask, coarse, g


def _nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def _perturb_cg(model: IDGBRModel) -> None:
    """Make the zero-initialised CG outputs non-trivial, so that conditioning changes the prediction."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.guidance.cg:
            module.fuse.weight.copy_(torch.randn(module.fuse.weight.shape, generator=g) * 0.05)
            module.proj.weight.copy_(torch.randn(module.proj.weight.shape, generator=g) * 0.05)


def test_sd15_toy_is_the_paper_architecture() -> None:
    from idgbr.nn import unet_parts
    from idgbr.nn.codecs import VAECodec

    model = toy_model()
    cfg = model.config
    assert cfg.preset == "sd15" and cfg.prediction_type == "epsilon" and cfg.freeze_guidance_encoder
    assert isinstance(model.codec, VAECodec) and model.codec.factor == 8
    assert unet_parts.num_levels(model.unet) == len(model.guidance.cg) == 13
    assert [m.mode for m in model.guidance.cg] == ["live"] * 13 and all(m.kv_grid == 0 for m in model.guidance.cg)
    assert not any(p.requires_grad for p in model.guidance.encoder.parameters())
    assert not any(p.requires_grad for p in model.codec.vae.parameters())
    assert "context" in dict(model.named_buffers()) and tuple(model.context.shape) == (1, 77, WIDTH)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trainable for p in model.unet.parameters())
    assert all(id(p) in trainable for p in model.guidance.cg.parameters())
    assert not any(id(p) in trainable for p in model.label_embed.parameters())


def test_sd15_objective_step_reaches_denoiser_and_cg_modules() -> None:
    """One training step of the sd15 objective (epsilon + CE through the VAE decoder): gradient in the UNet (both
    halves) and in every CG module, none in the frozen guidance encoder, VAE or label embedding; the step moves the
    zero-initialised CG fusion off zero and leaves the frozen parts alone."""
    from idgbr.training.objective import RefinerObjective
    from idgbr.training.loop import make_optimizer

    model = toy_model(ce_weight=0.1, cond_dropout=0.0)
    objective = RefinerObjective(model, model.config)
    image, mask, coarse, g = _batch()
    losses = objective(image, mask, coarse, g)
    assert torch.isfinite(losses["loss"]) and losses["main"] > 0 and losses["ce"] > 0
    torch.testing.assert_close(losses["loss"], losses["main"] + 0.1 * losses["ce"])

    losses["ce"].backward(retain_graph=True)  # the CE term alone: through D_e and the VAE decoder to the UNet
    assert _nonzero(model.unet.conv_out.weight.grad)
    model.zero_grad(set_to_none=True)

    losses["loss"].backward()
    unet = model.unet
    for name, part in (("conv_in", unet.conv_in), ("down_blocks", unet.down_blocks), ("mid_block", unet.mid_block),
                       ("up_blocks", unet.up_blocks), ("conv_out", unet.conv_out)):
        assert any(_nonzero(p.grad) for p in part.parameters()), name
    for level, module in enumerate(model.guidance.cg):
        assert _nonzero(module.fuse.weight.grad), f"CG level {level}: fuse"
        assert _nonzero(module.proj.weight.grad), f"CG level {level}: attention output"
    for name, part in (("guidance encoder", model.guidance.encoder), ("VAE", model.codec.vae),
                       ("label embedding", model.label_embed)):
        assert all(p.grad is None for p in part.parameters()), name

    frozen = {k: v.clone() for k, v in model.guidance.encoder.state_dict().items()}
    vae = {k: v.clone() for k, v in model.codec.vae.state_dict().items()}
    optimizer = make_optimizer(model.config, model.trainable_parameters(), "cpu")
    optimizer.step()
    assert all(m.fuse.weight.abs().sum() > 0 for m in model.guidance.cg)
    assert all(torch.equal(v, model.guidance.encoder.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(v, model.codec.vae.state_dict()[k]) for k, v in vae.items())


def test_sd15_refine_one_step_and_two_step_cfg() -> None:
    from idgbr.inference.pipeline import Refiner

    model = toy_model()
    _perturb_cg(model)
    refiner = Refiner(model)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    coarse = np.zeros((64, 64), np.uint8)
    coarse[10:40, 20:50] = 1
    coarse[50:, :30] = 2
    one = refiner.refine(image, coarse, steps=1, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert one.shape == (64, 64) and one.dtype == np.uint8 and one.max() < 3 and refiner.last_nfe == 1
    cfg = refiner.refine(image, coarse, steps=2, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert cfg.shape == (64, 64) and cfg.max() < 3 and refiner.last_nfe == 2 * 2

    # CFG is u + g (c - u): the unconditional branch drops the CG residuals
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        onehot = torch.nn.functional.one_hot(torch.from_numpy(coarse).long(), 3).permute(2, 0, 1)[None].float()
        cond = model.condition(model.encode_image(model.normalize_image(x)), model.encode_labels(onehot))
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([500])
        conditional = model(z, t, cond)
        unconditional = model(z, t, cond, drop=torch.tensor([True]))
        guided = refiner._denoise(z, 500, cond, 3.0)
    assert (conditional - unconditional).abs().max() > 1e-4  # the conditioning matters, so the check means something
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5)


def test_sd15_save_load_round_trip(tmp_path: Path) -> None:
    model = toy_model().eval()
    _perturb_cg(model)
    model.save_pretrained(tmp_path / "m")
    architecture = json.loads((tmp_path / "m" / "architecture.json").read_text())
    assert architecture["vae"]["block_out_channels"] == [WIDTH] * 4
    loaded = IDGBRModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    image, mask, coarse, _ = _batch(1)
    with torch.no_grad():
        outs = []
        for m in (model, loaded):
            cond = m.condition(m.encode_image(m.normalize_image(image)), m.encode_labels(coarse))
            outs.append(m.decode_logits(m(m.encode_labels(mask.clamp(max=2)), torch.tensor([300]), cond)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(model.context, loaded.context)


# ---------------------------------------------------------------------------------------------------------------
# A diffusers-format SD folder with random weights, through the real loading code.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory) -> Path:
    """unet/, vae/, text_encoder/, tokenizer/ at toy width, written by the libraries' own save_pretrained."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd15") / "toy-sd15"
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_config(toy_config(), 4)).save_pretrained(root / "unet")
    AutoencoderKL(**TOY_VAE).save_pretrained(root / "vae")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3}
    source = root.parent / "tokenizer-source"
    source.mkdir()
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt"), model_max_length=77).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    return root


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_sd15_reads_a_diffusers_folder(sd15_folder: Path) -> None:
    """load_sd15 returns the folder's UNet and VAE and CLIP("") as context; IDGBRModel(sd15, pretrained=folder)
    holds them, with the guidance encoder a frozen copy of the pretrained UNet's encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from idgbr.nn.model import load_sd15

    unet, vae, context = load_sd15(str(sd15_folder))
    saved_unet = UNet2DConditionModel.from_pretrained(sd15_folder / "unet")
    saved_vae = AutoencoderKL.from_pretrained(sd15_folder / "vae")
    assert _same(unet.state_dict(), saved_unet.state_dict()) and _same(vae.state_dict(), saved_vae.state_dict())
    tokenizer = CLIPTokenizer.from_pretrained(sd15_folder / "tokenizer")
    ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == 0 and ids[0, 1] == 1
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(sd15_folder / "text_encoder")(ids)[0]
    assert context.shape == (1, 77, WIDTH) and torch.equal(context, expected)

    model = IDGBRModel(toy_config(pretrained=str(sd15_folder)))
    assert _same(model.unet.state_dict(), saved_unet.state_dict())
    assert _same(model.codec.vae.state_dict(), saved_vae.state_dict()) and torch.equal(model.context, expected)
    encoder = model.guidance.encoder
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        assert _same(getattr(encoder, part).state_dict(), getattr(saved_unet, part).state_dict()), part
    assert not any(p.requires_grad for p in encoder.parameters())


def test_cli_train_sd15_with_pretrained_folder(sd15_folder: Path, tmp_path: Path) -> None:
    """`idgbr train --preset sd15 --pretrained FOLDER` trains from the folder's weights: the UNet and the CG
    modules change, the VAE and the guidance encoder stay the pretrained ones; the run refines a tile."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from idgbr.commands.main import main
    from idgbr.inference.pipeline import Refiner
    from idgbr.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, n=3, size=64, seed=0)
    (data / "splits" / "train.txt").write_text("synth_0000\nsynth_0001\n")
    run = tmp_path / "run"
    args = ["train", "--preset", "sd15", "--pretrained", str(sd15_folder), "--data", str(data), "--out", str(run),
            "--steps", "2", "--batch", "2", "--crop", "64", "--checkpoint-every", "2", "--no-progress",
            "--set", "embed_steps=5"]
    for key in ("tile_size", "tile_overlap", "guidance_attention_width", "guidance_heads", "embed_hidden",
                "norm_num_groups"):
        args += ["--set", f"{key}={TOY[key]}"]
    assert main(args) == 0
    assert "finished 2 steps" in (run / "train.log").read_text()
    refiner = Refiner.from_pretrained(run)
    model = refiner.model
    saved_unet = UNet2DConditionModel.from_pretrained(sd15_folder / "unet")
    assert model.config.preset == "sd15" and model.config.pretrained == str(sd15_folder)
    assert _same(model.codec.vae.state_dict(), AutoencoderKL.from_pretrained(sd15_folder / "vae").state_dict())
    assert _same(model.guidance.encoder.down_blocks.state_dict(), saved_unet.down_blocks.state_dict())
    assert not _same(model.unet.state_dict(), saved_unet.state_dict())
    assert all(m.fuse.weight.abs().sum() > 0 for m in model.guidance.cg)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    refined = refiner.refine(image, np.zeros((64, 64), np.uint8), steps=1, guidance=1.0,
                             generator=torch.Generator().manual_seed(0))
    assert refined.shape == (64, 64) and refiner.last_nfe == 1
