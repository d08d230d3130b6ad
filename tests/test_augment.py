"""Paper augmentations: shapes, N-band, nearest-neighbour labels, cat_max_ratio, determinism."""

import numpy as np
import pytest

from idgbr.data.augment import (ColorJitter, Compose, RandomCrop, RandomHorizontalFlip, RandomResize, RandomRotate90,
                           paper_train_transform)


def _sample(h=40, w=56, bands=3, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    image = (rng.random((h, w, bands)) * hi).astype(dtype)
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 3
    mask[h // 2:, : w // 4] = 255
    coarse = np.roll(mask, 2, axis=1)
    return {"image": image, "mask": mask, "coarse": coarse, "stem": "s", "geo": {"crs": "EPSG:32633"}}


def test_random_resize_shapes_and_nearest_labels():
    sample = _sample(bands=4, dtype=np.uint16)
    out = RandomResize(0.5, 2.0)(sample, np.random.default_rng(1))
    h, w = out["image"].shape[:2]
    assert out["image"].shape[2] == 4 and out["image"].dtype == np.uint16
    assert out["mask"].shape == (h, w) == out["coarse"].shape
    assert 20 <= h <= 80 and abs(w / h - 56 / 40) < 0.1
    assert set(np.unique(out["mask"])) <= {0, 3, 255}
    assert set(np.unique(out["coarse"])) <= {0, 3, 255}
    assert "geo" not in out and out["stem"] == "s"


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_resize_keeps_label_proportions(ratio):
    sample = _sample(h=64, w=64)
    out = RandomResize(ratio, ratio)(sample, np.random.default_rng(0))
    assert out["mask"].shape == (int(64 * ratio),) * 2
    for value in (0, 3, 255):
        assert abs((out["mask"] == value).mean() - (sample["mask"] == value).mean()) < 0.05


def test_random_crop_size_and_padding():
    sample = _sample(h=20, w=30)
    out = RandomCrop(32)(sample, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["mask"].shape == (32, 32)
    assert (out["mask"][20:] == 255).all() and (out["mask"][:, 30:] == 255).all()
    assert (out["image"][20:] == 0).all()


def test_random_crop_honours_cat_max_ratio():
    # one small island of class 1 in a sea of 0: only crops around the island qualify
    mask = np.zeros((200, 200), np.uint8)
    mask[90:110, 90:110] = 1
    sample = {"image": np.zeros((200, 200, 3), np.uint8), "mask": mask}
    crop = RandomCrop(24, cat_max_ratio=0.75)
    hits_with = hits_without = 0
    for seed in range(40):
        out = crop(sample, np.random.default_rng(seed))
        counts = np.bincount(out["mask"].ravel(), minlength=2)
        hits_with += counts.max() / counts.sum() < 0.75
        out = RandomCrop(24, cat_max_ratio=1.0)(sample, np.random.default_rng(seed))
        counts = np.bincount(out["mask"].ravel(), minlength=2)
        hits_without += counts.max() / counts.sum() < 0.75
    assert hits_with > hits_without


def test_flip_is_a_mirror():
    sample = _sample()
    out = RandomHorizontalFlip(p=1.0)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], sample["image"][:, ::-1])
    np.testing.assert_array_equal(out["mask"], sample["mask"][:, ::-1])
    assert RandomHorizontalFlip(p=0.0)(sample, np.random.default_rng(0)) is sample


def test_rotate90_turns_image_and_labels_together():
    """Each of the four turns occurs, and image, mask and coarse map turn by the same k (square crops)."""
    sample = _sample(h=32, w=32)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        out = RandomRotate90()(sample, rng)
        k = next(k for k in range(4) if np.array_equal(out["image"], np.rot90(sample["image"], k)))
        seen.add(k)
        for key in ("mask", "coarse"):
            np.testing.assert_array_equal(out[key], np.rot90(sample[key], k))
        assert ("geo" in out) == (k == 0)
    assert seen == {0, 1, 2, 3}


def test_dihedral_switch_adds_only_the_rotation():
    """dihedral=True inserts RandomRotate90 after the flip; False keeps the paper's three transforms."""
    names = lambda t: [type(x).__name__ for x in t.transforms]  # noqa: E731
    assert names(paper_train_transform(32)) == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter"]
    assert names(paper_train_transform(32, dihedral=True)) == [
        "RandomResizedCrop", "RandomHorizontalFlip", "RandomRotate90", "ColorJitter"]


@pytest.mark.parametrize("bands,dtype", [(1, np.uint8), (4, np.uint16), (6, np.float32)])
def test_color_jitter_n_band(bands, dtype):
    sample = _sample(bands=bands, dtype=dtype)
    out = ColorJitter(0.3, 0.3, 0.3, p=1.0)(sample, np.random.default_rng(3))
    assert out["image"].shape == sample["image"].shape and out["image"].dtype == dtype
    assert not np.array_equal(out["image"], sample["image"])
    np.testing.assert_array_equal(out["mask"], sample["mask"])


def test_saturation_leaves_extra_bands():
    sample = _sample(bands=4, dtype=np.uint16)
    out = ColorJitter(0, 0, 0.5, p=1.0)(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"][..., 3], sample["image"][..., 3])
    assert not np.array_equal(out["image"][..., :3], sample["image"][..., :3])


def test_paper_transform_is_deterministic_with_a_seed():
    sample = _sample(h=80, w=90, bands=4, dtype=np.uint16)
    a = paper_train_transform(32)(sample, np.random.default_rng(7))
    b = paper_train_transform(32)(sample, np.random.default_rng(7))
    c = paper_train_transform(32)(sample, np.random.default_rng(8))
    for key in ("image", "mask", "coarse"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["image"].shape == (32, 32, 4) and a["mask"].shape == (32, 32)
    assert not all(np.array_equal(a[k], c[k]) for k in ("image", "mask"))
    # a compose with its own seeded generator also repeats
    x, y = paper_train_transform(32, seed=3), paper_train_transform(32, seed=3)
    np.testing.assert_array_equal(x(sample)["image"], y(sample)["image"])
    assert set(np.unique(a["mask"])) <= {0, 3, 255}


def test_compose_order():
    calls = []
    t = Compose([lambda s, r: calls.append(1) or s, lambda s, r: calls.append(2) or s], seed=0)
    t({"image": np.zeros((2, 2, 1))})
    assert calls == [1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_resized_crop_matches_resize_then_crop(seed):
    """The one-warp crop draws the same ratio and window as RandomResize + RandomCrop and resamples alike."""
    from idgbr.data.augment import RandomResizedCrop

    sample = _sample(h=90, w=110, seed=seed)
    sample["image"] = np.repeat(np.repeat(sample["image"][::8, ::8], 8, 0), 8, 1)[:90, :110]  # smooth-ish image
    old = RandomCrop(32)(RandomResize(0.5, 2.0)(sample, np.random.default_rng(seed)), np.random.default_rng(seed + 100))
    rng = np.random.default_rng(seed)
    ratio = rng.uniform(0.5, 2.0)
    new = RandomResizedCrop(32, (ratio, ratio))({**sample}, _Replay(ratio, np.random.default_rng(seed + 100)))
    assert new["image"].shape == (32, 32, 3) and new["mask"].shape == new["coarse"].shape == (32, 32)
    assert "geo" not in new and new["stem"] == "s"
    assert (new["mask"] != old["mask"]).mean() < 0.02 and (new["coarse"] != old["coarse"]).mean() < 0.02
    diff = np.abs(new["image"].astype(int) - old["image"])  # fixed-point weights of warpAffine vs resize
    assert diff.mean() < 0.5 and diff.max() <= 8


class _Replay:
    """A generator whose first ``uniform`` returns ``ratio``; the rest comes from ``rng`` (the crop window)."""

    def __init__(self, ratio, rng):
        self.ratio, self.rng = ratio, rng

    def uniform(self, *args):
        return self.ratio

    def __getattr__(self, name):
        return getattr(self.rng, name)


def test_resized_crop_n_band_and_padding():
    from idgbr.data.augment import RandomResizedCrop

    sample = _sample(h=20, w=30, bands=7, dtype=np.uint16)
    out = RandomResizedCrop(48, (1.0, 1.0))(sample, np.random.default_rng(0))
    assert out["image"].shape == (48, 48, 7) and out["image"].dtype == np.uint16
    np.testing.assert_array_equal(out["image"][:20, :30], sample["image"])
    assert (out["mask"][20:] == 255).all() and (out["mask"][:, 30:] == 255).all() and (out["image"][20:] == 0).all()


def test_boundary_pixels_and_boundary_share():
    from idgbr.data.augment import RandomResizedCrop, boundary_pixels

    mask = np.zeros((6, 6), np.uint8)
    mask[:, 3:] = 1
    mask[0, 0] = 255  # edges to ignore pixels are not boundaries
    assert sorted(np.unravel_index(boundary_pixels(mask), mask.shape)[1].tolist()) == [2] * 6 + [3] * 6
    assert boundary_pixels(np.zeros((4, 4), np.uint8), None).size == 0
    big = np.zeros((300, 300), np.uint8)
    big[140:160, 140:160] = 1  # one small island: random crops rarely touch it
    sample = {"image": np.zeros((300, 300, 3), np.uint8), "mask": big, "boundary": boundary_pixels(big)}
    found = {}
    for share in (0.0, 1.0):
        crop = RandomResizedCrop(32, cat_max_ratio=1.0, boundary_share=share)
        found[share] = sum(len(np.unique(crop(sample, np.random.default_rng(s))["mask"])) > 1 for s in range(30))
    assert found[1.0] == 30 and found[0.0] < 15
