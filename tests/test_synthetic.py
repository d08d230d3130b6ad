"""Synthetic scenes, the synthetic dataset writer and degrade_mask."""

import cv2
import numpy as np
import pytest

from idgbr.data.dataset import IGNORE_INDEX, SegmentationDataset
from idgbr.data.synthetic import CLASS_NAMES, degrade_mask, make_scene, write_synthetic_dataset


@pytest.mark.parametrize("bands", [1, 3, 5])
def test_make_scene_shapes_and_classes(bands):
    scene = make_scene(96, seed=1, bands=bands)
    assert scene["image"].shape == (96, 96, bands) and scene["image"].dtype == np.uint8
    assert scene["mask"].shape == (96, 96) and scene["mask"].dtype == np.uint8
    assert set(np.unique(scene["mask"])) <= set(range(len(CLASS_NAMES)))


def test_make_scene_is_seeded_and_varied():
    a, b, c = make_scene(128, 3), make_scene(128, 3), make_scene(128, 4)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["mask"], c["mask"])


def test_scenes_contain_every_class_over_a_few_seeds():
    seen = set()
    for seed in range(6):
        seen |= set(np.unique(make_scene(128, seed)["mask"]).tolist())
    assert seen == set(range(len(CLASS_NAMES)))


def test_classes_are_separable_by_colour():
    scene = make_scene(256, 0)
    means = [scene["image"][scene["mask"] == c].mean(axis=0) for c in np.unique(scene["mask"])]
    distances = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]
    assert min(distances) > 10


@pytest.mark.parametrize("geotiff", [False, True])
def test_write_synthetic_dataset(tmp_path, geotiff):
    summary = write_synthetic_dataset(tmp_path / "d", n=10, size=64, seed=0, geotiff=geotiff)
    assert sum(summary["splits"].values()) == 10 and summary["splits"]["train"] == 8
    ds = SegmentationDataset(tmp_path / "d", "train")
    sample = ds[0]
    assert sample["image"].shape == (64, 64, 3) and sample["mask"].shape == (64, 64)
    if geotiff:
        assert sample["geo"]["crs"] == "EPSG:32633"
    else:
        assert "geo" not in sample
    assert not list((tmp_path / "d").rglob("*.part"))


def _miou(truth, pred, k):
    ious = []
    for c in range(k):
        t, p = truth == c, pred == c
        if t.any():
            ious.append((t & p).sum() / (t | p).sum())
    return float(np.mean(ious))


def test_degrade_mask_errs_near_boundaries():
    fractions, mious = [], []
    for seed in range(5):
        truth = make_scene(192, seed)["mask"]
        coarse = degrade_mask(truth, np.random.default_rng(seed), len(CLASS_NAMES))
        assert coarse.shape == truth.shape and coarse.dtype == np.uint8
        wrong = coarse != truth
        assert wrong.any()
        edges = cv2.morphologyEx(truth, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        near = cv2.dilate(edges.astype(np.uint8), np.ones((11, 11), np.uint8)) > 0
        fractions.append((wrong & near).sum() / wrong.sum() / max(near.mean(), 1e-6))  # enrichment over chance
        mious.append(_miou(truth, coarse, len(CLASS_NAMES)))
    assert np.mean(fractions) > 1.5  # errors concentrate near boundaries (chance would be 1.0)
    assert 0.5 < np.mean(mious) < 0.95


def test_degrade_mask_keeps_ignore_and_strength():
    truth = make_scene(128, 2)["mask"].copy()
    truth[:10] = IGNORE_INDEX
    weak = degrade_mask(truth, np.random.default_rng(0), 5, strength=0.3)
    strong = degrade_mask(truth, np.random.default_rng(0), 5, strength=2.0)
    assert (weak[:10] == IGNORE_INDEX).all() and (strong[:10] == IGNORE_INDEX).all()
    assert not (weak[10:] == IGNORE_INDEX).any()
    assert (weak != truth).mean() < (strong != truth).mean()
    np.testing.assert_array_equal(degrade_mask(truth, np.random.default_rng(0), 5, strength=0), truth)
    a = degrade_mask(truth, np.random.default_rng(9), 5)
    np.testing.assert_array_equal(a, degrade_mask(truth, np.random.default_rng(9), 5))


def test_degrade_regions_makes_errors_away_from_boundaries():
    from idgbr.data.synthetic import degrade_regions

    far_region, far_boundary = [], []
    for seed in range(6):
        truth = make_scene(192, seed)["mask"]
        edges = cv2.morphologyEx(truth, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        far = ~(cv2.dilate(edges.astype(np.uint8), np.ones((11, 11), np.uint8)) > 0)  # > 5 px from any boundary
        regions = degrade_regions(truth, np.random.default_rng(seed), len(CLASS_NAMES))
        boundary = degrade_mask(truth, np.random.default_rng(seed), len(CLASS_NAMES))
        assert regions.shape == truth.shape and regions.dtype == np.uint8 and regions.max() < len(CLASS_NAMES)
        assert (regions != truth).any()
        far_region.append(((regions != truth) & far).sum())
        far_boundary.append(((boundary != truth) & far).sum())
        np.testing.assert_array_equal(regions, degrade_regions(truth, np.random.default_rng(seed), len(CLASS_NAMES)))
    assert sum(far_region) > 2 * sum(far_boundary)  # whole segments change, not only their rims
    truth = make_scene(128, 1)["mask"].copy()
    truth[:7] = IGNORE_INDEX
    out = degrade_regions(truth, np.random.default_rng(0), len(CLASS_NAMES))
    assert (out[:7] == IGNORE_INDEX).all() and not (out[7:] == IGNORE_INDEX).any()


def test_overpaint_grows_the_smaller_classes_over_the_largest():
    """synthetic.overpaint only adds pixels to classes other than the largest, closes the gaps between a class's
    segments, keeps ignored pixels, and is reproducible."""
    from scipy import ndimage

    from idgbr.data.synthetic import overpaint

    grown_small = 0
    for seed in range(6):
        truth = make_scene(128, seed)["mask"]
        out = overpaint(truth, np.random.default_rng(seed), len(CLASS_NAMES))
        assert out.shape == truth.shape and out.dtype == np.uint8
        changed = out != truth
        assert changed.any()
        largest = np.bincount(truth.ravel()).argmax()
        assert not (out[changed] == largest).any()  # the largest class only ever loses pixels
        areas_before, areas_after = np.bincount(truth.ravel(), minlength=5), np.bincount(out.ravel(), minlength=5)
        grown_small += int((areas_after > areas_before).sum())
        np.testing.assert_array_equal(out, overpaint(truth, np.random.default_rng(seed), len(CLASS_NAMES)))
    assert grown_small >= 6
    # two squares 4 px apart become one segment (a block painted as one blob)
    two = np.zeros((40, 40), np.uint8)
    two[10:30, 8:18] = 1
    two[10:30, 22:32] = 1
    merged = [ndimage.label(overpaint(two, np.random.default_rng(seed), 2) == 1)[1] for seed in range(4)]
    assert merged == [1, 1, 1, 1]
    truth = make_scene(128, 1)["mask"].copy()
    truth[:7] = IGNORE_INDEX
    out = overpaint(truth, np.random.default_rng(0), len(CLASS_NAMES))
    assert (out[:7] == IGNORE_INDEX).all() and not (out[7:] == IGNORE_INDEX).any()
    np.testing.assert_array_equal(overpaint(np.ones((8, 8), np.uint8), np.random.default_rng(0), 2), 1)


def test_degradations_keep_an_all_nodata_map_and_refuse_a_3d_one():
    from idgbr.data.synthetic import degrade_regions, overpaint

    empty = np.full((24, 24), IGNORE_INDEX, np.uint8)
    for degrade in (degrade_mask, degrade_regions, overpaint):
        out = degrade(empty, np.random.default_rng(0), len(CLASS_NAMES))
        assert out.dtype == np.uint8 and (out == IGNORE_INDEX).all(), degrade.__name__
        with pytest.raises(ValueError, match="must be"):
            degrade(np.zeros((4, 4, 3), np.uint8), np.random.default_rng(0), len(CLASS_NAMES))
