"""Issue 11 switches: posterior mean over samples, agreement, zero-noise start, sampler-aligned training timesteps,
boundary-weighted label loss, crop-size positional embeddings (and loading configs saved before them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # the test machines are shared

from idgbr.nn.config import RefinerConfig  # noqa: E402
from idgbr.errors import IdgbrError  # noqa: E402
from idgbr.nn.model import IDGBRModel, boundary_band, boundary_map  # noqa: E402
from idgbr.inference.pipeline import Refiner  # noqa: E402
from idgbr.training.objective import RefinerObjective, label_loss  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def refiner() -> Refiner:
    torch.manual_seed(0)
    return Refiner(IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=K)))


def inputs(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    coarse = np.zeros((size, size), np.uint8)
    coarse[:, size // 2:] = 1
    coarse[size // 4: size // 2] = 2
    image = (coarse[..., None] * 80 + rng.integers(0, 30, (size, size, 3))).astype(np.uint8)
    return image, coarse


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_samples_average_the_probabilities_of_single_samples(refiner: Refiner) -> None:
    image, coarse = inputs()  # one 32² tile
    labels, mean, agreement = refiner.refine(image, coarse, steps=2, guidance=1.0, samples=3, generator=gen(),
                                             return_probs=True, return_agreement=True)
    stream = gen()  # the same noise stream, drawn one sample per call
    singles = [refiner.refine(image, coarse, steps=2, guidance=1.0, generator=stream, return_probs=True)[1]
               for _ in range(3)]
    np.testing.assert_allclose(mean, np.mean(singles, 0), atol=1e-5)
    np.testing.assert_array_equal(labels, mean.argmax(0))
    assert refiner.last_nfe == 2  # per tile and sample: the samples run in one batch
    votes = np.mean([s.argmax(0) == labels for s in singles], 0)
    np.testing.assert_allclose(agreement, votes, atol=1e-5)
    assert agreement.min() < 1  # an untrained model's samples disagree somewhere (the check can fail)
    _, one = refiner.refine(image, coarse, steps=2, guidance=1.0, generator=gen(), return_agreement=True)
    np.testing.assert_array_equal(one, 1)


def test_zero_noise_start_is_deterministic(refiner: Refiner) -> None:
    image, coarse = inputs()
    _, a = refiner.refine(image, coarse, steps=2, noise_scale=0, generator=gen(0), return_probs=True)
    _, b = refiner.refine(image, coarse, steps=2, noise_scale=0, generator=gen(1), return_probs=True)
    np.testing.assert_array_equal(a, b)
    _, c = refiner.refine(image, coarse, steps=2, generator=gen(1), return_probs=True)
    assert not np.array_equal(a, c)
    with pytest.raises(IdgbrError, match="samples"):
        refiner.refine(image, coarse, samples=0)
    with pytest.raises(IdgbrError, match="noise-scale"):  # identical samples: refused, with the fix
        refiner.refine(image, coarse, samples=3, noise_scale=0)


def test_sampler_timesteps_are_the_ones_sampling_visits() -> None:
    config = RefinerConfig.preset_config("tiny", num_classes=K, sample_steps=4, train_timesteps="sampler")
    objective = RefinerObjective(IDGBRModel(config), config)
    drawn = objective.draw_timesteps(4000, gen())
    assert sorted(set(drawn.tolist())) == [249, 499, 749, 999]  # trailing spacing, 4 steps
    counts = np.bincount(drawn.numpy() // 250, minlength=4)
    assert counts.min() > 800  # uniform over the four
    cubic = RefinerObjective(IDGBRModel(config.replace(train_timesteps="all")), config.replace(train_timesteps="all"))
    assert len(set(cubic.draw_timesteps(4000, gen()).tolist())) > 100


def test_boundary_map_and_weighted_loss() -> None:
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[:, :, 6:] = 1
    edge = boundary_map(labels, 2)[0]
    assert edge[:, 4:8].all() and not edge[:, :4].any() and not edge[:, 8:].any()
    logits = torch.zeros(1, 2, 12, 12)
    logits[:, 1, :, 5] = 5.0  # wrong only at a boundary column
    plain = RefinerConfig.preset_config("tiny", num_classes=2)
    weighted = plain.replace(boundary_weight=4.0, boundary_width=2)
    assert label_loss(logits, labels, labels, weighted) > label_loss(logits, labels, labels, plain)
    mask = labels.clone()
    mask[:, :, 5] = 255  # ignored pixels carry no loss, weighted or not
    assert torch.isclose(label_loss(logits, mask, labels, weighted), label_loss(torch.zeros_like(logits), mask, labels, weighted))


def test_positional_embedding_at_crop_size_and_cached_at_inference() -> None:
    config = RefinerConfig.preset_config("tiny", num_classes=K, crop_size=16, tile_size=32)
    model = IDGBRModel(config).eval()
    cg = model.guidance.cg[0]
    assert cg.pos_embed.shape[-1] == 16 // config.latent_factor  # the training crop's grid, every entry trained
    legacy = IDGBRModel(config.replace(pos_embed_size="tile"))
    assert legacy.guidance.cg[0].pos_embed.shape[-1] == 32 // config.latent_factor
    with torch.no_grad():
        first = cg._position(torch.Size((8, 8)))
        assert cg._position(torch.Size((8, 8))) is first  # interpolated once per size
        cg.pos_embed.add_(1.0)  # a changed parameter is interpolated again
        assert not torch.equal(cg._position(torch.Size((8, 8))), first)
    model.train()
    assert cg._position(torch.Size((8, 8))).requires_grad


def test_configs_saved_before_the_switches_keep_their_behaviour(tmp_path) -> None:
    values = RefinerConfig.preset_config("tiny", num_classes=K).to_dict()
    for key in ("pos_embed_size", "dropped_keeps_base"):
        values.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = RefinerConfig.load(tmp_path)
    assert loaded.pos_embed_size == "tile" and loaded.dropped_keeps_base is False
    assert RefinerConfig.preset_config("tiny").pos_embed_size == "crop"


def test_residual_band_limits_corrections_to_coarse_boundaries() -> None:
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, :, 16:] = 1
    band = boundary_band(labels, 3, 4)[0, 0]  # latent cells (factor 4) within 3 px of the edge at x = 16
    assert band.shape == (8, 8) and band[:, 3:5].eq(1).all() and band[:, :3].eq(0).all() and band[:, 5:].eq(0).all()
    config = RefinerConfig.preset_config("tiny", num_classes=K, coarse_residual=True, residual_band=3)
    model = IDGBRModel(config).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight)  # a non-zero correction everywhere
    z_img = torch.randn(1, model.codec.image_latent_channels(3), 32, 32)[..., :8, :8]
    z = model.encode_labels(labels)
    cond = model.condition(z_img, z, labels)
    with torch.no_grad():
        out = model(torch.randn_like(z), torch.tensor([999]), cond)
    changed = (out - z).abs().amax(1)[0] > 0
    assert changed[:, 3:5].all() and not changed[:, :3].any() and not changed[:, 5:].any()
    with pytest.raises(IdgbrError, match="residual_band"):
        model.condition(z_img, z)
    _, agreement = Refiner(model).refine(np.zeros((32, 32, 3), np.uint8), labels[0].numpy().astype(np.uint8),
                                         steps=2, guidance=1.0, samples=2, generator=gen(), return_agreement=True)
    assert agreement[:, :8].min() == 1 and agreement[:, -8:].min() == 1  # far from the boundary: the coarse map
