"""The canonical dataset reader and its bad-input errors (issue 2 §1, §6)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idgbr.data.dataset import ClassMap, SegmentationDataset, split_stems, write_splits
from idgbr.errors import IdgbrError
from idgbr.data.io import read_label


def _make(root, n=3, size=(16, 20), colour=False, splits=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    colours = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        index = rng.integers(0, 3, size, dtype=np.uint8)
        mask = np.asarray(colours, np.uint8)[index] if colour else index
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    values = colours if colour else [0, 1, 2]
    ClassMap(["a", "b", "c"], values).save(root / "classes.json")
    if splits:
        write_splits(root, {"train": [f"s{i}" for i in range(n - 1)], "test": [f"s{n - 1}"]})
    return root


def test_reads_index_and_colour_masks(tmp_path):
    ds = SegmentationDataset(_make(tmp_path / "a"), "train")
    assert len(ds) == 2 and ds[0]["mask"].shape == (16, 20) and ds[0]["mask"].max() <= 2
    ds = SegmentationDataset(_make(tmp_path / "b", colour=True), "test")
    assert set(np.unique(ds[0]["mask"])) <= {0, 1, 2}


def test_palette_masks_map_through_colours(tmp_path):
    root = _make(tmp_path / "p", colour=True)
    index = np.zeros((16, 20), np.uint8)
    index[:, 10:] = 1
    im = Image.fromarray(index, mode="P")
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.save(root / "masks" / "s0.png")
    assert read_label(root / "masks" / "s0.png")[0].ndim == 2
    mask = SegmentationDataset(root, "train").read_mask("s0")
    assert (mask[:, :10] == 0).all() and (mask[:, 10:] == 2).all()


def test_default_split_without_splits_folder(tmp_path):
    root = _make(tmp_path / "d", n=20, splits=False)
    train, test = SegmentationDataset(root, "train"), SegmentationDataset(root, "test")
    assert len(train) + len(test) == 20 and not set(train.stems) & set(test.stems)


def test_split_stems_is_seeded_and_811():
    stems = [f"x{i}" for i in range(100)]
    a, b = split_stems(stems, seed=1), split_stems(list(reversed(stems)), seed=1)
    assert a == b and [len(a[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert split_stems(stems, seed=2) != a
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(stems)


def test_mask_value_not_in_classes(tmp_path):
    root = _make(tmp_path / "v")
    Image.fromarray(np.full((16, 20), 7, np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(IdgbrError, match=r"s0\.png.*values 7.*classes\.json.*allowed"):
        SegmentationDataset(root, "train")[0]


def test_size_mismatch(tmp_path):
    root = _make(tmp_path / "m")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / "s0.png")
    with pytest.raises(IdgbrError, match=r"s0\.png.*differs from image size.*s0\.png"):
        SegmentationDataset(root, "train")[0]


def test_coarse_size_mismatch(tmp_path):
    root = _make(tmp_path / "c")
    (root / "coarse" / "m").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "coarse" / "m" / "s0.png")
    with pytest.raises(IdgbrError, match=r"coarse.m.s0\.png.*size"):
        SegmentationDataset(root, "train", coarse="m")[0]


def test_coarse_name_first_then_a_folder_path(tmp_path, monkeypatch):
    """--coarse NAME means DATA/coarse/NAME; a folder that is not there, given as a path (relative, even without a
    '/', e.g. a previous refine's --out), is used as given; neither gives a one-line error naming DATA/coarse/NAME."""
    root = _make(tmp_path / "d")
    (root / "coarse" / "m").mkdir(parents=True)
    (tmp_path / "m").mkdir()
    (tmp_path / "pass1").mkdir()
    monkeypatch.chdir(tmp_path)
    assert SegmentationDataset(root, "train", coarse="m").coarse_dir == root / "coarse" / "m"
    assert SegmentationDataset(root, "train", coarse="pass1").coarse_dir == Path("pass1")
    assert SegmentationDataset(root, "train", coarse=tmp_path / "pass1").coarse_dir == tmp_path / "pass1"
    with pytest.raises(IdgbrError, match=r"coarse.nothere: coarse-map folder not found"):
        SegmentationDataset(root, "train", coarse="nothere")


def test_truncated_image(tmp_path):
    root = _make(tmp_path / "t")
    path = root / "images" / "s0.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(IdgbrError, match=r"s0\.png.*(unreadable|truncated).*re-export"):
        SegmentationDataset(root, "train")[0]


def test_stem_listed_but_missing(tmp_path):
    root = _make(tmp_path / "s")
    (root / "splits" / "train.txt").write_text("s0\nghost\n")
    with pytest.raises(IdgbrError, match=r"train\.txt.*'ghost'.*missing.*remove it"):
        SegmentationDataset(root, "train")


def test_malformed_classes_json(tmp_path):
    root = _make(tmp_path / "j")
    (root / "classes.json").write_text(json.dumps({"classes": [{"nom": "x"}]}))
    with pytest.raises(IdgbrError, match="classes.json"):
        SegmentationDataset(root, "train")
