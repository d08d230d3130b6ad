"""CG modules: the live attention branch trains, the reference branch stays dead, frozen parts stay frozen."""

import pytest
import torch

from idgbr.nn import unet_parts
from idgbr.nn.config import RefinerConfig
from idgbr.nn.guidance import CGModule
from idgbr.nn.model import IDGBRModel

torch.set_num_threads(1)  # the CI/dev box is small and shared: avoid thread oversubscription


def _model(**overrides):
    torch.manual_seed(0)
    return IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=3, **overrides))


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (2, 32, 32), generator=g)
    coarse = torch.randint(0, 3, (2, 32, 32), generator=g)
    return image, labels, coarse


def _step(model, optimizer, seed=0):
    image, labels, coarse = _batch(model, seed)
    z0 = model.encode_labels(labels)
    cond = model.condition(model.encode_image(model.normalize_image(image)), model.encode_labels(coarse))
    pred, aux = model(z0 + torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)),
                      torch.tensor([100, 600]), cond, return_aux=True)
    loss = torch.nn.functional.mse_loss(pred, z0)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads, aux


def _attention_names(model):
    return [f"guidance.cg.{i}.{n}" for i, m in enumerate(model.guidance.cg) for n, _ in m.named_parameters()
            if not n.startswith("fuse.")]


def test_live_attention_learns():
    model = _model(guidance_attention="live")
    module = model.guidance.cg[1]
    f_zt, f_c = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(module(f_zt, f_c), module.fuse(torch.cat([f_zt, f_c], 1)))  # starts as f'
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    names = _attention_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    grads, _ = _step(model, optimizer, 0)
    assert all(grads[n].abs().sum() > 0 for n in names if n.endswith("proj.weight") and ".attn." not in n)
    grads, _ = _step(model, optimizer, 1)  # proj is non-zero now: gradient reaches the whole branch
    params = dict(model.named_parameters())
    for n in names:
        assert grads[n].abs().sum() > 0, f"no gradient for {n}"
        assert not torch.equal(params[n].detach(), before[n]), f"{n} did not change"


def test_reference_attention_stays_dead():
    model = _model(guidance_attention="reference")
    names = _attention_names(model)
    params = dict(model.named_parameters())
    assert all(params[n].abs().sum() == 0 for n in names)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for seed in range(3):
        grads, _ = _step(model, optimizer, seed)
        assert all(grads[n].abs().sum() == 0 for n in names)
    assert all(params[n].abs().sum() == 0 for n in names)
    assert params["guidance.cg.0.fuse.weight"].abs().sum() > 0  # the zero conv itself learns


def test_frozen_parts_bit_identical():
    model = _model(freeze_guidance_encoder=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("guidance.encoder.") for n in frozen) and any(n.startswith("label_embed.") for n in frozen)
    assert not any(n.startswith("guidance.encoder.") for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        _step(model, optimizer, seed)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert not model.guidance.encoder.training


def test_levels_derived_and_image_only():
    model = _model(use_coarse=False, guidance_attention="none")
    assert len(model.guidance.cg) == unet_parts.num_levels(model.unet) == 5
    image, _, coarse = _batch(model)
    z_img = model.encode_image(model.normalize_image(image))
    cond = model.condition(z_img, model.encode_labels(coarse))
    for level, channels in zip(cond.levels, unet_parts.level_channels(model.unet)):
        assert level.shape[1] == 2 * channels and level[:, channels:].abs().sum() == 0  # coarse half is zero
    assert not model.guidance.cg[0].attention_parameters()


def test_kv_pooling_and_modes():
    module = CGModule(4, 8, 2, "live", grid=8, kv_grid=2)
    with torch.no_grad():
        module.proj.weight.normal_()
    out = module(torch.randn(1, 4, 8, 8), torch.randn(1, 8, 8, 8))
    assert out.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError):
        CGModule(4, 8, 2, "dead")
