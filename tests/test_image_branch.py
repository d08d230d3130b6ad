"""The pretrained image branch of the guidance (``RefinerConfig.image_encoder``) and REPA against a packaged encoder
(``repa_target``): the switch, what trains and what does not, save/load, the control, and unchanged defaults."""

import sys

import numpy as np
import pytest
import torch

from idgbr.evaluation.benchmark import control_config
from idgbr.nn.config import RefinerConfig
from idgbr.nn.encoders import ENCODERS
from idgbr.errors import IdgbrError
from idgbr.nn.image_branch import encoder_input
from idgbr.nn.model import IDGBRModel
from idgbr.nn.repa import EncoderTeacher
from idgbr.training.objective import RefinerObjective
from idgbr.training.loop import make_optimizer

NAME = "tf_efficientnet_lite0"
K = 3


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def config(preset: str = "tiny", **overrides) -> RefinerConfig:
    values = dict(num_classes=K, image_encoder=NAME, crop_size=32, tile_size=32)
    return RefinerConfig.preset_config(preset, **{**values, **overrides})


def warm(model: IDGBRModel) -> IDGBRModel:
    """Move the CG modules off their zero initialisation, as training does: at init the zero-conv and the zero
    output projection pass no gradient back to the guidance features (and AdamW's weight decay alone moves every
    weight, so only gradients tell what trains)."""
    with torch.no_grad():
        for p in model.guidance.cg.parameters():
            p.add_(0.05)
    return model


def batch(size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (2, size, size), generator=g)
    labels[:, : size // 2] = 0  # some regions, so that boundaries exist
    image = (labels[:, None] * 70 + torch.randint(0, 40, (2, 3, size, size), generator=g)).to(torch.uint8)
    return image, labels


def step(model: IDGBRModel, cfg: RefinerConfig, teacher: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One optimiser step of the real objective and optimiser (groups as train_refiner builds them)."""
    image, labels = batch()
    objective = RefinerObjective(model, cfg).train()
    params = [p for p in model.trainable_parameters()]
    optimizer = make_optimizer(cfg, model.optimizer_groups(params), "cpu")
    losses = objective(image, labels, labels, torch.Generator().manual_seed(0), teacher=teacher)
    losses["loss"].backward()
    optimizer.step()
    return losses


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_switch_builds_levels_at_the_matching_strides():
    torch.manual_seed(0)
    for preset, strides in (("tiny", [4, 4, 8, 8, 8]), ("lite", [4, 4, 8, 8, 16, 16, 16])):
        model = IDGBRModel(config(preset, crop_size=64, tile_size=64, image_encoder_trainable_stages=0))
        branch = model.guidance.image_branch
        assert model.guidance.encoder.conv_in_image is None  # the copy reads the coarse latent only
        reductions = branch.encoder.feature_info.reduction()
        assert [reductions[i] for i in branch.level_index] == strides
        image, labels = batch(64)
        x = model.normalize_image(image)
        cond = model.condition(model.encode_image(x), model.encode_labels(labels), labels, image=x)
        channels = [2 * p.out_channels for p in branch.proj]
        assert [tuple(f.shape) for f in cond.levels] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    # lite needs the stem and blocks up to stride 16 (blocks 0-4), not the stride-32 blocks
    assert len(branch.encoder.blocks) == 5
    assert model.parameter_counts()["image_encoder"] == (721616, 20848)  # 700 768 frozen + 20 848 projections


def test_encoder_input_matches_the_weights_normalisation():
    rgb = torch.randint(0, 256, (2, 3, 8, 8)).float()
    want = rgb / 127.5 - 1  # encoders.normalize: TF style
    assert torch.allclose(encoder_input(rgb / 255 * 2 - 1, "minus_one_one", NAME), want, atol=1e-5)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert torch.allclose(encoder_input((rgb / 255 - mean) / std, "imagenet", NAME), want, atol=1e-5)


def test_bad_switches_are_one_line_errors(tmp_path):
    with pytest.raises(IdgbrError, match="unknown image_encoder 'resnet50'; choose one of copy, tf_eff"):
        config(image_encoder="resnet50")
    with pytest.raises(IdgbrError, match="reads RGB, but image_channels is 4; use image_encoder='copy'"):
        config(image_channels=4)
    with pytest.raises(IdgbrError, match="unknown repa_target"):
        config(repa_target="dinov3")
    with pytest.raises(IdgbrError, match=r"no features at stride 64 px .*use image_encoder='copy'"):
        IDGBRModel(config("lite", latent_factor=16, tile_size=64, crop_size=64))  # strides 16, 32, 64
    with pytest.raises(IdgbrError, match=r"trainable_stages must lie in \[0, 3\]"):
        IDGBRModel(config(image_encoder_trainable_stages=4))  # tiny keeps blocks 0-2
    from idgbr.training.batches import resolve_config

    class Data:  # the dataset's images decide the bands
        root = tmp_path
        classes = type("C", (), {"num_classes": K})()

    samples = [{"image": np.zeros((32, 32, 4), np.uint8)}]
    with pytest.raises(IdgbrError) as info:
        resolve_config(config(), Data(), samples)
    assert str(tmp_path / "images") in str(info.value) and "image_encoder='copy'" in str(info.value)
    assert "\n" not in str(info.value)


def test_frozen_encoder_gets_no_gradient_and_does_not_move():
    torch.manual_seed(0)
    cfg = config()
    model = warm(IDGBRModel(cfg))
    encoder, proj = model.guidance.image_branch.encoder, model.guidance.image_branch.proj
    assert not any(p.requires_grad for p in encoder.parameters())
    before_enc, before_proj, before_cg = snapshot(encoder), snapshot(proj), snapshot(model.guidance.cg)
    step(model, cfg)
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert not changed(before_enc, encoder)  # weights and BatchNorm statistics (eval mode in training)
    assert changed(before_proj, proj) == set(before_proj)  # every projection weight and bias trained
    assert any(k.startswith("0.fuse") for k in changed(before_cg, model.guidance.cg))
    assert model.training and not encoder.training


def test_finetuned_stages_train_at_the_scaled_lr():
    torch.manual_seed(0)
    cfg = config(image_encoder_trainable_stages=1, image_encoder_lr_scale=0.1)
    model = warm(IDGBRModel(cfg))
    encoder = model.guidance.image_branch.encoder
    groups = model.optimizer_groups(model.trainable_parameters())
    last = list(encoder.blocks[-1].parameters())
    assert groups[1]["lr"] == pytest.approx(cfg.lr * 0.1)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in last}
    assert not any(id(p) in {id(q) for q in last} for p in groups[0]["params"])
    before = snapshot(encoder)
    step(model, cfg)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last)
    moved = changed(before, encoder)
    assert moved and all(k.startswith("blocks.2.") for k in moved)  # only the last kept block (tiny: blocks 0-2)
    assert not any("running" in k for k in moved)  # BatchNorm statistics stay ImageNet's
    # the step of the fine-tuned block is the scaled one: AdamW's first step moves each weight by ~lr (sign-like)
    weight = "blocks.2.0.conv_pwl.weight"
    delta = (encoder.state_dict()[weight] - before[weight]).abs().max().item()
    assert delta < 2 * cfg.lr * 0.1


def test_save_load_gives_identical_outputs_without_the_package(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = config(image_encoder_trainable_stages=1)
    model = IDGBRModel(cfg)
    step(model, cfg)  # the fine-tuned block differs from the package's weights now
    model.eval().save_pretrained(tmp_path / "m")
    monkeypatch.setitem(sys.modules, ENCODERS[NAME].module, None)  # the weights package is not importable
    loaded = IDGBRModel.from_pretrained(tmp_path / "m").eval()
    image, labels = batch()
    outputs = []
    for m in (model, loaded):
        with torch.no_grad():
            x = m.normalize_image(image)
            z = m.encode_labels(labels)
            cond = m.condition(m.encode_image(x), z, labels, image=x)
            outputs.append(m(torch.ones_like(z), torch.tensor([5, 900]), cond))
    assert torch.equal(*outputs)
    assert loaded.config.image_encoder == NAME and loaded.config.image_encoder_trainable_stages == 1


def test_refinement_computes_the_encoder_features_once_per_tile():
    from idgbr.inference.pipeline import Refiner

    torch.manual_seed(0)
    model = IDGBRModel(config())
    calls = []
    model.guidance.image_branch.encoder.register_forward_hook(lambda *args: calls.append(1))
    image, labels = batch()
    Refiner(model).refine(image[0].permute(1, 2, 0).numpy(), labels[0].numpy().astype(np.uint8), steps=3,
                          guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # one 32 px tile, 3 denoising steps
    calls.clear()
    step(model, config())
    assert len(calls) == 1  # one training batch


def test_repa_against_the_encoder_changes_the_weights():
    torch.manual_seed(0)
    cfg = config(repa_target=NAME)
    assert cfg.repa_on and not config().repa_on
    teacher = EncoderTeacher(NAME)
    image, _ = batch()
    tokens = teacher(IDGBRModel(config()).normalize_image(image), cfg.image_normalization)
    assert tuple(tokens.shape) == (2, 1, 320)  # a 32 px crop: one stride-32 token of 320 channels
    after = []
    for with_repa in (False, True):
        torch.manual_seed(0)
        model = warm(IDGBRModel(cfg))  # a trained CG output (at zero REPA has no student tokens to align)
        model.build_projector(teacher.dim)
        losses = step(model, cfg, tokens if with_repa else None)
        after.append((losses, snapshot(model.guidance.cg)))
    (plain, cg_plain), (repa, cg_repa) = after
    assert float(plain["repa"]) == 0 and -1 <= float(repa["repa"].detach()) < 0
    assert torch.equal(plain["main"], repa["main"])
    assert float(repa["loss"].detach()) == pytest.approx(float(repa["main"]) + cfg.repa_weight * float(repa["repa"].detach()))
    assert any(not torch.equal(cg_plain[k], cg_repa[k]) for k in cg_plain)


def test_the_control_gets_the_same_encoder():
    cfg = config(image_encoder_trainable_stages=2, image_encoder_lr_scale=0.05, repa_target=NAME)
    control = control_config(cfg)
    assert control.objective == "deterministic"
    assert {**control.to_dict(), "objective": cfg.objective} == cfg.to_dict()
    torch.manual_seed(0)
    model = IDGBRModel(control)
    assert model.guidance.image_branch is not None
    before = snapshot(model.guidance.image_branch.proj)
    step(model, control)  # the deterministic objective reads the encoder's features too
    assert changed(before, model.guidance.image_branch.proj)


def test_default_outputs_unchanged():
    """Pinned from the code before the switch existed (commit 2afde7d), bit for bit on one thread."""
    pins = {"tiny": (388, 3999.3935882553924, 7349.965751760406), "lite": (270, 17585.884379684925, 22710.59838861227)}
    for preset, (keys, total, absolute) in pins.items():
        torch.manual_seed(0)
        model = IDGBRModel(RefinerConfig.preset_config(preset, num_classes=K, crop_size=64, tile_size=64,
                                                       image_encoder="copy", image_encoder_trainable_stages=0))
        assert model.guidance.image_branch is None and model.config.repa_target == "dinov2"
        with torch.no_grad():
            for p in model.guidance.cg.parameters():
                p.add_(0.01)  # make the guidance matter
            for p in model.unet.conv_out.parameters():
                p.add_(0.01)
        g = torch.Generator().manual_seed(1)
        image = torch.randint(0, 256, (2, 3, 64, 64), generator=g).to(torch.uint8)
        labels = torch.randint(0, 3, (2, 64, 64), generator=g)
        x = model.normalize_image(image)
        z0 = model.encode_labels(labels)
        cond = model.condition(model.encode_image(x), z0, labels)
        with torch.no_grad():
            out = model(torch.randn(z0.shape, generator=g), torch.tensor([10, 700]), cond).double()
        assert len(model.state_dict()) == keys
        assert out.sum().item() == pytest.approx(total, rel=1e-6)
        assert out.abs().sum().item() == pytest.approx(absolute, rel=1e-6)


def test_compile_covers_the_image_branch():
    """compile=True compiles the pretrained image encoder too (it runs in condition(), outside model.forward). Only
    the wrappers are checked here: compiling itself takes minutes and is a GPU switch."""
    from idgbr.training.loop import apply_throughput_switches

    model = IDGBRModel(config(compile=True))
    apply_throughput_switches(model.config, model, "cpu")
    assert model._compiled_call_impl is not None
    assert model.guidance.image_branch._compiled_call_impl is not None
