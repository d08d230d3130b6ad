"""The whole chain through the CLI on a tiny synthetic dataset, plus the report, analysis and speed helpers."""

import json

import numpy as np
import pytest
import torch

from idgbr.commands.main import main
from idgbr.errors import IdgbrError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from idgbr.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("syn") / "data"
    write_synthetic_dataset(root, n=10, size=64, seed=3)
    return root


def test_benchmark_cli_whole_chain(synthetic, tmp_path, capsys):
    """prepare-free chain: train coarse -> predict -> train refiners (+ controls) -> refine -> evaluate -> report."""
    run = tmp_path / "bench"
    args = ["benchmark", str(synthetic), "--coarse-arch", "unet", "--preset", "tiny", "--coarse-iters", "2",
            "--coarse-crop", "32", "--coarse-batch", "2", "--steps", "2", "--sample-steps", "2", "--out", str(run),
            "--train-minutes", "5", "--samples", "2", "--noise-scale", "0.5", "--image-only", "--coarse-folds", "0"]
    assert main(args) == 0
    assert "[note] the refiner learns real errors from each coarse model's in-sample train maps" in capsys.readouterr().out
    trained = json.loads((run / "refiners" / "diffusion_unet" / "train_config.json").read_text())
    assert trained["train_minutes"] == 5 and trained["steps"] == 2
    refined = json.loads((run / "refined" / "diffusion_unet" / "stage.json").read_text())["params"]
    assert refined["samples"] == 2 and refined["noise_scale"] == 0.5
    report = json.loads((run / "report.json").read_text())
    (entry,) = report["results"]
    assert entry["coarse_arch"] == "unet"
    for key in ("coarse", "refined"):
        metrics = entry[key]
        assert {"miou", "mf1", "oa", "kappa", "wfm", "per_class"} <= set(metrics)
        assert set(metrics["wfm"]) == {"1", "3", "5"}
        assert 0 <= metrics["miou"] <= 1
    assert set(entry["controls"]) == {"image_only", "deterministic", "deterministic_gated"}
    assert "repair" in entry and "seconds" in entry
    assert entry["gated"]["repair"]["iou_rtm"] >= 0 and entry["settings"]["gate_width"] == 8
    assert entry["coarse_folds"] == 0 and 0 <= entry["coarse_train"]["miou"] <= 1
    text = (run / "report.md").read_text()
    assert "Coarse model: unet" in text and "beat" in text and "gated 8 px" in text
    assert text.splitlines()[2].startswith("Targets:") and "deterministic control" in text.splitlines()[4]
    assert "train split, in-sample" in text and "50 % of its samples" in text
    assert (run / "bench_unet.png").stat().st_size > 0
    # a rerun reuses every finished stage
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[stage]" not in out and "[reuse]" in out
    # the coarse maps live in DATA/coarse/, shared by every run: if another run overwrote them, they are predicted
    # again from this run's coarse model instead of being scored as they are
    from idgbr.data.dataset import SegmentationDataset

    maps = synthetic / "coarse" / "bench_unet"
    victim = sorted(maps.glob("*.png"))[0]
    original = victim.read_bytes()
    other = sorted(maps.glob("*.png"))[1].read_bytes()
    assert other != original
    victim.write_bytes(other)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("[redo]")] == [
        f"[redo] predict coarse unet {split}: its output changed since it ran (another run wrote there)"
        for split in (["test"] if victim.stem in SegmentationDataset(synthetic, "test", load_mask=False).stems else ["train"])]
    assert victim.read_bytes() == original


def test_benchmark_out_of_fold_coarse_maps(synthetic, tmp_path, capsys):
    """--coarse-folds K: the refiner trains on out-of-fold train maps; the report gives their scores next to test."""
    from idgbr.data.dataset import SegmentationDataset

    run = tmp_path / "bench_oof"
    args = ["benchmark", str(synthetic), "--coarse-arch", "unet", "--preset", "tiny", "--coarse-iters", "2",
            "--coarse-crop", "32", "--coarse-batch", "2", "--steps", "1", "--sample-steps", "1", "--no-controls",
            "--coarse-folds", "2", "--out", str(run)]
    assert main(args) == 0
    (entry,) = json.loads((run / "report.json").read_text())["results"]
    assert entry["coarse_folds"] == 2 and {"miou", "wfm"} <= set(entry["coarse_train"])
    assert "train split, out-of-fold, 2 folds" in (run / "report.md").read_text()
    maps = synthetic / "coarse" / "bench_unet_oof2"
    provenance = json.loads((maps / "provenance.json").read_text())
    train = SegmentationDataset(synthetic, "train").stems
    assert sorted(s for f in provenance["fold_models"] for s in f["held_out"]) == sorted(train)
    assert all(not set(f["held_out"]) & set(f["trained_on"]) for f in provenance["fold_models"])
    test = SegmentationDataset(synthetic, "test").stems
    assert all((maps / f"{stem}.png").exists() for stem in train + test)
    refiner = json.loads((run / "refiners" / "diffusion_pooled" / "stage.json").read_text())
    assert refiner["params"]["coarse"] == ["bench_unet_oof2"]  # trained on the out-of-fold maps
    capsys.readouterr()
    assert main(args[:-4] + ["--coarse-folds", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "give --coarse-folds between 2 and" in err
    assert not (tmp_path / "bad").exists()
    assert main(args[:-4] + ["--coarse-folds", "2", "--coarse-fold-group", "zzz", "--out", str(tmp_path / "bad")]) == 2
    assert "--coarse-fold-group 'zzz' does not match stem" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_benchmark_shares_a_refiner_trained_on_synthetic_maps_only(synthetic, tmp_path, capsys):
    """coarse_corruption=1: the refiner never reads a coarse model's maps, so one is trained for both architectures
    (and one deterministic control); each architecture's test maps are still refined and scored on their own."""
    run = tmp_path / "bench_syn"
    args = ["benchmark", str(synthetic), "--coarse-arch", "unet", "--coarse-arch", "deeplabv3plus", "--preset", "tiny",
            "--coarse-iters", "1", "--coarse-crop", "32", "--coarse-batch", "2", "--steps", "1", "--sample-steps", "1",
            "--no-image-only", "--gate", "-1", "--set", "coarse_corruption=1.0", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (run / "refiners").iterdir()) == ["deterministic_synthetic", "diffusion_synthetic"]
    assert out.count("[stage] train refiner diffusion_synthetic") == 1
    assert "[reuse] train refiner diffusion_synthetic" in out
    assert json.loads((run / "refiners" / "diffusion_synthetic" / "stage.json").read_text())["params"]["coarse"] is None
    assert {p.name for p in (run / "refined").iterdir()} >= {"diffusion_unet", "diffusion_deeplabv3plus"}
    report = json.loads((run / "report.json").read_text())
    assert [e["coarse_arch"] for e in report["results"]] == ["unet", "deeplabv3plus"]
    assert all("train refiner diffusion_synthetic" in e["seconds"] for e in report["results"])
    assert (run / "report.md").read_text().count("synthetic degradations of the ground truth only") == 2


def test_benchmark_trains_side_by_side_as_it_would_one_after_the_other(synthetic, tmp_path, capsys):
    """side_by_side: the shared refiner + coarse models and the control train in two fresh processes; with one
    thread each the models are bit-identical to a sequential run's, the report is the same but for the seconds, and
    a rerun reuses every stage. A failing process stops the benchmark with one error naming the way out."""
    from safetensors.torch import load_file

    from idgbr.evaluation.benchmark import BenchmarkSettings, run_benchmark
    from idgbr.data.dataset import SegmentationDataset

    def settings(side_by_side, **overrides):
        return BenchmarkSettings(coarse_archs=("unet", "deeplabv3plus"), preset="tiny", coarse_iters=1, coarse_crop=32,
                                 coarse_batch=2, refiner_steps=2, sample_steps=1, gate_width=None,
                                 overrides={"coarse_corruption": 1.0, **overrides}, side_by_side=side_by_side)

    reports = {}
    for side_by_side in (True, False):
        reports[side_by_side] = run_benchmark(synthetic, tmp_path / f"run_{side_by_side}", settings(side_by_side))
    out = capsys.readouterr().out
    assert out.count("[side by side]") == 2 and "2 processes x 1 thread(s)" in out
    for model in ("refiners/diffusion_synthetic", "refiners/deterministic_synthetic", "coarse_models/unet",
                  "coarse_models/deeplabv3plus"):
        parallel, sequential = (load_file(tmp_path / f"run_{flag}" / model / "model.safetensors") for flag in (True, False))
        assert parallel.keys() == sequential.keys() and all(torch.equal(parallel[k], sequential[k]) for k in parallel)
    assert reports[True]["side_by_side_threads"] == 1 and reports[False]["side_by_side_threads"] == 0
    refined = sorted(p.relative_to(tmp_path / "run_True") for p in (tmp_path / "run_True").glob("refined/*/*.png"))
    assert len(refined) == 4 * len(SegmentationDataset(synthetic, "test").stems)
    assert all((tmp_path / "run_True" / p).read_bytes() == (tmp_path / "run_False" / p).read_bytes() for p in refined)
    for a, b in zip(reports[True]["results"], reports[False]["results"]):
        assert a["refined"]["miou"] == b["refined"]["miou"] and a["seconds"].keys() == b["seconds"].keys()
    assert "training side by side: 2 processes x 1 thread(s)" in (tmp_path / "run_True" / "report.md").read_text()
    run_benchmark(synthetic, tmp_path / "run_True", settings(True))
    out = capsys.readouterr().out
    assert "[stage]" not in out.replace("[stage] refine test", "") and "[reuse] train refiner diffusion_synthetic" in out
    assert "[side by side]" not in out  # nothing left to train: no processes started
    # a process that fails (here: DINOv2 weights that do not exist) stops both and leaves no finished training stage
    with pytest.raises(IdgbrError, match="training side by side failed .* add --sequential"):
        run_benchmark(synthetic, tmp_path / "bad", settings(True, dinov2=str(tmp_path / "nope")))
    assert not list((tmp_path / "bad").glob("refiners/*/stage.json"))


def test_refine_folder_and_evaluate_cli(synthetic, tmp_path, capsys):
    from idgbr.nn.config import RefinerConfig
    from idgbr.nn.model import IDGBRModel

    # coarse maps: ground truth shifted by a few pixels
    coarse = synthetic / "coarse" / "shifted"
    coarse.mkdir(parents=True, exist_ok=True)
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.data.io import write_label

    dataset = SegmentationDataset(synthetic, None)
    for stem in dataset.stems:
        write_label(coarse / f"{stem}.png", np.roll(dataset.read_mask(stem), 3, axis=1))
    config = RefinerConfig.preset_config("tiny", num_classes=dataset.classes.num_classes, image_channels=3)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    IDGBRModel(config).save_pretrained(model_dir)
    out = tmp_path / "refined"
    assert main(["refine", "--model", str(model_dir), "--data", str(synthetic), "--split", "test", "--coarse",
                 "shifted", "--out", str(out), "--steps", "2", "--guidance", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--data", str(synthetic), "--pred", str(out), "--split", "test", "--coarse",
                 str(coarse), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"miou", "mf1", "oa", "kappa", "wfm", "per_class"} <= set(result)
    # refine wrote, for every test image, what the Refiner gives for it with the CLI's seed (0)
    from idgbr.data.io import read_label
    from idgbr.metrics import evaluate_maps
    from idgbr.inference.pipeline import Refiner

    refiner = Refiner.from_pretrained(model_dir)
    test = SegmentationDataset(synthetic, "test", coarse="shifted")
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(test.stems)
    pairs = []
    for index, stem in enumerate(test.stems):
        sample = test[index]
        expected = refiner.refine(sample["image"], sample["coarse"], steps=2, guidance=1.0,
                                  generator=torch.Generator().manual_seed(0))
        written, _ = read_label(out / f"{stem}.png")
        assert np.array_equal(written, expected), stem
        # the map depends on the seed, so the comparison above checks the seed too
        assert not np.array_equal(written, refiner.refine(sample["image"], sample["coarse"], steps=2, guidance=1.0,
                                                          generator=torch.Generator().manual_seed(1)))
        pairs.append((sample["mask"], written, sample["coarse"]))
    # evaluate scored those files against the masks, and the coarse maps beside them
    scores = evaluate_maps(pairs, dataset.classes.num_classes)
    for key in ("miou", "mf1", "oa", "kappa"):
        assert result[key] == pytest.approx(scores[key]) and result["coarse"][key] == pytest.approx(scores["coarse"][key])
    assert result["wfm"] == pytest.approx(scores["wfm"]) and result["coarse"]["wfm"] == pytest.approx(scores["coarse"]["wfm"])
    assert result["num_images"] == len(test.stems) and result["miou"] != result["coarse"]["miou"]


def test_callback_sees_every_step_and_channels_last_is_identical():
    from idgbr.nn.config import RefinerConfig
    from idgbr.nn.model import IDGBRModel
    from idgbr.inference.pipeline import Refiner

    torch.manual_seed(0)
    config = RefinerConfig.preset_config("tiny", num_classes=3, image_channels=3)
    model = IDGBRModel(config)
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    coarse = np.random.default_rng(1).integers(0, 3, (40, 48)).astype(np.uint8)
    seen = []
    plain = Refiner(model).refine(image, coarse, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0),
                                  callback=lambda step, t, x0: seen.append((step, t, tuple(x0.shape))))
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert seen[0][1] > seen[-1][1]  # timesteps run downwards
    fast = Refiner(IDGBRModel(config).eval(), channels_last=True)
    fast.model.load_state_dict(model.state_dict())
    again = fast.refine(image, coarse, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(plain, again)


def test_wiener_analysis_and_panel(synthetic, tmp_path, capsys):
    assert main(["analyze", "wiener", "--data", str(synthetic), "--images", "3", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "wiener.png").exists() and "half_power_frequency" in (tmp_path / "wiener.json").read_text()
    from diffusers import DDIMScheduler

    from idgbr.evaluation.analysis import wiener_curves

    freq = np.linspace(0.01, 1, 200)
    alphas = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.numpy()
    curves = wiener_curves(alphas, [999, 500, 100, 10], freq, 0.5 * freq ** -2.0)
    half = [freq[np.argmax(curves[t] < 0.5)] if (curves[t] < 0.5).any() else 1.0 for t in (999, 500, 100, 10)]
    # the optimal denoiser passes higher frequencies as t decreases (the paper's §III-B argument)
    assert all(a <= b for a, b in zip(half, half[1:])) and half[0] < half[1] < half[2]
    from idgbr.evaluation.report import comparison_panel, error_map

    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 1
    pred = np.roll(gt, 2, axis=0)
    colours = error_map(gt, pred, positive=1)
    assert tuple(colours[5, 10]) == (40, 90, 255)  # missed: false negative, blue
    assert tuple(colours[15, 10]) == (235, 40, 40)  # extra: false positive, red
    assert tuple(colours[0, 0]) == (255, 255, 255)
    png = comparison_panel(tmp_path / "p.png", np.zeros((20, 20, 3), np.uint8), gt, pred, gt, 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frequency_analysis(synthetic, tmp_path):
    from idgbr.evaluation.analysis import band_energy, frequency_report
    from idgbr.nn.config import RefinerConfig
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.nn.model import IDGBRModel

    dataset = SegmentationDataset(synthetic, None)
    coarse = synthetic / "coarse" / "gt"
    coarse.mkdir(parents=True, exist_ok=True)
    from idgbr.data.io import write_label

    for stem in dataset.stems:
        write_label(coarse / f"{stem}.png", dataset.read_mask(stem))
    config = RefinerConfig.preset_config("tiny", num_classes=dataset.classes.num_classes, image_channels=3)
    IDGBRModel(config).save_pretrained(tmp_path / "m")
    result = frequency_report(tmp_path / "m", synthetic, "test", "gt", tmp_path, samples=1, steps=4, size=32)
    # the trajectory is the sampler's: 4 descending timesteps, one (low, high) energy pair per step
    assert len(result["timesteps"]) == 4 and result["timesteps"] == sorted(result["timesteps"], reverse=True)
    (refiner_key,) = [k for k in result["energies"] if k.startswith("refiner")]
    assert len(result["energies"][refiner_key]) == 4
    # the coarse reference line is the band energy of the coarse map's +-1 one-hot centre crop
    sample = SegmentationDataset(synthetic, "test", coarse="gt")[0]
    h, w = sample["mask"].shape
    side = min(32, h, w) // config.size_multiple * config.size_multiple
    crop = sample["coarse"][(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    onehot = np.stack([(crop == k) * 2.0 - 1 for k in range(dataset.classes.num_classes)])
    expected = band_energy(onehot, 0.1)
    assert all(np.allclose(pair, expected) for pair in result["energies"]["coarse map (sample 0)"])
    assert json.loads((tmp_path / "frequency.json").read_text())["timesteps"] == result["timesteps"]
    assert (tmp_path / "frequency.png").exists()


def test_band_split_and_change_fractions_on_known_fields():
    """band_split separates a field into its components below / above the cutoff exactly (ideal radial filter at
    cutoff x Nyquist); band_energy is their Parseval energy; change_fractions attributes each band's change to the
    stage that made it."""
    from idgbr.evaluation.analysis import band_energy, band_split, change_fractions

    n = 64
    y, x = np.mgrid[0:n, 0:n]
    low = np.cos(2 * np.pi * 2 * x / n)  # 2 cycles per 64 px: 0.0625 Nyquist, below a 0.1 cutoff
    high = 0.5 * np.sin(2 * np.pi * 12 * y / n) + 0.25 * np.cos(2 * np.pi * (5 * x + 7 * y) / n)  # >= 0.27 Nyquist
    got_low, got_high = band_split(np.stack([low + high, 3 * low]), cutoff=0.1)
    np.testing.assert_allclose(got_low, np.stack([low, 3 * low]), atol=1e-9)
    np.testing.assert_allclose(got_high, np.stack([high, np.zeros_like(low)]), atol=1e-9)
    # between the two components (0.0625 and >= 0.27 Nyquist) the cutoff moves nothing; above both it keeps all low
    np.testing.assert_allclose(band_split((low + high)[None], cutoff=0.2)[0][0], low, atol=1e-9)
    np.testing.assert_allclose(band_split((low + high)[None], cutoff=1.5)[0][0], low + high, atol=1e-9)
    e_low, e_high = band_energy(low + high, cutoff=0.1)
    # Parseval: sum |F|^2 = N^2 sum f^2 (the components are mean-free and orthogonal)
    assert e_low == pytest.approx(n * n * np.sum(low ** 2), rel=1e-9)
    assert e_high == pytest.approx(n * n * np.sum(high ** 2), rel=1e-9)
    # stage 1 changes only the low band (by 2 units), stage 2 only the high band (by 1 unit, then 3 more)
    states = [np.zeros((1, n, n)), 2 * low[None], 2 * low[None] + high[None], 2 * low[None] + 4 * high[None]]
    shares = change_fractions(states, cutoff=0.1)
    np.testing.assert_allclose(shares["low"], [1.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(shares["high"], [0.0, 0.25, 0.75], atol=1e-9)


def test_speed_grid_counts_network_evaluations(synthetic):
    from idgbr.nn.config import RefinerConfig
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.nn.model import IDGBRModel
    from idgbr.inference.pipeline import Refiner
    from idgbr.evaluation.speed import pick_fast_mode, run_grid

    dataset = SegmentationDataset(synthetic, "test")
    sample = dataset[0]
    tiles = [(sample["image"][:32, :32], sample["mask"][:32, :32], np.roll(sample["mask"], 2, 0)[:32, :32])]
    config = RefinerConfig.preset_config("tiny", num_classes=dataset.classes.num_classes, image_channels=3)
    refiner = Refiner(IDGBRModel(config))
    _, cells = run_grid(refiner, tiles, steps_grid=(25, 2), strength_grid=(1.0, 0.5), guidance_grid=(3.0, 1.0),
                        log=lambda _: None)
    nfe = {(c.steps, c.strength, c.guidance): c.nfe for c in cells}
    assert nfe[(25, 1.0, 3.0)] == 50 and nfe[(2, 1.0, 1.0)] == 2 and nfe[(2, 0.5, 1.0)] == 1
    assert nfe[(25, 0.5, 3.0)] == 2 * round(25 * 0.5)
    assert pick_fast_mode([], 50) is None


def test_speed_grid_gain_kept_is_the_share_of_the_reference_gain():
    """run_grid's gain_kept = (cell WFm3 - coarse WFm3) / (reference WFm3 - coarse WFm3), from the maps each cell
    returns (a stub refiner returns the ground truth for the reference cell and known maps for the others); NaN when
    the reference gains nothing; pick_fast_mode takes the cheapest cell keeping >= 90 % of the gain."""
    from types import SimpleNamespace

    from idgbr.metrics import evaluate_maps
    from idgbr.evaluation.speed import pick_fast_mode, run_grid

    gt = np.zeros((48, 48), np.uint8)
    gt[10:30, 12:40] = 1
    gt[34:, :20] = 2
    coarse = np.roll(gt, 4, axis=1)
    halfway = np.roll(gt, 1, axis=1)
    tiles = [(np.zeros((48, 48, 3), np.uint8), gt, coarse)]

    class Stub:
        config = SimpleNamespace(num_classes=3)
        last_nfe = 0

        def __init__(self, answers):
            self.answers = answers

        def refine(self, image, coarse_map, steps, strength, guidance, generator):
            self.last_nfe = steps * (2 if guidance != 1 else 1)
            return self.answers.get((steps, strength, guidance), coarse_map)

    answers = {(25, 1.0, 3.0): gt, (2, 1.0, 1.0): halfway, (1, 1.0, 1.0): gt}
    _, cells = run_grid(Stub(answers), tiles, steps_grid=(25, 2, 1), strength_grid=(1.0,), guidance_grid=(3.0, 1.0),
                        log=lambda _: None)
    kept = {(c.steps, c.guidance): c.gain_kept for c in cells}
    wfm = {name: evaluate_maps([(gt, m)], 3, tolerances=(3,))["wfm"]["3"] for name, m in
           (("gt", gt), ("coarse", coarse), ("halfway", halfway))}
    assert wfm["coarse"] < wfm["halfway"] < wfm["gt"]
    assert kept[(25, 3.0)] == pytest.approx(1.0) and kept[(1, 1.0)] == pytest.approx(1.0)
    assert kept[(2, 1.0)] == pytest.approx((wfm["halfway"] - wfm["coarse"]) / (wfm["gt"] - wfm["coarse"]))
    assert 0 < kept[(2, 1.0)] < 1 and kept[(2, 3.0)] == 0.0 and kept[(25, 1.0)] == 0.0
    fast = pick_fast_mode(cells, 50)
    assert (fast.steps, fast.guidance) == (1, 1.0)
    # a reference that gains nothing: no share is defined
    _, cells = run_grid(Stub({}), tiles, steps_grid=(25, 1), strength_grid=(1.0,), guidance_grid=(3.0,),
                        log=lambda _: None)
    assert all(np.isnan(c.gain_kept) for c in cells) and pick_fast_mode(cells, 50) is None


def test_demo_without_data_is_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--source", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "Traceback" not in err


def test_prepare_dubai_scale(datasets_dir, tmp_path):
    from idgbr.data.dataset import SegmentationDataset
    from idgbr.data.prepare import prepare

    raw = datasets_dir / "dubai_aerial"
    summary = prepare("dubai", raw, tmp_path / "half", scale=0.25)
    assert summary["splits"]["train"] == 54 and summary["splits"]["test"] == 18
    dataset = SegmentationDataset(tmp_path / "half", "test")
    sample = dataset[0]
    assert sample["image"].shape[:2] == sample["mask"].shape
    assert max(sample["mask"].shape) < 600  # tile 7/8 images are ~2000 px at full size


def test_demo_passes_its_options(monkeypatch, tmp_path, capsys):
    import idgbr.evaluation.demo

    seen = {}
    monkeypatch.setattr(idgbr.evaluation.demo, "run_demo",
                        lambda out, train, source, settings: seen.update(train=train, settings=settings))
    assert main(["demo", "--train", "--coarse-folds", "3", "--out", str(tmp_path)]) == 0
    assert seen["train"] and seen["settings"] == idgbr.evaluation.demo.DemoSettings(coarse_folds=3)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert not seen["train"] and seen["settings"] == idgbr.evaluation.demo.DemoSettings()
    assert main(["demo", "--train", "--train-minutes", "7.5", "--out", str(tmp_path)]) == 0
    assert seen["settings"].train_minutes == 7.5
    # training options without --train would be silently ignored: refused instead
    seen.clear()
    assert main(["demo", "--train-minutes", "7.5", "--out", str(tmp_path)]) == 2
    assert not seen and "add --train" in capsys.readouterr().err


def test_benchmark_on_a_committed_coarse_track(synthetic, tmp_path, capsys):
    """--coarse-maps DIR: a complete track made beforehand replaces the coarse stages; a bad folder is one line."""
    import shutil

    from idgbr.data.dataset import SegmentationDataset

    assert main(["predict-coarse", "--folds", "2", "--arch", "unet", "--data", str(synthetic), "--name", "conv",
                 "--work", str(tmp_path / "w"), "--iters", "2", "--crop", "32", "--train-batch", "2", "--tile", "64", "--overlap", "8",
                 "--val-every", "1", "--with-test", "--no-progress"]) == 0
    fixture = tmp_path / "fixtures" / "unet_converged"
    shutil.copytree(synthetic / "coarse" / "conv", fixture)
    other = tmp_path / "fixtures" / "unet_pretrained"  # a second track of the same architecture
    shutil.copytree(fixture, other)
    run = tmp_path / "bench_track"
    args = ["benchmark", str(synthetic), "--preset", "tiny", "--steps", "1", "--sample-steps", "1", "--no-image-only",
            "--coarse-maps", str(other), "--coarse-maps", str(fixture) + "/", "--out", str(run)]
    assert main(args) == 0
    entry_other, entry = json.loads((run / "report.json").read_text())["results"]
    assert entry_other["coarse_maps"] == str(other) and entry_other["coarse_arch"] == "unet"
    for track in ("unet_converged", "unet_pretrained"):  # each track keeps its own refined maps and chart
        assert (run / "refined" / f"diffusion_track_{track}").is_dir() and (run / f"bench_{track}.png").exists()
    assert json.loads((run / "refined" / "diffusion_track_unet_pretrained" / "stage.json").read_text())["params"][
        "coarse"] == "track_unet_pretrained"
    assert entry["coarse_arch"] == "unet" and entry["coarse_maps"] == str(fixture) and entry["coarse_folds"] == 2
    assert "idgbr predict-coarse --folds 2" in entry["coarse_provenance"]
    assert set(entry["controls"]) == {"deterministic", "deterministic_gated"}  # --no-image-only
    assert not (run / "refiners" / "image_only").exists()
    refiner = json.loads((run / "refiners" / "diffusion_pooled" / "stage.json").read_text())
    assert refiner["params"]["coarse"] == ["track_unet_pretrained", "track_unet_converged"]  # both tracks' real errors
    assert not (run / "coarse_models").exists()  # no coarse model was trained
    assert "coarse track" in (run / "report.md").read_text()
    # a sieve (here the config's, as lite's default) scores the same maps sieved, and unsieved beside them: nothing
    # is trained or refined again
    capsys.readouterr()
    assert main(args + ["--set", "sieve=4"]) == 0
    assert "[stage] train" not in capsys.readouterr().out
    _, sieved = json.loads((run / "report.json").read_text())["results"]
    assert sieved["settings"]["sieve"] == 4 and entry["settings"]["sieve"] == 0  # tiny's default
    assert sieved["unsieved"]["miou"] == entry["refined"]["miou"]
    assert sieved["controls"]["deterministic_unsieved"]["miou"] == entry["controls"]["deterministic"]["miou"]
    assert sieved["refined"]["components"] < entry["refined"]["components"]
    assert "iou_rtm" in sieved["control_repair"] and "unsieved" in (run / "report.md").read_text()
    # a training change retrains the shared refiner in place, and its maps are refined again, not reused
    assert main(args + ["--set", "overpaint=1", "--no-controls"]) == 0
    out = capsys.readouterr().out
    assert "[stage] train refiner diffusion_pooled" in out
    assert "[stage] refine test with diffusion_track_unet_pretrained" in out
    test = SegmentationDataset(synthetic, "test").stems
    (fixture / f"{test[0]}.png").unlink()
    capsys.readouterr()
    assert main(args[:-1] + [str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no coarse map for 1 train/test stems" in err
    assert not (tmp_path / "bad").exists()
    assert main(args[:-1] + [str(tmp_path / "bad"), "--coarse-arch", "unet"]) == 2
    assert "drop --coarse-arch" in capsys.readouterr().err


def test_benchmark_verdict_names_targets_and_the_control():
    from idgbr.evaluation.benchmark_report import verdict_lines

    def scores(wfm3, miou):
        return {"wfm": {"3": wfm3}, "miou": miou}

    good = {"coarse_arch": "a", "coarse": scores(0.40, 0.30), "refined": scores(0.425, 0.298),
            "repair": {"iou_rtm": 0.975}, "controls": {"deterministic": scores(0.41, 0.30)}}
    bad = {"coarse_arch": "b", "coarse": scores(0.40, 0.30), "refined": scores(0.425, 0.298),
           "repair": {"iou_rtm": 0.96}, "controls": {"deterministic": scores(0.43, 0.30)}}
    lines = verdict_lines({"results": [good, bad]})
    assert "+2.50" in lines[2] and "targets met" in lines[2] and "beats the deterministic" in lines[2]
    assert "targets NOT met" in lines[3] and "does NOT beat the deterministic control (WFm(3px) +3.00)" in lines[3]
    second = {"bf": {"3": {"f": 0.52, "precision": 0.60, "recall": 0.46}}, "components_ratio": 3.84}
    good["coarse"].update(bf={"3": {"f": 0.45, "precision": 0.59, "recall": 0.37}}, components_ratio=0.8)
    good["refined"].update(second)
    line = verdict_lines({"results": [good]})[2]
    assert "Boundary F(3px) +7.00 (precision +1.00)" in line and "ground-truth one 0.8 -> 3.8" in line


def test_benchmark_pools_real_errors_into_one_shared_refiner(synthetic, tmp_path, capsys):
    """--refiner-coarse-maps: the shared refiner and its control train once on the pooled train maps of the given
    tracks (coarse_corruption < 1) and refine every coarse model's maps; the training stage records the sources."""
    import shutil

    assert main(["predict-coarse", "--folds", "2", "--arch", "unet", "--data", str(synthetic), "--name", "pool",
                 "--work", str(tmp_path / "w"), "--iters", "1", "--crop", "32", "--train-batch", "2", "--tile", "64",
                 "--overlap", "8", "--with-test", "--no-progress"]) == 0
    first, second = tmp_path / "tracks" / "a", tmp_path / "tracks" / "b"
    shutil.copytree(synthetic / "coarse" / "pool", first)
    shutil.copytree(first, second)
    run = tmp_path / "bench_pool"
    args = ["benchmark", str(synthetic), "--preset", "tiny", "--steps", "1", "--sample-steps", "1", "--gate", "-1",
            "--coarse-maps", str(first), "--coarse-maps", str(second), "--refiner-coarse-maps", str(first),
            "--refiner-coarse-maps", str(second), "--set", "coarse_corruption=0.5", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (run / "refiners").iterdir()) == ["deterministic_pooled", "diffusion_pooled"]
    assert out.count("[stage] train refiner diffusion_pooled") == 1 and "[reuse] train refiner diffusion_pooled" in out
    params = json.loads((run / "refiners" / "diffusion_pooled" / "stage.json").read_text())["params"]
    assert params["coarse"] == ["track_a", "track_b"] and params["config"]["coarse_corruption"] == 0.5
    trained = json.loads((run / "refiners" / "diffusion_pooled" / "train_config.json").read_text())
    assert trained["coarse"] == ["track_a", "track_b"]
    report = json.loads((run / "report.json").read_text())
    assert [e["refiner_coarse_maps"] for e in report["results"]] == [[str(first), str(second)]] * 2


def test_pooled_coarse_sources_give_each_image_once_per_source(synthetic, tmp_path):
    import shutil

    from idgbr.training.batches import coarse_sources, load_training_samples

    (synthetic / "coarse").mkdir(exist_ok=True)
    names = []
    for value, name in ((0, "zeros"), (1, "ones")):
        folder = synthetic / "coarse" / name
        if not folder.exists():
            shutil.copytree(synthetic / "masks", folder)
            for path in folder.glob("*.png"):
                from idgbr.data.io import read_label, write_label

                label, _ = read_label(path)
                write_label(path, np.full_like(label, value))
        names.append(name)
    assert coarse_sources("zeros, ones") == coarse_sources(["zeros", "ones"]) == ["zeros", "ones"]
    assert coarse_sources(None) == []
    one, _ = load_training_samples(synthetic, "zeros")
    both, _ = load_training_samples(synthetic, ["zeros", "ones"])
    assert len(both) == 2 * len(one)
    assert all((s["coarse"] == 0).all() for s in both[:len(one)]) and all((s["coarse"] == 1).all() for s in both[len(one):])
    assert all(a["image"] is b["image"] and a["mask"] is b["mask"] for a, b in zip(both, both[len(one):]))


def test_benchmark_learns_real_errors_out_of_fold_by_default(synthetic, tmp_path, capsys):
    """A refiner that learns from real errors (coarse_corruption < 1) gets them out of fold by default: every coarse
    model's K-fold train maps are made first and pooled into one shared refiner (and one control)."""
    from idgbr.evaluation.benchmark import AUTO_FOLDS

    run = tmp_path / "bench_auto"
    args = ["benchmark", str(synthetic), "--coarse-arch", "unet", "--coarse-arch", "deeplabv3plus", "--preset", "tiny",
            "--coarse-iters", "1", "--coarse-crop", "32", "--coarse-batch", "2", "--steps", "1", "--sample-steps", "1",
            "--gate", "-1", "--set", "coarse_corruption=0.5", "--out", str(run)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (run / "refiners").iterdir()) == ["deterministic_pooled", "diffusion_pooled"]
    pool = [f"bench_unet_oof{AUTO_FOLDS}", f"bench_deeplabv3plus_oof{AUTO_FOLDS}"]
    assert json.loads((run / "refiners" / "diffusion_pooled" / "stage.json").read_text())["params"]["coarse"] == pool
    assert out.index("[stage] predict coarse deeplabv3plus train out-of-fold") < out.index("[stage] train refiner")
    report = json.loads((run / "report.json").read_text())
    assert [e["coarse_folds"] for e in report["results"]] == [AUTO_FOLDS] * 2
    assert all(e["refiner_pool"] == pool for e in report["results"])
    assert "One refiner trains on the train-split maps of `bench_unet_oof3`" in (run / "report.md").read_text()
