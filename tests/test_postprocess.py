"""The sieve (idgbr.inference.postprocess): small regions merge into their largest neighbour; nodata stays; every path
(tile, folder, evaluation, benchmark) applies the same function."""

import numpy as np
import pytest
import torch

from idgbr.nn.config import RefinerConfig
from idgbr.errors import IdgbrError
from idgbr.metrics import BoundaryPR
from idgbr.nn.model import IDGBRModel
from idgbr.inference.pipeline import Refiner
from idgbr.inference.postprocess import sieve_labels


def test_small_regions_merge_into_their_largest_neighbour():
    labels = np.zeros((12, 12), np.uint8)
    labels[6:12, :6] = 1  # 36 px: kept
    labels[2:4, 8:10] = 2  # 4 px island in class 0: merged into 0
    labels[7, 5] = 3  # 1 px on the 0/1 border: 1 has the longer... any neighbour, but never 3
    labels[0, 0:2] = 255  # nodata: kept, not sieved, not a neighbour
    labels[9:11, 2:4] = 255
    out = sieve_labels(labels, 5)
    assert (out[2:4, 8:10] == 0).all() and out[7, 5] in (0, 1)
    assert (out[6:12, :5][labels[6:12, :5] == 1] == 1).all()
    np.testing.assert_array_equal(out == 255, labels == 255)
    np.testing.assert_array_equal(sieve_labels(labels, 4)[2:4, 8:10], labels[2:4, 8:10])  # 4 px is not < 4
    assert sieve_labels(labels, 0) is labels and sieve_labels(labels, 1) is labels
    with pytest.raises(IdgbrError, match="--sieve must be >= 0"):
        sieve_labels(labels, -1)


def test_sieve_removes_speckle_a_metric_sees():
    rng = np.random.default_rng(0)
    truth = np.zeros((64, 64), np.uint8)
    truth[:, 32:] = 1
    speckled = truth.copy()
    speckled[rng.random(truth.shape) < 0.02] = 2
    ratio = []
    for pred in (speckled, sieve_labels(speckled, 4)):
        pr = BoundaryPR((3,))
        pr.update(truth, pred)
        ratio.append(pr.result()["components_ratio"])
    assert ratio[0] > 10 and ratio[1] == 1.0


def test_refiner_writes_sieved_maps_by_its_config():
    torch.manual_seed(0)
    cfg = RefinerConfig.preset_config("tiny", num_classes=3, sample_steps=1)
    refiner = Refiner(IDGBRModel(cfg))
    g = np.random.default_rng(1)
    image = g.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    coarse = g.integers(0, 3, (32, 32)).astype(np.uint8)  # speckled, so the (untrained) refiner speckles too
    raw = refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0))
    sieved = refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0), sieve=8)
    np.testing.assert_array_equal(sieved, sieve_labels(raw, 8))
    assert not np.array_equal(sieved, raw)
    refiner.model.config = cfg.replace(sieve=8)  # the config's value is the default
    np.testing.assert_array_equal(refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0)), sieved)
    lite = RefinerConfig.preset_config("lite")
    assert lite.sieve == 0 and lite.class_reach == 8 and lite.area_match == 0 and lite.flip_margin == 0
    tiny = RefinerConfig.preset_config("tiny")
    assert tiny.sieve == 0 and tiny.area_match == 0 and tiny.class_reach == 0
    with pytest.raises(IdgbrError, match="sieve must be >= 0"):
        cfg.replace(sieve=-2)


def test_evaluate_cli_scores_sieved_maps(tmp_path, capsys):
    """`idgbr evaluate --sieve PX` scores the maps as `refine --sieve PX` would write them."""
    import json

    from idgbr.commands.main import main
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.data.io import write_label
    from idgbr.data.synthetic import write_synthetic_dataset

    data = tmp_path / "data"
    write_synthetic_dataset(data, n=4, size=48, seed=1)
    dataset = SegmentationDataset(data, "test")
    preds = tmp_path / "preds"
    rng = np.random.default_rng(0)
    for stem in dataset.stems:
        mask = dataset.read_mask(stem)
        speckled = mask.copy()
        speckled[rng.random(mask.shape) < 0.03] = (mask.max() + 1) % dataset.classes.num_classes
        write_label(preds / f"{stem}.png", speckled)
    scores = {}
    for sieve in ("0", "4"):
        out = tmp_path / f"report{sieve}.json"
        assert main(["evaluate", "--data", str(data), "--pred", str(preds), "--format", "json", "--out", str(out),
                     "--sieve", sieve]) == 0
        scores[sieve] = json.loads(out.read_text())
    assert scores["4"]["components"] < scores["0"]["components"]
    assert scores["4"]["miou"] > scores["0"]["miou"]
    assert main(["evaluate", "--data", str(data), "--pred", str(preds), "--sieve", "-2"]) == 2
    assert "--sieve must be >= 0" in capsys.readouterr().err


def test_keep_unsure_keeps_the_coarse_label_unless_the_refiner_is_surer_by_the_margin():
    from idgbr.inference.postprocess import keep_unsure

    probs = np.array([[[0.5, 0.2, 0.9, 0.1]], [[0.4, 0.7, 0.05, 0.3]], [[0.1, 0.1, 0.05, 0.6]]], np.float32)  # (3, 1, 4)
    labels = probs.argmax(0).astype(np.uint8)  # [0, 1, 0, 2]
    coarse = np.array([[1, 0, 0, 255]], np.uint8)
    # pixel 0: 0 beats coarse 1 by 0.1; pixel 1: 1 beats coarse 0 by 0.5; pixel 2 agrees; pixel 3 is nodata
    np.testing.assert_array_equal(keep_unsure(labels, probs, coarse, 0.2), [[1, 1, 0, 2]])
    np.testing.assert_array_equal(keep_unsure(labels, probs, coarse, 0.05), [[0, 1, 0, 2]])
    np.testing.assert_array_equal(keep_unsure(labels, probs, coarse, 0.6), [[1, 0, 0, 2]])


def _scrambled_case():
    """A tiny 3-class refiner whose output depends on its inputs, one 40 x 40 image and coarse map (nodata corner),
    and ``run(**kw)``: that image refined with a fixed seed."""
    torch.manual_seed(0)
    cfg = RefinerConfig.preset_config("tiny", num_classes=3, sample_steps=1)
    model = IDGBRModel(cfg)
    with torch.no_grad():  # an untrained tiny model ignores its inputs: give its zero-initialised layers weights
        for name, param in model.named_parameters():
            if not param.abs().sum():
                param.normal_(0, 0.3)
    refiner = Refiner(model)
    g = np.random.default_rng(1)
    image = g.integers(0, 255, (40, 40, 3)).astype(np.uint8)
    coarse = g.integers(0, 3, (40, 40)).astype(np.uint8)
    coarse[:4, :4] = 255

    def run(**kw):
        return refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0), **kw)

    return cfg, refiner, image, coarse, run


def _one_image_dataset(data, image, coarse):
    """``data`` as a 3-class dataset of that one image, its coarse map as the mask and as coarse maps ``c``."""
    from idgbr.data.dataset import write_splits
    from idgbr.data.io import write_image, write_label

    write_image(data / "images" / "a.png", image)
    write_label(data / "masks" / "a.png", coarse)
    write_label(data / "coarse" / "c" / "a.png", coarse)
    (data / "classes.json").write_text('{"classes": [{"name": "x", "value": 0}, {"name": "y", "value": 1}, '
                                       '{"name": "z", "value": 2}], "ignore": [255]}')
    write_splits(data, {"train": ["a"], "test": ["a"]})
    return data


def test_flip_margin_in_tile_folder_and_scene_modes(tmp_path):
    """refine(flip_margin=P) = keep_unsure of the plain map and its probabilities; the config's value is the
    default; folder mode writes the same maps; a bad margin is one line."""
    from idgbr.inference.postprocess import keep_unsure

    cfg, refiner, image, coarse, run = _scrambled_case()

    plain, probs = run(return_probs=True, flip_margin=0)
    margin = 0.15
    kept = run(flip_margin=margin)
    np.testing.assert_array_equal(kept, keep_unsure(plain, probs, coarse, margin))
    changed = (plain != coarse) & (coarse != 255)
    assert changed.sum() > (kept != coarse)[coarse != 255].sum() > 0  # fewer flips, but some
    refiner.model.config = cfg.replace(flip_margin=margin)
    np.testing.assert_array_equal(run(), kept)
    with pytest.raises(IdgbrError, match="--flip-margin must lie in"):
        run(flip_margin=1.5)
    # folder mode (batched across images) writes the same map
    from idgbr.data.io import read_label

    data = _one_image_dataset(tmp_path / "data", image, coarse)
    refiner.refine_folder(data, "test", "c", tmp_path / "out", progress=False)
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "a.png")[0], kept)


def test_match_areas_pulls_class_areas_to_the_coarse_maps():
    """A refiner that grows class 1 over class 0: matched to the coarse areas, class 1 shrinks back towards them,
    the pixels it gives up are those it was least sure of, strength 0 is the plain argmax, nodata is left out."""
    from idgbr.inference.postprocess import area_offsets, match_areas

    g = np.random.default_rng(0)
    coarse = np.zeros((64, 64), np.uint8)
    coarse[:, 32:] = 1  # half and half
    coarse[:4] = 255  # nodata rows: not counted
    sure_of_1 = np.clip(np.linspace(0.3, 0.95, 64)[None, :] + 0.05 * g.standard_normal((64, 64)), 0.01, 0.99)
    probs = np.stack([1 - sure_of_1, sure_of_1]).astype(np.float32)  # argmax: class 1 from column ~20
    plain = probs.argmax(0)
    valid = coarse != 255
    assert (plain[valid] == 1).mean() > 0.65
    matched = match_areas(probs, coarse, 1.0)
    share = (matched[valid] == 1).mean()
    assert abs(share - 0.5) < 0.03, share
    assert (sure_of_1[matched == 1].min() >= sure_of_1[(plain == 1) & (matched == 0)].max() - 1e-6)
    half = (match_areas(probs, coarse, 0.5)[valid] == 1).mean()
    assert 0.5 + 0.02 < half < (plain[valid] == 1).mean() - 0.02  # part of the way
    np.testing.assert_array_equal(match_areas(probs, coarse, 0.0), plain)
    np.testing.assert_array_equal(area_offsets(np.log(probs.reshape(2, -1)), coarse.ravel(), 0.0), [0, 0])
    with pytest.raises(IdgbrError, match="--area-match must lie in"):
        match_areas(probs, coarse, 1.5)


def test_area_match_in_tile_and_folder_modes(tmp_path):
    """refine(area_match=A) = match_areas of its own probabilities against the coarse map (nodata kept), then the
    flip margin; the config's value is the default; folder mode writes the same maps."""
    from idgbr.data.io import read_label
    from idgbr.inference.postprocess import keep_unsure, match_areas

    cfg, refiner, image, coarse, run = _scrambled_case()

    plain, probs = run(return_probs=True, area_match=0)
    matched = run(area_match=1)
    expected = match_areas(probs, coarse, 1.0)
    expected[coarse == 255] = 255
    np.testing.assert_array_equal(matched, expected)
    assert (matched != plain).any()  # not vacuous: the offsets move labels
    both = run(area_match=1, flip_margin=0.1)
    kept = keep_unsure(match_areas(probs, coarse, 1.0), probs, coarse, 0.1)
    kept[coarse == 255] = 255
    np.testing.assert_array_equal(both, kept)
    refiner.model.config = cfg.replace(area_match=1.0)
    np.testing.assert_array_equal(run(), matched)
    with pytest.raises(IdgbrError, match="--area-match must lie in"):
        run(area_match=-0.5)
    data = _one_image_dataset(tmp_path / "data", image, coarse)
    refiner.refine_folder(data, "test", "c", tmp_path / "out", progress=False)
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "a.png")[0], matched)


def test_within_reach_drops_the_classes_the_coarse_map_lacks_nearby():
    """A class survives at a pixel only if the coarse map holds it within the reach (a disc); the others' share is
    renormalised; a pixel with no coarse class in reach keeps its probabilities; reach 0 changes nothing."""
    from idgbr.inference.postprocess import within_reach

    coarse = np.zeros((1, 12), np.uint8)
    coarse[0, 6:] = 1  # class 2 nowhere
    coarse[0, 11] = 255
    probs = np.broadcast_to(np.array([0.2, 0.3, 0.5], np.float32)[:, None, None], (3, 1, 12)).copy()
    out = within_reach(probs, coarse, 2)
    assert (out[2] == 0).all()  # nowhere in the coarse map: never
    np.testing.assert_allclose(out.sum(0), 1, rtol=1e-6)
    np.testing.assert_array_equal(out.argmax(0)[0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])  # 1 reaches 2 px left
    np.testing.assert_allclose(out[:, 0, 0], [1, 0, 0])  # only class 0 within 2 px
    np.testing.assert_allclose(out[:, 0, 5], [0.4, 0.6, 0], rtol=1e-6)
    np.testing.assert_array_equal(within_reach(probs, coarse, 0), probs)
    lone = np.full((1, 12), 255, np.uint8)  # nodata all around: nothing to hold on to, nothing dropped
    np.testing.assert_array_equal(within_reach(probs, lone, 3), probs)
    with pytest.raises(IdgbrError, match="--class-reach must be a whole number"):
        within_reach(probs, coarse, -1)


def test_class_reach_in_tile_and_folder_modes(tmp_path):
    """refine(class_reach=R) = the argmax of within_reach of its own probabilities (which it returns), before the
    flip margin; the config's value is the default; folder mode writes the same maps."""
    from idgbr.data.io import read_label
    from idgbr.inference.postprocess import keep_unsure, within_reach

    cfg, refiner, image, coarse, run = _scrambled_case()
    coarse = coarse.copy()
    coarse[20:, :] = np.where(coarse[20:, :] == 2, 0, coarse[20:, :])  # class 2 only in the top half

    def run2(**kw):
        return refiner.refine(image, coarse, generator=torch.Generator().manual_seed(0), **kw)

    plain, probs = run2(return_probs=True, class_reach=0)
    reached, reached_probs = run2(return_probs=True, class_reach=2)
    np.testing.assert_allclose(reached_probs, within_reach(probs, coarse, 2), rtol=1e-6)
    expected = within_reach(probs, coarse, 2).argmax(0).astype(np.uint8)
    expected[coarse == 255] = 255
    np.testing.assert_array_equal(reached, expected)
    assert (plain[23:] == 2).any() and not (reached[23:] == 2).any()  # not vacuous
    both = run2(class_reach=2, flip_margin=0.1)
    kept = keep_unsure(within_reach(probs, coarse, 2).argmax(0).astype(np.uint8), within_reach(probs, coarse, 2),
                       coarse, 0.1)
    kept[coarse == 255] = 255
    np.testing.assert_array_equal(both, kept)
    refiner.model.config = cfg.replace(class_reach=2)
    np.testing.assert_array_equal(run2(), reached)
    with pytest.raises(IdgbrError, match="class_reach"):
        cfg.replace(class_reach=-1)
    data = _one_image_dataset(tmp_path / "data", image, coarse)
    refiner.refine_folder(data, "test", "c", tmp_path / "out", progress=False)
    np.testing.assert_array_equal(read_label(tmp_path / "out" / "a.png")[0], reached)
