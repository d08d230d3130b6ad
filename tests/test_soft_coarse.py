"""Soft coarse input (issue 28): the coarse model's probabilities read beside its maps, cropped and augmented with
them, and embedded in place of the labels during training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from idgbr.data.dataset import SegmentationDataset, probs_folder, read_probs
from idgbr.errors import IdgbrError
from idgbr.nn.config import RefinerConfig

torch = pytest.importorskip("torch")

from test_train import make_dataset  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``make_dataset``'s set plus ``coarse/c1_probs/``: 0.8 on each coarse label, 0.1 on the two others."""
    root = make_dataset(tmp_path_factory.mktemp("soft"))
    dataset = SegmentationDataset(root, "train", coarse="c1")
    (root / "coarse" / "c1_probs").mkdir()
    for stem in dataset.stems + SegmentationDataset(root, "test").stems:
        coarse = dataset.read_coarse(stem)
        probs = np.full((K, *coarse.shape), 0.1, np.float32)
        np.put_along_axis(probs, coarse[None].astype(np.int64), 0.8, axis=0)
        np.save(root / "coarse" / "c1_probs" / f"{stem}.npy", probs)
    return root


def test_probs_folder_is_beside_the_maps_even_through_a_link(data, tmp_path):
    link = tmp_path / "linked"
    link.symlink_to(data / "coarse" / "c1")
    assert probs_folder(link) == probs_folder(data / "coarse" / "c1") == (data / "coarse" / "c1_probs").resolve()
    dataset = SegmentationDataset(data, "train", coarse=link)
    stem = dataset.stems[0]
    assert np.allclose(dataset.read_coarse_probs(stem).max(0), 0.8)


@pytest.mark.parametrize("array,message", [
    (np.zeros((K, 40, 48), np.uint8), "expected float probabilities (3, 40, 48)"),
    (np.zeros((K, 40, 47), np.float32), "expected float probabilities (3, 40, 48)"),
    (np.zeros((K + 1, 40, 48), np.float32), "expected float probabilities (3, 40, 48)"),
    (np.full((K, 40, 48), np.nan, np.float32), "NaN/inf or negative"),
    (np.full((K, 40, 48), -0.5, np.float32), "NaN/inf or negative"),
])
def test_bad_probabilities_are_refused_naming_the_file(array, message, tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, array)
    with pytest.raises(IdgbrError, match="p.npy") as info:
        read_probs(path, K, (40, 48))
    assert message in str(info.value)


def test_training_samples_carry_the_probabilities_only_when_soft(data, tmp_path):
    from idgbr.training.batches import load_training_samples

    hard, _ = load_training_samples(data, "c1")
    assert all("coarse_probs" not in s for s in hard)
    soft, _ = load_training_samples(data, ["c1", "c1"], soft=True)  # pooled: each source's probabilities
    assert len(soft) == 2 * len(hard)
    for sample in soft:
        probs = sample["coarse_probs"]
        assert probs.dtype == np.uint8 and probs.shape == (*sample["mask"].shape, K)
        assert (probs.argmax(-1) == sample["coarse"]).all() and set(np.unique(probs)) == {26, 204}
    (tmp_path / "d").mkdir()
    bare = make_dataset(tmp_path / "d")
    with pytest.raises(IdgbrError, match=r"c1_probs.*predict-coarse --probs npy"):
        load_training_samples(bare, "c1", soft=True)


@pytest.mark.parametrize("corruption", [0.0, 1.0])
def test_soft_batches_follow_the_crop_and_the_augmentation(data, corruption):
    """With real maps the soft crop is the coarse model's probabilities moved with the coarse labels (its argmax is
    the coarse crop through scaling, flips and rotations); synthetic maps and padding are one-hot."""
    from idgbr.training.batches import CropSampler, load_training_samples

    samples, _ = load_training_samples(data, "c1", soft=True)
    config = RefinerConfig.preset_config("tiny", num_classes=K, crop_size=32, batch_size=8, soft_coarse=True,
                                         coarse_corruption=corruption, augment_dihedral=True)
    batch = CropSampler(samples, config)(np.random.default_rng(0))
    soft, coarse = batch["coarse_soft"], batch["coarse"]
    assert soft.shape == (8, K, 32, 32) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(1), torch.ones(8, 32, 32), atol=1e-5)
    assert (soft.argmax(1) == coarse).float().mean() > 0.97  # bilinear resampling blurs a few boundary pixels
    if corruption == 1.0:
        assert torch.equal(soft, torch.nn.functional.one_hot(coarse, K).permute(0, 3, 1, 2).float())
    else:
        assert ((soft.max(1).values - 0.8).abs() < 0.01).float().mean() > 0.8  # the coarse model's confidence
    hard = CropSampler(samples, config.replace(soft_coarse=False))(np.random.default_rng(0))
    assert "coarse_soft" not in hard and torch.equal(hard["coarse"], coarse)


def test_the_objective_embeds_the_soft_input():
    from idgbr.nn.model import IDGBRModel
    from idgbr.training.objective import RefinerObjective

    config = RefinerConfig.preset_config("tiny", num_classes=K, cond_dropout=0.0)
    torch.manual_seed(0)
    model = IDGBRModel(config)
    with torch.no_grad():  # the guidance's zero convolutions would hide the coarse input from a fresh model
        for module in model.guidance.cg:
            module.fuse.weight.normal_(0, 0.1)
    objective = RefinerObjective(model, config)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    mask = torch.randint(0, K, (2, 32, 32), generator=gen)
    coarse = torch.randint(0, K, (2, 32, 32), generator=gen)
    onehot = torch.nn.functional.one_hot(coarse, K).permute(0, 3, 1, 2).float()

    def loss(**soft) -> float:
        with torch.no_grad():
            return float(objective(image, mask, coarse, torch.Generator().manual_seed(1), **soft)["loss"])

    assert loss() == pytest.approx(loss(coarse_soft=onehot), abs=1e-6)  # one-hot probabilities are the labels
    assert abs(loss() - loss(coarse_soft=torch.full_like(onehot, 1 / K))) > 1e-4


@pytest.fixture(scope="module")
def soft_run(data, tmp_path_factory) -> Path:
    from idgbr.training.loop import train_refiner

    run = tmp_path_factory.mktemp("softrun") / "run"
    config = RefinerConfig.preset_config("tiny", steps=1, checkpoint_every=1, soft_coarse=True, coarse_corruption=0.0)
    train_refiner(config, data, "c1", run, progress=False)
    return run


def test_training_with_soft_coarse_needs_and_reads_probabilities(data, soft_run, tmp_path):
    from idgbr.training.loop import train_refiner

    assert json.loads((soft_run / "config.json").read_text())["soft_coarse"] is True
    config = RefinerConfig.preset_config("tiny", steps=1, soft_coarse=True)
    with pytest.raises(IdgbrError, match="soft_coarse trains on coarse models' probabilities"):
        train_refiner(config, data, None, tmp_path / "none", progress=False)


@pytest.mark.parametrize("soft", [True, False])
def test_folder_mode_gives_a_soft_model_the_probabilities(data, soft_run, soft, tmp_path, monkeypatch):
    """``refine_folder`` hands a soft model each map's probabilities, and a hard one the labels; nodata stays."""
    from idgbr.inference.pipeline import Refiner

    refiner = Refiner.from_pretrained(soft_run, device="cpu")
    refiner.model.config = refiner.config.replace(soft_coarse=soft)  # the same weights, read as a hard model too
    given = []
    prepare = refiner._prepare
    monkeypatch.setattr(refiner, "_prepare", lambda image, coarse, *a, **k: given.append(coarse) or prepare(image, coarse, *a, **k))
    out = refiner.refine_folder(data, "test", "c1", tmp_path / "out", progress=False)
    dataset = SegmentationDataset(data, "test", coarse="c1")
    (stem,) = dataset.stems
    (coarse,) = given
    if soft:
        assert coarse.dtype == np.float32 and np.array_equal(coarse, dataset.read_coarse_probs(stem))
    else:
        assert np.array_equal(coarse, dataset.read_coarse(stem))
    assert [p.name for p in out] == [f"{stem}.png"]
