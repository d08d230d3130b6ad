"""`idgbr prepare`: converters on small fake raw layouts, the real Dubai set, and bad input."""

import numpy as np
import pytest
from PIL import Image

from idgbr.commands.main import main
from idgbr.data.dataset import IGNORE_INDEX, SegmentationDataset
from idgbr.errors import IdgbrError
from idgbr.data.prepare import CONVERTERS, prepare
from idgbr.data.converters import DUBAI_COLOURS
from idgbr.data.writer import grid_positions


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


def test_dubai_real(datasets_dir, tmp_path):
    raw = datasets_dir / "dubai_aerial"
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
    assert set(CONVERTERS) == {"dubai", "potsdam", "vaihingen", "chn6-cug", "fgfd", "whu-building", "folder"}


# ------------------------------------------------------------------------------------------------ fake raw layouts
def _tif(path, array, crs="EPSG:32633", x0=500000.0, y0=5800000.0, res=0.5):
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    array = array if array.ndim == 3 else array[..., None]
    profile = dict(driver="GTiff", height=array.shape[0], width=array.shape[1], count=array.shape[2],
                   dtype=array.dtype.name)
    if crs:
        profile.update(crs=crs, transform=from_origin(x0, y0, res, res))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(array, -1, 0))


def _isprs_label(rng, size):
    from idgbr.data.converters import ISPRS_COLOURS

    index = rng.integers(0, 6, (size, size))
    return np.asarray(ISPRS_COLOURS, np.uint8)[index], index


def test_potsdam_fake(tmp_path):
    rng = np.random.default_rng(0)
    raw, size = tmp_path / "potsdam", 300
    truth = {}
    for tile in ("2_10", "6_7", "2_13"):  # two train tiles, one test tile
        _tif(raw / "3_Ortho_IRRG" / f"top_potsdam_{tile}_IRRG.tif", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        colour, truth[tile] = _isprs_label(rng, size)
        if tile == "6_7":
            colour[:5] = 0  # eroded boundary -> ignore
            truth[tile][:5] = IGNORE_INDEX
        _tif(raw / "5_Labels_all" / f"top_potsdam_{tile}_label.tif", colour)
    summary = prepare("potsdam", raw, tmp_path / "out", patch_size=128)
    # edge-aligned 128 grid on 300: starts 0, 128, 172 -> 9 patches per tile
    assert summary["splits"] == {"train": 18, "val": 0, "test": 9}
    assert summary["classes"] == ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
    assert "35 listed tiles missing" in summary["notes"][0]
    ds = SegmentationDataset(tmp_path / "out", "train")
    sample = ds[ds.stems.index("potsdam_6_7_128_172")]
    assert sample["image"].shape == (128, 128, 3)
    np.testing.assert_array_equal(sample["mask"], truth["6_7"][128:256, 172:300])
    # a window read keeps the georeferencing of the crop
    assert sample["geo"]["crs"] == "EPSG:32633"
    assert sample["geo"]["transform"][2] == pytest.approx(500000.0 + 172 * 0.5)
    assert sample["geo"]["transform"][5] == pytest.approx(5800000.0 - 128 * 0.5)
    with pytest.raises(IdgbrError, match="4_Ortho_RGBIR.*not found"):
        prepare("potsdam", raw, tmp_path / "o2", bands="rgbir")


def test_potsdam_rejects_unknown_colour(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "potsdam"
    _tif(raw / "2_Ortho_RGB" / "top_potsdam_2_10_RGB.tif", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), crs=None)
    colour, _ = _isprs_label(rng, 64)
    colour[3, 3] = (255, 0, 255)
    _tif(raw / "5_Labels_all" / "top_potsdam_2_10_label.tif", colour, crs=None)
    with pytest.raises(IdgbrError, match=r"top_potsdam_2_10_label\.tif.*\(255, 0, 255\).*allowed colours"):
        prepare("potsdam", raw, tmp_path / "out", bands="rgb", patch_size=32)
    assert not (tmp_path / "out").exists()


def test_vaihingen_fake_and_stride(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "vaihingen"
    for area, (h, w) in ((1, (100, 140)), (11, (90, 90)), (2, (64, 64))):
        _tif(raw / "top" / f"top_mosaic_09cm_area{area}.tif", rng.integers(0, 255, (h, w, 3), dtype=np.uint8), crs=None)
        colour = np.asarray([[255, 255, 255], [0, 0, 255]], np.uint8)[rng.integers(0, 2, (h, w))]
        _tif(raw / "gts_for_participants" / f"top_mosaic_09cm_area{area}.tif", colour, crs=None)
    a = prepare("vaihingen", raw, tmp_path / "a", patch_size=64)
    b = prepare("vaihingen", raw, tmp_path / "b", patch_size=64, stride=32)
    # 100x140 -> rows [0, 36] x cols [0, 64, 76] = 6; 90x90 -> 2 x 2 = 4; test 64x64 -> 1
    assert a["splits"] == {"train": 10, "val": 0, "test": 1}
    # stride 32: 100 -> [0, 32, 36]; 140 -> [0, 32, 64, 76]; 90 -> [0, 26]
    assert b["splits"] == {"train": 3 * 4 + 2 * 2, "val": 0, "test": 1}
    assert (tmp_path / "a" / "images" / "vaihingen_area1_36_76.png").exists()


def test_chn6_cug_fake(tmp_path):
    rng = np.random.default_rng(2)
    raw = tmp_path / "chn6"
    for part, n in (("train", 16), ("val", 4)):
        (raw / part / "images").mkdir(parents=True)
        (raw / part / "gt").mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(raw / part / "images" / f"{part}{i}_sat.jpg")
            gt = rng.integers(0, 13, (16, 16), dtype=np.uint8)  # road subclasses
            Image.fromarray(gt).save(raw / part / "gt" / f"{part}{i}_mask.png")
    summary = prepare("chn6-cug", raw, tmp_path / "out", seed=0)
    assert summary["splits"] == {"train": 16, "val": 2, "test": 2}
    assert summary["classes"] == ["background", "road"]
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "val3.png"))
    gt = np.asarray(Image.open(raw / "val" / "gt" / "val3_mask.png"))
    np.testing.assert_array_equal(mask, (gt != 0).astype(np.uint8))
    again = prepare("chn6-cug", raw, tmp_path / "out2", seed=0)
    assert _lines(tmp_path / "out" / "splits" / "test.txt") == _lines(tmp_path / "out2" / "splits" / "test.txt")
    assert again["splits"] == summary["splits"]


def test_fgfd_fake_and_missing_label(tmp_path):
    rng = np.random.default_rng(3)
    raw = tmp_path / "fgfd"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(raw / "images" / f"f{i}.png")
        Image.fromarray((rng.random((12, 12)) > 0.5).astype(np.uint8) * 255).save(raw / "labels" / f"f{i}.png")
    summary = prepare("fgfd", raw, tmp_path / "out")
    assert summary["splits"] == {"train": 8, "val": 1, "test": 1}
    assert set(np.unique(np.asarray(Image.open(tmp_path / "out" / "masks" / "f0.png")))) == {0, 1}
    (raw / "labels" / "f4.png").unlink()
    with pytest.raises(IdgbrError, match=r"f4.*mask for f4\.png is missing"):
        prepare("fgfd", raw, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "masks" / "f4.png").exists()  # the earlier dataset is untouched


def test_whu_building_fake(tmp_path):
    rng = np.random.default_rng(4)
    raw = tmp_path / "whu"
    for year in ("2012", "2016"):
        image = rng.integers(1, 255, (96, 130, 3), dtype=np.uint8)
        image[:, 100:] = 0  # nodata strip: the crops at column 66 still hold data, none is all-zero
        image[64:, :64] = 0  # this crop (row 32.., col 0) is not entirely zero either
        _tif(raw / f"{year}" / "image.tif", image)
        _tif(raw / f"{year}" / "label.tif", (rng.random((96, 130)) > 0.7).astype(np.uint8) * 255)
    one = prepare("whu-building", raw, tmp_path / "one", phase="2012", patch_size=64)
    # grid: rows [0, 32] x cols [0, 64, 66] = 6 crops
    assert sum(one["splits"].values()) == 6
    both = prepare("whu-building", raw, tmp_path / "both", patch_size=64)
    assert sum(both["splits"].values()) == 12
    ds = SegmentationDataset(tmp_path / "both")
    sample = ds[ds.stems.index("whu2016_32_66")]
    assert sample["geo"]["crs"] == "EPSG:32633" and sample["image"].shape == (64, 64, 3)
    assert sample["geo"]["transform"][2] == pytest.approx(500000.0 + 66 * 0.5)
    assert set(np.unique(sample["mask"])) <= {0, 1}


def test_whu_skips_empty_crops(tmp_path):
    raw = tmp_path / "whu"
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :64] = 9
    _tif(raw / "2012" / "image.tif", image)
    _tif(raw / "2012" / "label.tif", np.zeros((64, 128), np.uint8))
    assert sum(prepare("whu-building", raw, tmp_path / "o", phase="2012", patch_size=64)["splits"].values()) == 1


def test_folder_with_palette_and_splits(tmp_path):
    import json

    rng = np.random.default_rng(5)
    raw = tmp_path / "any"
    (raw / "img").mkdir(parents=True)
    (raw / "lab").mkdir()
    colours = [[10, 20, 30], [200, 100, 0]]
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(raw / "img" / f"p{i}.png")
        Image.fromarray(np.asarray(colours, np.uint8)[rng.integers(0, 2, (8, 8))]).save(raw / "lab" / f"p{i}.png")
    (raw / "pal.json").write_text(json.dumps({"classes": [{"name": "soil", "value": colours[0]},
                                                          {"name": "crop", "value": colours[1]}], "ignore": []}))
    (raw / "sp").mkdir()
    (raw / "sp" / "train.txt").write_text("p0\np1\np2\n")
    (raw / "sp" / "test.txt").write_text("p3\np4\n")
    summary = prepare("folder", raw, tmp_path / "out", images="img", masks="lab", palette="pal.json", splits="sp")
    assert summary["splits"] == {"train": 3, "val": 0, "test": 2} and summary["classes"] == ["soil", "crop"]
    ds = SegmentationDataset(tmp_path / "out", "test")
    src = np.asarray(Image.open(raw / "lab" / "p3.png"))
    np.testing.assert_array_equal(ds.read_mask("p3"), (src == colours[1]).all(-1).astype(np.uint8))
    (raw / "sp" / "test.txt").write_text("p3\nghost\n")
    with pytest.raises(IdgbrError, match=r"test\.txt.*'ghost'.*remove it"):
        prepare("folder", raw, tmp_path / "o2", images="img", masks="lab", palette="pal.json", splits="sp")


def test_folder_index_masks_default_split_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    raw = tmp_path / "any"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(raw / "images" / f"q{i}.png")
        Image.fromarray(rng.integers(0, 3, (8, 8), dtype=np.uint8)).save(raw / "masks" / f"q{i}.png")
    summary = prepare("folder", raw, tmp_path / "out")
    assert summary["classes"] == ["class_0", "class_1", "class_2"]
    assert summary["splits"]["train"] + summary["splits"]["test"] == 12 and summary["splits"]["val"] == 0
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(raw / "masks" / "q5.png")
    with pytest.raises(IdgbrError, match=r"q5\.png.*mask size \(9, 8\) differs"):
        prepare("folder", raw, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_truncated_geotiff(tmp_path):
    raw = tmp_path / "whu"
    _tif(raw / "2012" / "image.tif", np.ones((64, 64, 3), np.uint8))
    _tif(raw / "2012" / "label.tif", np.zeros((64, 64), np.uint8))
    data = (raw / "2012" / "image.tif").read_bytes()
    (raw / "2012" / "image.tif").write_bytes(data[:200])
    with pytest.raises(IdgbrError, match=r"image\.tif.*(unreadable|truncated|read failed)"):
        prepare("whu-building", raw, tmp_path / "o", phase="2012", patch_size=32)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
