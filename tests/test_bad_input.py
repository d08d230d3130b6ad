"""Issue 7: the bad-input corpus, run through the real CLI, plus safety and determinism.

Every bad input must give exactly one ``idgbr: error: ...`` line on stderr that names the file (and the fix),
a non-zero exit code, no traceback (unless ``--debug``) and no partial output file (nor ``*.part`` temporary).
Accepted-by-design inputs (RGBA, palette, 16-bit coarse maps) must refine normally. The table of cases and
outcomes is in ``docs/robustness.md``. Tiny preset and 32 px images only: the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
rasterio = pytest.importorskip("rasterio")
torch.set_num_threads(1)  # the test machines are shared

from idgbr.commands.main import main  # noqa: E402
from idgbr.nn.config import RefinerConfig  # noqa: E402
from idgbr.errors import IdgbrError  # noqa: E402
from idgbr.nn.model import IDGBRModel  # noqa: E402
from tests.test_train import make_dataset  # noqa: E402

K = 3
REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny model, one tiny dataset, one good image/coarse pair (all 32 x 32).
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "run"
    IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=K)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "d", n=3, size=(32, 32), classes=K)


@pytest.fixture()
def good(data: Path, tmp_path: Path) -> dict[str, Path]:
    image, coarse = tmp_path / "image.png", tmp_path / "coarse.png"
    image.write_bytes((data / "images" / "s0.png").read_bytes())
    coarse.write_bytes((data / "coarse" / "c1" / "s0.png").read_bytes())
    return {"image": image, "coarse": coarse}


def rgb(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def index_map(h: int = 32, w: int = 32) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    out[:, w // 2:] = 1
    out[h // 2:, :w // 3] = 2
    return out


def write_tif(path: Path, array: np.ndarray, **profile) -> Path:
    array = array[None] if array.ndim == 2 else array
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=array.dtype.name, **profile) as dst:
        dst.write(array)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def refine_args(run: Path, image: Path, coarse: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", "--model", str(run), "--image", str(image), "--coarse", str(coarse), "--out", str(out),
            "--steps", "1", "--guidance", "1", "--no-progress", *extra]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files an interrupted/failed write could leave behind."""
    return [p for p in folder.rglob("*") if p.name.endswith(".part") or ".partial" in p.name] if folder.exists() else []


def assert_user_error(argv: list[str], capsys, *expected: str, out: Path | None = None) -> str:
    """Run the CLI; check one error line naming ``expected`` (file and fix), exit 2, no traceback, no output."""
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    if os.environ.get("IDGBR_CORPUS_LOG"):  # used to write the table in docs/robustness.md
        with open(os.environ["IDGBR_CORPUS_LOG"], "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "argv": argv[:1],
                                 "code": code, "err": err}) + "\n")
    assert code == 2, f"exit {code}: {err}"
    assert len(err.splitlines()) == 1, err
    assert err.startswith("idgbr: error: ") and "internal error" not in err and "Traceback" not in err + captured.out
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    if out is not None:
        assert not out.exists(), f"partial output {out} left behind"
        assert not leftovers(out.parent), leftovers(out.parent)
        assert not any(out.parent.glob(f"{out.name}.*")), list(out.parent.glob(f"{out.name}.*"))  # scene sidecars
    return err


def assert_ok(argv: list[str], capsys, out: Path) -> np.ndarray:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert not leftovers(out.parent)
    return np.asarray(Image.open(out)) if out.suffix == ".png" else rasterio.open(out).read(1)


# --------------------------------------------------------------------------------------------------------------
# refine, single-file mode: broken, odd and mismatched inputs.
# --------------------------------------------------------------------------------------------------------------
def test_truncated_png_image_and_coarse(run, good, tmp_path, capsys):
    out = tmp_path / "out" / "refined.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(good["image"].read_bytes()[:200])
    assert_user_error(refine_args(run, broken, good["coarse"], out), capsys, "broken.png", "truncated", "re-export",
                      out=out)
    broken_coarse = tmp_path / "broken_coarse.png"
    broken_coarse.write_bytes(good["coarse"].read_bytes()[:60])
    assert_user_error(refine_args(run, good["image"], broken_coarse, out), capsys, "broken_coarse.png", "re-export",
                      out=out)


def test_truncated_tiff_image_and_coarse(run, tmp_path, capsys):
    out = tmp_path / "out" / "refined.tif"
    image = truncate(write_tif(tmp_path / "image.tif", np.moveaxis(rgb(), -1, 0), compress="deflate"), 0.6)
    coarse = write_tif(tmp_path / "coarse.tif", index_map())
    assert_user_error(refine_args(run, image, coarse, out), capsys, "image.tif", "re-export", out=out)
    good_image = write_tif(tmp_path / "good.tif", np.moveaxis(rgb(), -1, 0))
    bad_coarse = truncate(write_tif(tmp_path / "bad_coarse.tif", index_map(), compress="deflate"), 0.5)
    assert_user_error(refine_args(run, good_image, bad_coarse, out), capsys, "bad_coarse.tif", "re-export", out=out)
    (tmp_path / "header_only.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")
    assert_user_error(refine_args(run, tmp_path / "header_only.tif", coarse, out), capsys, "header_only.tif", out=out)


def test_rgba_and_palette_images_are_accepted(run, good, tmp_path, capsys):
    """RGBA -> RGB (alpha dropped) and palette -> its RGB colours; a palette coarse map gives its indices."""
    image = np.asarray(Image.open(good["image"]))
    Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    out = tmp_path / "out" / "rgba.png"
    from_rgba = assert_ok(refine_args(run, tmp_path / "rgba.png", good["coarse"], out), capsys, out)
    from_rgb = assert_ok(refine_args(run, good["image"], good["coarse"], tmp_path / "out" / "rgb.png"), capsys,
                         tmp_path / "out" / "rgb.png")
    np.testing.assert_array_equal(from_rgba, from_rgb)
    Image.open(good["image"]).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "pal.png")
    assert assert_ok(refine_args(run, tmp_path / "pal.png", good["coarse"], out), capsys, out).shape == (32, 32)
    coarse = Image.fromarray(index_map(), mode="L").convert("P")
    coarse.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    coarse.save(tmp_path / "pal_coarse.png")
    assert assert_ok(refine_args(run, good["image"], tmp_path / "pal_coarse.png", out), capsys, out).shape == (32, 32)


def test_16_bit_inputs(run, good, tmp_path, capsys):
    """A 16-bit coarse PNG with valid indices is accepted; a 16-bit single-band image is the wrong band count for
    an RGB model; a 16-bit RGB GeoTIFF is accepted (scaled by its dtype)."""
    out = tmp_path / "out" / "refined.png"
    Image.fromarray(index_map().astype(np.uint16)).save(tmp_path / "coarse16.png")
    assert Image.open(tmp_path / "coarse16.png").mode.startswith("I")
    assert assert_ok(refine_args(run, good["image"], tmp_path / "coarse16.png", out), capsys, out).shape == (32, 32)
    out.unlink()
    Image.fromarray((index_map().astype(np.uint16) + 300)).save(tmp_path / "coarse16_bad.png")
    assert_user_error(refine_args(run, good["image"], tmp_path / "coarse16_bad.png", out), capsys,
                      "coarse16_bad.png", "outside the 3 classes", "use indices 0..2", out=out)
    Image.fromarray((rgb()[..., 0].astype(np.uint16) * 200)).save(tmp_path / "grey16.png")
    assert_user_error(refine_args(run, tmp_path / "grey16.png", good["coarse"], out), capsys,
                      "grey16.png", "1 band", "3", out=out)
    image16 = write_tif(tmp_path / "rgb16.tif", np.moveaxis(rgb().astype(np.uint16) * 200, -1, 0))
    coarse = write_tif(tmp_path / "coarse.tif", index_map())
    tif_out = tmp_path / "out" / "rgb16.tif"
    assert assert_ok(refine_args(run, image16, coarse, tif_out), capsys, tif_out).shape == (32, 32)


def test_sizes_differ(run, data, good, tmp_path, capsys):
    out = tmp_path / "out" / "refined.png"
    Image.fromarray(index_map(24, 32)).save(tmp_path / "short.png")
    assert_user_error(refine_args(run, good["image"], tmp_path / "short.png", out), capsys,
                      "short.png", "differs from the image size", out=out)
    np.save(tmp_path / "short.npy", np.full((K, 24, 32), 1 / K, np.float32))
    assert_user_error(refine_args(run, good["image"], tmp_path / "short.npy", out), capsys,
                      "short.npy", "image's size", out=out)
    # scene mode (GeoTIFF)
    image = write_tif(tmp_path / "image.tif", np.moveaxis(rgb(), -1, 0))
    coarse = write_tif(tmp_path / "short.tif", index_map(24, 32))
    assert_user_error(refine_args(run, image, coarse, out.with_suffix(".tif")), capsys, "short.tif", "differs",
                      out=out.with_suffix(".tif"))


def test_mask_size_differs_in_a_dataset(run, data, tmp_path, capsys):
    """train and evaluate read masks; a mask of another size names the mask and the image."""
    bad = tmp_path / "d"
    make_dataset(bad, n=3, size=(32, 32), classes=K)
    Image.fromarray(index_map(30, 32)).save(bad / "masks" / "s2.png")  # s2 is the test split
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.fromarray(index_map()).save(preds / "s2.png")
    report = tmp_path / "report.md"
    assert_user_error(["evaluate", "--data", str(bad), "--pred", str(preds), "--out", str(report)], capsys,
                      "s2.png", out=report)
    Image.fromarray(index_map(30, 32)).save(bad / "masks" / "s0.png")  # in the train split
    assert_user_error(["train", "--preset", "tiny", "--data", str(bad), "--coarse", "c1", "--out", str(tmp_path / "r"),
                       "--steps", "1", "--no-progress"], capsys, "s0.png", "differs from image size",
                      out=tmp_path / "r" / "model.safetensors")


def test_coarse_values_outside_the_classes(run, data, good, tmp_path, capsys):
    out = tmp_path / "out" / "refined.png"
    Image.fromarray(np.where(index_map() == 2, 7, index_map()).astype(np.uint8)).save(tmp_path / "seven.png")
    assert_user_error(refine_args(run, good["image"], tmp_path / "seven.png", out), capsys,
                      "seven.png", "[7]", "use indices 0..2", out=out)
    image = write_tif(tmp_path / "image.tif", np.moveaxis(rgb(), -1, 0))
    coarse = write_tif(tmp_path / "seven.tif", np.where(index_map() == 2, 7, index_map()).astype(np.uint8))
    assert_user_error(refine_args(run, image, coarse, out.with_suffix(".tif")), capsys, "seven.tif", "outside",
                      out=out.with_suffix(".tif"))
    # folder mode: a coarse map in DATA/coarse/NAME with a bad value
    bad = tmp_path / "d"
    make_dataset(bad, n=3, size=(32, 32), classes=K)
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad / "coarse" / "c1" / "s2.png")
    folder_out = tmp_path / "refined"
    assert_user_error(["refine", "--model", str(run), "--data", str(bad), "--coarse", "c1", "--out", str(folder_out),
                       "--steps", "1", "--guidance", "1", "--no-progress"], capsys, "s2.png", "outside",
                      out=folder_out / "s2.png")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_soft_maps(run, good, tmp_path, capsys, value):
    out = tmp_path / "out" / "refined.png"
    probs = np.full((K, 32, 32), 1 / K, np.float32)
    probs[1, 5, 5] = value
    np.save(tmp_path / "soft.npy", probs)
    assert_user_error(refine_args(run, good["image"], tmp_path / "soft.npy", out), capsys,
                      "soft.npy", "NaN/inf", out=out)
    image = write_tif(tmp_path / "image.tif", np.moveaxis(rgb(), -1, 0))
    soft = write_tif(tmp_path / "soft.tif", probs)
    tif_out = tmp_path / "out" / "refined.tif"
    assert_user_error(refine_args(run, image, soft, tif_out), capsys, "soft.tif", "NaN/inf", out=tif_out)


def test_non_finite_float_image(run, good, tmp_path, capsys):
    out = tmp_path / "out" / "refined.png"
    image = np.moveaxis(rgb().astype(np.float32) / 255, -1, 0)
    image[0, 3, 3] = np.nan
    image_path = write_tif(tmp_path / "float.tif", image)
    coarse = write_tif(tmp_path / "coarse.tif", index_map())
    # scene mode treats NaN pixels as nodata (documented): the map is written with 255 there
    tif_out = tmp_path / "out" / "float.tif"
    labels = assert_ok(refine_args(run, image_path, coarse, tif_out), capsys, tif_out)
    assert labels[3, 3] == 255 and (labels[labels != 255] < K).all()


def test_zero_size_and_empty_files(run, good, tmp_path, capsys):
    out = tmp_path / "out" / "refined.png"
    (tmp_path / "empty.png").write_bytes(b"")
    assert_user_error(refine_args(run, tmp_path / "empty.png", good["coarse"], out), capsys,
                      "empty.png", "0 bytes", out=out)
    assert_user_error(refine_args(run, good["image"], tmp_path / "empty.png", out), capsys,
                      "empty.png", "0 bytes", out=out)
    # a PNG whose header says 0 x 0 pixels
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    (tmp_path / "zero.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                                        + chunk(b"IEND", b""))
    assert_user_error(refine_args(run, tmp_path / "zero.png", good["coarse"], out), capsys, "zero.png", out=out)
    np.save(tmp_path / "zero.npy", np.zeros((K, 0, 0), np.float32))
    assert_user_error(refine_args(run, good["image"], tmp_path / "zero.npy", out), capsys, "zero.npy", out=out)
    (tmp_path / "empty.npy").write_bytes(b"")
    assert_user_error(refine_args(run, good["image"], tmp_path / "empty.npy", out), capsys, "empty.npy", out=out)


def test_wrong_band_count(run, good, tmp_path, capsys):
    out = tmp_path / "out" / "refined.png"
    Image.open(good["image"]).convert("L").save(tmp_path / "grey.png")
    assert_user_error(refine_args(run, tmp_path / "grey.png", good["coarse"], out), capsys, "grey.png", "1 band",
                      out=out)
    five = write_tif(tmp_path / "five.tif", np.random.default_rng(0).integers(0, 255, (5, 32, 32), dtype=np.uint8))
    coarse = write_tif(tmp_path / "coarse.tif", index_map())
    tif_out = tmp_path / "out" / "five.tif"
    assert_user_error(refine_args(run, five, coarse, tif_out), capsys, "five.tif", "5 image bands", "--bands",
                      out=tif_out)
    # an RGB coarse map where an index map is expected
    Image.fromarray(rgb()).save(tmp_path / "rgb_coarse.png")
    assert_user_error(refine_args(run, good["image"], tmp_path / "rgb_coarse.png", out), capsys,
                      "rgb_coarse.png", "single-band", out=out)
    # soft map with the wrong number of classes
    np.save(tmp_path / "k2.npy", np.full((2, 32, 32), 0.5, np.float32))
    assert_user_error(refine_args(run, good["image"], tmp_path / "k2.npy", out), capsys, "k2.npy", "(3, 32, 32)",
                      out=out)


def test_evaluate_broken_predictions(data, tmp_path, capsys):
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "s2.png").write_bytes((data / "coarse" / "c1" / "s2.png").read_bytes()[:50])  # IDAT cut
    report = tmp_path / "report.json"
    args = ["evaluate", "--data", str(data), "--pred", str(preds), "--format", "json", "--out", str(report)]
    assert_user_error(args, capsys, "s2.png", "re-export", out=report)
    Image.fromarray(np.full((32, 32), 5, np.uint8)).save(preds / "s2.png")
    assert_user_error(args, capsys, "s2.png", "outside", out=report)


def test_folder_mode_wrong_band_count_names_the_image(run, tmp_path, capsys):
    bad = make_dataset(tmp_path / "d", n=3, size=(32, 32), classes=K)
    Image.open(bad / "images" / "s2.png").convert("L").save(bad / "images" / "s2.png")
    out = tmp_path / "refined"
    assert_user_error(["refine", "--model", str(run), "--data", str(bad), "--coarse", "c1", "--out", str(out),
                       "--steps", "1", "--guidance", "1", "--no-progress"], capsys, "s2.png", "band", out=out / "s2.png")


# --------------------------------------------------------------------------------------------------------------
# Outputs that cannot be written.
# --------------------------------------------------------------------------------------------------------------
def test_output_under_a_regular_file(run, data, good, tmp_path, capsys):
    """A path below a regular file can never be a folder, even for root."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_user_error(refine_args(run, good["image"], good["coarse"], blocker / "out.png"), capsys,
                      "a_file", "writable")
    image = write_tif(tmp_path / "image.tif", np.moveaxis(rgb(), -1, 0))
    coarse = write_tif(tmp_path / "coarse.tif", index_map())
    assert_user_error(refine_args(run, image, coarse, blocker / "out.tif"), capsys, "a_file", "writable")
    assert_user_error(["refine", "--model", str(run), "--data", str(data), "--coarse", "c1", "--out", str(blocker / "x"),
                       "--steps", "1", "--guidance", "1", "--no-progress"], capsys, "a_file", "writable")
    preds = data / "coarse" / "c1"
    assert_user_error(["evaluate", "--data", str(data), "--pred", str(preds), "--out", str(blocker / "r.md")], capsys,
                      "a_file", "writable")
    assert_user_error(["train", "--preset", "tiny", "--data", str(data), "--out", str(blocker / "run"), "--steps", "1",
                       "--no-progress"], capsys, "a_file")
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    Image.fromarray(rgb()).save(raw / "images" / "a.png")
    Image.fromarray(index_map()).save(raw / "masks" / "a.png")
    assert_user_error(["prepare", "folder", str(raw), str(blocker / "prepared")], capsys, "a_file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions; test_output_under_a_regular_file covers it")
def test_output_in_a_read_only_folder(run, good, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_user_error(refine_args(run, good["image"], good["coarse"], locked / "out.png"), capsys,
                          "locked", "writable", out=locked / "out.png")
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------------------------------------------
# Configuration, pretrained paths and run folders.
# --------------------------------------------------------------------------------------------------------------
def test_unknown_config_keys(run, data, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "1", "--no-progress"]
    assert_user_error([*base, "--set", "lr_rate=1"], capsys, "lr_rate", "did you mean 'lr'", "valid keys",
                      out=out / "config.json")
    assert_user_error([*base, "--set", "lr"], capsys, "KEY=VALUE", out=out / "config.json")
    # a typo in a run's config.json
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("config.json", "model.safetensors", "architecture.json"):
        if (run / name).exists():
            (edited / name).write_bytes((run / name).read_bytes())
    config = json.loads((edited / "config.json").read_text())
    config["num_clases"] = config.pop("num_classes")
    (edited / "config.json").write_text(json.dumps(config))
    refined = tmp_path / "out.png"
    Image.fromarray(rgb()).save(tmp_path / "i.png")
    Image.fromarray(index_map()).save(tmp_path / "c.png")
    assert_user_error(refine_args(edited, tmp_path / "i.png", tmp_path / "c.png", refined), capsys,
                      "config.json", "'num_clases'", "did you mean 'num_classes'", out=refined)
    (edited / "config.json").write_text("{not json")
    assert_user_error(refine_args(edited, tmp_path / "i.png", tmp_path / "c.png", refined), capsys,
                      "config.json", "not valid JSON", out=refined)


@pytest.mark.parametrize("flag,extra", [("--pretrained", ["--preset", "sd15"]), ("--dinov2", ["--preset", "tiny"]),
                                        ("--label-embed", ["--preset", "tiny"])])
def test_missing_pretrained_paths(data, tmp_path, capsys, flag, extra):
    out = tmp_path / "r"
    assert_user_error(["train", *extra, flag, "/nonexistent/weights", "--data", str(data), "--out", str(out),
                       "--no-progress"], capsys, "/nonexistent/weights", "not found", out=out / "config.json")
    assert not out.exists()


@pytest.mark.parametrize("remove", ["config.json", "model.safetensors"])
def test_run_folder_with_missing_files(run, good, tmp_path, capsys, remove):
    broken = tmp_path / "broken_run"
    broken.mkdir()
    for path in run.iterdir():
        if path.name != remove:
            (broken / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out.png"
    assert_user_error(refine_args(broken, good["image"], good["coarse"], out), capsys, "broken_run", remove, out=out)


def test_truncated_weights_in_a_run_folder(run, good, tmp_path, capsys):
    broken = tmp_path / "broken_run"
    broken.mkdir()
    for path in run.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    truncate(broken / "model.safetensors", 0.5)
    out = tmp_path / "out.png"
    assert_user_error(refine_args(broken, good["image"], good["coarse"], out), capsys, "model.safetensors", out=out)


def test_missing_dataset_and_model(run, data, good, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert_user_error(refine_args(tmp_path / "nope", good["image"], good["coarse"], out), capsys, "nope", "not found",
                      out=out)
    assert_user_error(refine_args(run, tmp_path / "nope.png", good["coarse"], out), capsys, "nope.png", "not found",
                      out=out)
    assert_user_error(["evaluate", "--data", str(tmp_path / "nodata"), "--pred", str(good["image"].parent)], capsys,
                      "nodata", "not found")
    assert_user_error(["predict-coarse", "--model", str(run), "--data", str(data), "--no-progress"], capsys,
                      str(run), out=data / "coarse" / "run" / "s2.png")


# --------------------------------------------------------------------------------------------------------------
# prepare: broken files in a raw dataset leave no half-prepared OUT.
# --------------------------------------------------------------------------------------------------------------
def test_prepare_with_a_truncated_and_an_rgba_image(tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    for i in range(3):
        Image.fromarray(rgb(seed=i)).save(raw / "images" / f"a{i}.png")
        Image.fromarray(index_map()).save(raw / "masks" / f"a{i}.png")
    Image.fromarray(np.dstack([rgb(seed=9), np.full((32, 32), 255, np.uint8)])).save(raw / "images" / "a0.png")
    out = tmp_path / "prepared"
    assert main(["prepare", "folder", str(raw), str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    from idgbr.data.io import read_image

    assert read_image(out / "images" / "a0.png")[0].shape == (32, 32, 3)  # RGBA is read as RGB
    truncate(raw / "images" / "a1.png", 0.4)
    out2 = tmp_path / "prepared2"
    assert_user_error(["prepare", "folder", str(raw), str(out2)], capsys, "a1.png", "re-export")
    assert not out2.exists() or not any(out2.rglob("*.png")), sorted(out2.rglob("*"))
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Safety: no pickles, no escaping the dataset root.
# --------------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this object writes a file: the tests check that it never happens."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def pickle_bomb(path: Path, marker: Path, via_torch: bool) -> Path:
    payload = Payload()
    payload.marker = str(marker)
    if via_torch:
        torch.save({"conv1.weight": torch.zeros(1), "extra": payload}, path)
    else:
        path.write_bytes(pickle.dumps({"conv1.weight": payload}))
    return path


@pytest.mark.parametrize("name,via_torch", [("enc.pt", True), ("enc.pth", True), ("enc.pkl", False)])
def test_pickled_encoder_weights_are_refused(data, tmp_path, capsys, name, via_torch):
    marker = tmp_path / "PWNED"
    weights = pickle_bomb(tmp_path / name, marker, via_torch)
    out = tmp_path / "coarse_run"
    assert_user_error(["train-coarse", "--data", str(data), "--arch", "unet", "--out", str(out), "--iters", "1",
                       "--crop", "32", "--batch", "2", "--encoder-weights", str(weights), "--no-progress"], capsys,
                      name, "pickle", out=out / "model.safetensors")
    assert not marker.exists()


def test_pickle_in_place_of_model_safetensors(run, good, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil_run"
    evil.mkdir()
    for path in run.iterdir():
        (evil / path.name).write_bytes(path.read_bytes())
    pickle_bomb(evil / "model.safetensors", marker, via_torch=True)
    out = tmp_path / "out.png"
    assert_user_error(refine_args(evil, good["image"], good["coarse"], out), capsys, "model.safetensors",
                      "not a safetensors file", out=out)
    assert not marker.exists()


@pytest.mark.parametrize("stem", ["../outside", "/etc/passwd", "..", ".hidden", "sub/s0", "..\\s0"])
def test_split_lists_cannot_escape_the_dataset(data, tmp_path, capsys, stem):
    bad = tmp_path / "d"
    make_dataset(bad, n=3, size=(32, 32), classes=K)
    (tmp_path / "outside.png").write_bytes((bad / "images" / "s0.png").read_bytes())
    (bad / "splits" / "test.txt").write_text(f"s2\n{stem}\n")
    assert_user_error(["evaluate", "--data", str(bad), "--pred", str(bad / "coarse" / "c1")], capsys,
                      "test.txt", "invalid stem", "without folders")
    (bad / "splits" / "train.txt").write_text(f"s0\n{stem}\n")
    assert_user_error(["train", "--preset", "tiny", "--data", str(bad), "--out", str(tmp_path / "r"), "--steps", "1",
                       "--no-progress"], capsys, "train.txt", "invalid stem", out=tmp_path / "r" / "model.safetensors")


# --------------------------------------------------------------------------------------------------------------
# --debug, a real process, determinism.
# --------------------------------------------------------------------------------------------------------------
def test_debug_shows_the_traceback(run, good, tmp_path):
    with pytest.raises(IdgbrError, match="nope.png"):
        main(["--debug", *refine_args(run, tmp_path / "nope.png", good["coarse"], tmp_path / "o.png")])


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "idgbr", *args], env=env, capture_output=True, text=True, timeout=120)


def test_real_process_exit_code_and_debug(run, good, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(good["image"].read_bytes()[:100])
    args = refine_args(run, bad, good["coarse"], tmp_path / "o.png")
    done = _cli(*args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "bad.png" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    debug = _cli("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "bad.png" in debug.stderr
    assert not (tmp_path / "o.png").exists()


def test_cli_refine_twice_gives_identical_bytes(run, good, tmp_path, capsys):
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out in outs:
        assert main(refine_args(run, good["image"], good["coarse"], out, "--seed", "5")) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    image = write_tif(tmp_path / "image.tif", np.moveaxis(rgb(48, 40), -1, 0))
    coarse = write_tif(tmp_path / "coarse.tif", index_map(48, 40))
    tifs = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for out in tifs:
        assert main(refine_args(run, image, coarse, out, "--seed", "5", "--no-resume")) == 0
    assert rasterio.open(tifs[0]).read().tobytes() == rasterio.open(tifs[1]).read().tobytes()
    assert tifs[0].read_bytes() == tifs[1].read_bytes()
    capsys.readouterr()
