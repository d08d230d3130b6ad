"""`idgbr prepare`: converters on small fake raw layouts, the real Dubai set, and bad input."""

import numpy as np
import pytest
from PIL import Image

from idgbr.cli import main
from idgbr.data import IGNORE_INDEX, SegmentationDataset
from idgbr.errors import IdgbrError
from idgbr.prepare import CONVERTERS, DUBAI_COLOURS, grid_positions, prepare


def _lines(path):
    return [s for s in path.read_text().split() if s]


# ------------------------------------------------------------------------------------------------ dubai
def _fake_dubai(raw, tiles=(1, 7), parts=2, size=(12, 10), palette_first=True):
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(0)
    colours = np.asarray([*DUBAI_COLOURS, [0, 0, 0]], np.uint8)
    for t in tiles:
        for k in range(1, parts + 1):
            stem = f"tile{t}_part{k:02d}"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(raw / "images" / f"{stem}.jpg")
            index = rng.integers(0, 7, size, dtype=np.uint8)
            if palette_first and k == 1:
                im = Image.fromarray(index, mode="P")
                im.putpalette(colours.ravel().tolist() + [0] * (768 - colours.size))
                im.save(raw / "masks" / f"{stem}.png")
            else:
                Image.fromarray(colours[index]).save(raw / "masks" / f"{stem}.png")
    return raw


def test_dubai_fake(tmp_path):
    raw = _fake_dubai(tmp_path / "raw")
    summary = prepare("dubai", raw, tmp_path / "out")
    assert summary["splits"] == {"train": 2, "val": 0, "test": 2}
    assert summary["classes"][0] == "Building" and len(summary["classes"]) == 6
    out = tmp_path / "out"
    assert _lines(out / "splits" / "train.txt") == ["tile1_part01", "tile1_part02"]
    # JPEG bytes are copied, masks become index PNGs that match the colours (palette PNGs too)
    assert (out / "images" / "tile1_part01.jpg").read_bytes() == (raw / "images" / "tile1_part01.jpg").read_bytes()
    for stem in ("tile1_part01", "tile7_part02"):
        index = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        src = np.asarray(Image.open(raw / "masks" / f"{stem}.png").convert("RGB"))
        assert index.ndim == 2 and set(np.unique(index)) <= {0, 1, 2, 3, 4, 5, IGNORE_INDEX}
        assert (index == IGNORE_INDEX).sum() == (src == 0).all(-1).sum()
        np.testing.assert_array_equal(np.asarray(DUBAI_COLOURS, np.uint8)[index[index != 255]], src[index != 255])
    sample = SegmentationDataset(out, "test")[0]
    assert sample["mask"].shape == sample["image"].shape[:2]


def test_dubai_real(shared_dir, tmp_path):
    raw = shared_dir / "data" / "dubai_aerial"
    if not raw.exists():
        pytest.skip("Dubai data not present")
    summary = prepare("dubai", raw, tmp_path / "dubai")
    assert summary["splits"] == {"train": 54, "val": 0, "test": 18}
    out = tmp_path / "dubai"
    assert all(s.startswith(("tile7", "tile8")) for s in _lines(out / "splits" / "test.txt"))
    for split in ("train", "test"):
        ds = SegmentationDataset(out, split)
        for stem in ds.stems[::9]:
            image = Image.open(ds.image_path(stem))
            mask = np.asarray(Image.open(ds.mask_path(stem)))
            assert mask.ndim == 2 and mask.shape == (image.height, image.width)
            assert set(np.unique(mask)) <= {0, 1, 2, 3, 4, 5, IGNORE_INDEX}


# ------------------------------------------------------------------------------------------------ output folder
def test_refuses_finished_dataset_unless_overwrite(tmp_path):
    raw = _fake_dubai(tmp_path / "raw", parts=1)
    prepare("dubai", raw, tmp_path / "out")
    with pytest.raises(IdgbrError, match="--overwrite"):
        prepare("dubai", raw, tmp_path / "out")
    (tmp_path / "out" / "images" / "extra.png").write_bytes(b"x")
    prepare("dubai", raw, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "images" / "extra.png").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(IdgbrError, match="not an idgbr dataset"):
        prepare("dubai", raw, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_failure_leaves_nothing(tmp_path):
    raw = _fake_dubai(tmp_path / "raw")
    Image.fromarray(np.full((12, 10, 3), 7, np.uint8)).save(raw / "masks" / "tile7_part02.png")
    with pytest.raises(IdgbrError, match=r"tile7_part02\.png.*\(7, 7, 7\).*not in classes\.json"):
        prepare("dubai", raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_unknown_name_and_option(tmp_path):
    with pytest.raises(IdgbrError, match=r"did you mean 'dubai'.*valid names: .*dubai"):
        prepare("dubia", tmp_path, tmp_path / "o")
    with pytest.raises(IdgbrError, match=r"--phase.*do not apply"):
        prepare("dubai", tmp_path, tmp_path / "o", phase="2012")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_summary_and_errors(tmp_path, capsys):
    raw = _fake_dubai(tmp_path / "raw", parts=1)
    assert main(["prepare", "dubai", str(raw), str(tmp_path / "out")]) == 0
    assert "train 1, val 0, test 1" in capsys.readouterr().out
    code = main(["prepare", "dubai", str(raw), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "Traceback" not in err and "--overwrite" in err
    (raw / "images" / "tile1_part01.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code = main(["prepare", "dubai", str(raw), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "tile1_part01.jpg" in err and "re-export" in err
    assert not (tmp_path / "out2").exists()
    assert main(["prepare", "nope", str(raw), str(tmp_path / "out3")]) != 0
    assert "valid names" in capsys.readouterr().err


def test_grid_positions_edge_aligned():
    assert grid_positions(6000, 512, 512) == [*range(0, 5121, 512), 5488]
    assert len(grid_positions(6000, 512, 512)) == 12
    assert grid_positions(1024, 512, 512) == [0, 512]
    assert grid_positions(1100, 512, 256) == [0, 256, 512, 588]
    assert grid_positions(300, 512, 512) == [0]


def test_registry_lists_all_converters():
    assert set(CONVERTERS) >= {"dubai"}
