"""Training loop: steps, checkpoints, resume (also after kill -9), objectives, CLI errors. Tiny preset only."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idgbr.commands.main import main
from idgbr.nn.config import RefinerConfig

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # the test machines are shared; oversubscribed threads only slow things down

from idgbr.nn.run_folder import latest_checkpoint, list_checkpoints  # noqa: E402
from idgbr.training.loop import train_refiner

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int = 4, size: tuple[int, int] = (40, 48), classes: int = 3, seed: int = 0) -> Path:
    """A canonical dataset: images/, masks/ (with a few ignore pixels), classes.json, splits/, coarse/c1/."""
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks", "splits", "coarse/c1"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    stems = [f"s{i}" for i in range(n)]
    for stem in stems:
        h, w = size
        mask = np.zeros((h, w), np.uint8)
        for cls in range(1, classes):
            y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
            mask[y:y + rng.integers(8, 20), x:x + rng.integers(8, 20)] = cls
        coarse = np.roll(mask, 2, axis=1)
        mask[0, :3] = 255
        palette = rng.integers(0, 255, (classes, 3))
        image = (palette[np.minimum(mask, classes - 1)] + rng.normal(0, 10, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray(coarse).save(root / "coarse" / "c1" / f"{stem}.png")
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": f"c{i}", "value": i} for i in range(classes)],
                                                   "ignore": [255]}))
    (root / "splits" / "train.txt").write_text("\n".join(stems[:-1]) + "\n")
    (root / "splits" / "test.txt").write_text(stems[-1] + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def embed(tmp_path_factory) -> Path:
    """A label embedding shared by the tests (skips retraining it in every run)."""
    from idgbr.nn.labelembed import train_label_embedding

    path = tmp_path_factory.mktemp("embed") / "label_embed"
    train_label_embedding(3, 30, 0.15, hidden=16, progress=False).save_pretrained(path)
    return path


def tiny(**overrides) -> RefinerConfig:
    return RefinerConfig.preset_config("tiny", **overrides)


def logged_losses(run: Path) -> list[float]:
    return [float(x) for x in re.findall(r"\(loss ([-\w.]+)\)", (run / "train.log").read_text())]


def test_train_checkpoint_resume(data: Path, embed: Path, tmp_path: Path) -> None:
    """Checkpoints appear; 2 steps + resume to 4 equals 4 straight steps (model, optimiser and RNG come back);
    a checkpoint interrupted while being written (temporary folder, or files missing) is never resumed from."""
    from safetensors.torch import load_file

    from idgbr.errors import IdgbrError

    config = tiny(steps=4, checkpoint_every=2, label_embed=str(embed))
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_refiner(config, data, "c1", straight, progress=False)
    assert [s for s, _ in list_checkpoints(straight)] == [2, 4]
    assert (straight / "config.json").exists() and (straight / "model.safetensors").exists()
    assert any((straight / "logs").rglob("events.out.tfevents*"))
    losses = logged_losses(straight)
    assert len(losses) == 2 and all(np.isfinite(losses))
    saved = json.loads((straight / "train_config.json").read_text())
    assert saved["num_classes"] == 3 and saved["image_channels"] == 3 and saved["coarse"] == "c1"

    train_refiner(config.replace(steps=2), data, "c1", resumed, progress=False)
    with pytest.raises(IdgbrError, match="--resume"):
        train_refiner(config, data, "c1", resumed, progress=False)
    partial = resumed / "checkpoints" / ".step-000004.partial"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    incomplete = resumed / "checkpoints" / "step-000006"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{")
    assert latest_checkpoint(resumed).name == "step-000002"
    train_refiner(config, data, "c1", resumed, resume=True, progress=False)
    log = (resumed / "train.log").read_text()
    assert "resumed from step 2" in log and "finished 4 steps" in log
    assert [s for s, _ in list_checkpoints(resumed)] == [2, 4]
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_final_model_is_the_average_and_resumes(data: Path, embed: Path, tmp_path: Path) -> None:
    """With ema_decay the final model is the weight average (not the raw weights the checkpoint keeps, and equal to
    the checkpoint's ema.safetensors); 2 steps + resume to 4 gives the same average as 4 straight steps."""
    from safetensors.torch import load_file

    from idgbr.errors import IdgbrError

    config = tiny(steps=4, checkpoint_every=2, label_embed=str(embed), ema_decay=0.99)
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train_refiner(config, data, "c1", straight, progress=False)
    final = load_file(straight / "model.safetensors")
    raw = load_file(straight / "checkpoints" / "step-000004" / "model.safetensors")
    ema = load_file(straight / "checkpoints" / "step-000004" / "ema.safetensors")
    assert ema and all(torch.equal(final[k], ema[k]) for k in ema)  # the final model is the average ...
    assert any(not torch.equal(final[k], raw[k]) for k in ema)  # ... which differs from the raw weights
    assert "exponential moving average" in (straight / "train.log").read_text()

    train_refiner(config.replace(steps=2), data, "c1", resumed, progress=False)
    train_refiner(config, data, "c1", resumed, resume=True, progress=False)
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)

    plain = tmp_path / "plain"
    train_refiner(config.replace(steps=2, ema_decay=0.0), data, "c1", plain, progress=False)
    with pytest.raises(IdgbrError, match="ema.safetensors.*ema_decay=0"):  # a checkpoint without the average
        train_refiner(config, data, "c1", plain, resume=True, progress=False)
    with pytest.raises(IdgbrError, match="ema_decay"):
        tiny(ema_decay=1.0)


@pytest.mark.parametrize("overrides", [
    dict(prediction_type="epsilon", cubic_timesteps=False),
    dict(prediction_type="v_prediction", ce_weight=0.1),
    dict(prediction_type="sample", ce_weight=0.1, use_coarse=False),
    dict(objective="deterministic"),
])
def test_objectives(overrides: dict) -> None:
    """Every objective gives a finite loss whose gradient reaches the denoiser and the guidance modules."""
    from idgbr.nn.model import IDGBRModel
    from idgbr.training.objective import RefinerObjective

    config = tiny(num_classes=3, cond_dropout=0.0, **overrides)
    torch.manual_seed(0)
    model = IDGBRModel(config)
    with torch.no_grad():  # the CG fusion starts at zero, which blocks the gradient to the guidance encoder
        for module in model.guidance.cg:
            module.fuse.weight.normal_(0, 0.1)
    objective = RefinerObjective(model, config)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    mask = torch.randint(0, 3, (2, 32, 32), generator=gen)
    mask[:, 0] = 255
    coarse = torch.randint(0, 3, (2, 32, 32), generator=gen)
    losses = objective(image, mask, coarse, gen)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    assert (losses["ce"] > 0) == (config.ce_weight > 0)
    losses["loss"].backward()

    def reached(params) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    assert reached(model.unet.parameters())
    for level, module in enumerate(model.guidance.cg):  # every CG module: its fusion and its attention branch
        assert reached([module.fuse.weight]) and reached([module.proj.weight]), level
    encoder = model.guidance.encoder  # trainable in tiny: the image branch always, the coarse branch with use_coarse
    assert reached(encoder.conv_in_image.parameters()) and reached(encoder.down_blocks.parameters())
    assert reached(encoder.conv_in.parameters()) == config.use_coarse
    assert reached([model.context])
    assert all(p.grad is None for p in model.label_embed.parameters())


def test_lr_schedule() -> None:
    from idgbr.training.loop import lr_lambda

    factor = lr_lambda(tiny(steps=10, lr_warmup=2, lr_schedule="cosine"))
    assert factor(0) == pytest.approx(0.5) and factor(1) == pytest.approx(1.0)
    assert factor(2) == pytest.approx(1.0) and factor(10) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda(tiny())(7) == 1.0


def test_repa_with_tiny_dinov2(data: Path, embed: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    teacher = tmp_path / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
        patch_size=14)).save_pretrained(teacher)
    from safetensors.torch import load_file

    config = tiny(steps=3, checkpoint_every=3, repa_steps=2, dinov2=str(teacher), label_embed=str(embed))
    run = tmp_path / "run"
    train_refiner(config, data, None, run, progress=False)
    log = (run / "train.log").read_text()
    assert "REPA on" in log and "teacher freed" in log and "synthetic degradation" in log
    from idgbr.inference.pipeline import Refiner

    Refiner.from_pretrained(run)  # the projector is not saved and not needed
    assert not any(k.startswith("projector.") for k in load_file(run / "model.safetensors"))
    # REPA changes the trained weights: the same run without the teacher ends elsewhere (the CG output starts at
    # zero, so the REPA gradient only flows from the second step on)
    train_refiner(config.replace(dinov2=None), data, None, tmp_path / "plain", progress=False)
    with_repa, without = load_file(run / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert with_repa.keys() == without.keys() and any(not torch.equal(with_repa[k], without[k]) for k in with_repa)


def test_repa_loss_in_the_objective() -> None:
    """With teacher tokens the objective adds repa_weight x the negative cosine of the projected deepest down-skip
    CG output; that term's gradient reaches the projector, that CG module and the UNet's encoder half, and not its
    decoder half; without teacher tokens the term is 0."""
    from idgbr.nn.model import IDGBRModel
    from idgbr.nn.repa import repa_loss
    from idgbr.training.objective import RefinerObjective

    config = tiny(num_classes=3, cond_dropout=0.0, repa_weight=0.5)
    torch.manual_seed(0)
    model = IDGBRModel(config)
    with torch.no_grad():
        for module in model.guidance.cg:
            module.fuse.weight.normal_(0, 0.1)
    model.build_projector(16)
    objective = RefinerObjective(model, config)
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8, generator=gen)
    mask = torch.randint(0, 3, (2, 32, 32), generator=gen)
    coarse = torch.randint(0, 3, (2, 32, 32), generator=gen)
    teacher = torch.randn(2, 4, 16, generator=gen)
    state = gen.get_state()
    losses = objective(image, mask, coarse, gen, teacher=teacher)
    assert -1 <= losses["repa"] <= 1 and losses["repa"] != 0
    torch.testing.assert_close(losses["loss"], losses["main"] + 0.5 * losses["repa"])
    gen.set_state(state)
    assert objective(image, mask, coarse, gen)["repa"] == 0
    # the same value from repa_loss on the student tokens the model returns
    with torch.no_grad():
        cond = model.condition(model.encode_image(model.normalize_image(image)), model.encode_labels(coarse))
        _, aux = model(torch.zeros(2, 48, 8, 8), torch.tensor([5, 5]), cond, return_aux=True)
        assert aux["repa"].abs().sum() > 0
        assert -1 <= repa_loss(aux["repa"], teacher, model.projector) <= 1

    losses["repa"].backward()
    deepest = len(model.guidance.cg) - 2  # the last down skip (the mid block comes after it)

    def reached(module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert reached(model.projector) and reached(model.guidance.cg[deepest]) and reached(model.unet.down_blocks)
    assert not reached(model.unet.up_blocks) and not reached(model.guidance.cg[-1])


def test_cli_train_errors_are_one_line(data: Path, tmp_path: Path, capsys) -> None:
    start = time.monotonic()
    code = main(["train", "--preset", "sd15", "--pretrained", "/nonexistent/sd15", "--data", str(data), "--out",
                 str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and time.monotonic() - start < 10
    assert "/nonexistent/sd15" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "r"), "--set", "lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lrr" in err and "valid keys" in err and len(err.splitlines()) == 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "idgbr", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


@pytest.mark.slow
def test_kill_9_then_resume(data: Path, tmp_path: Path) -> None:
    """kill -9 `idgbr train` at a random moment, then --resume reaches the requested step count (issue 7 §2)."""
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(data), "--coarse", "c1", "--out", str(run), "--steps", "40",
            "--set", "checkpoint_every=3", "--no-progress"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(random.uniform(0, 3))
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(_cli(*args, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = (run / "train.log").read_text()
    assert re.search(r"resumed from step \d+|no complete checkpoint", log)
    assert latest_checkpoint(run).name == "step-000040" and "finished 40 steps" in log


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # accelerate 1.15 starts ONE process for `--cpu --num_processes 2` (multi-CPU needs mpirun); `--multi_gpu` spawns
    # the processes with torchrun and the trainer's Accelerator(cpu=True) joins them over gloo on a CPU-only host.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "idgbr", "train", "--preset", "tiny",
           "--data", str(data), "--coarse", "c1", "--out", str(run), "--steps", "4", "--no-progress"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "train_config.json").read_text())["num_processes"] == 2
    assert {p.name for p in latest_checkpoint(run).glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    from idgbr.inference.pipeline import Refiner

    Refiner.from_pretrained(run)


def test_boundary_crops_contain_a_boundary() -> None:
    """boundary_crops=1: every crop holds a class boundary; 0: most crops of a mostly-empty scene hold none."""
    from idgbr.training.batches import CropSampler

    mask = np.zeros((300, 300), np.uint8)
    mask[140:160, 140:160] = 1
    samples = [{"image": np.zeros((300, 300, 3), np.uint8), "mask": mask}]
    with_boundary = {}
    for share in (0.0, 1.0):
        sampler = CropSampler(samples, tiny(num_classes=2, crop_size=32, batch_size=16, boundary_crops=share))
        batch = sampler(np.random.default_rng(0))
        assert batch["image"].shape == (16, 3, 32, 32) and batch["mask"].shape == batch["coarse"].shape == (16, 32, 32)
        with_boundary[share] = sum(len(torch.unique(m[m != 255])) > 1 for m in batch["mask"])
    assert with_boundary[1.0] == 16 and with_boundary[0.0] < 16


def _synthetic_wrong_share(samples: list[dict], **config: object) -> float:
    """Share of wrong coarse pixels in one batch of fully synthetic coarse maps (5 classes, 64² crops, seed 0)."""
    from idgbr.training.batches import CropSampler

    batch = CropSampler(samples, tiny(num_classes=5, crop_size=64, coarse_corruption=1.0, **config))(
        np.random.default_rng(0))
    return (batch["coarse"] != batch["mask"]).float().mean().item()


def _scene_samples() -> list[dict]:
    from idgbr.data.synthetic import make_scene

    return [{"image": s["image"], "mask": s["mask"]} for s in (make_scene(96, seed) for seed in range(3))]


def test_region_errors_change_the_synthetic_coarse_maps() -> None:
    """region_errors=1: synthetic coarse maps differ more from the mask than boundary-scale degradation alone."""
    from idgbr.errors import IdgbrError

    samples = _scene_samples()
    wrong = {share: _synthetic_wrong_share(samples, batch_size=16, region_errors=share) for share in (0.0, 1.0)}
    assert wrong[1.0] > wrong[0.0] > 0
    with pytest.raises(IdgbrError, match="region_errors"):
        tiny(region_errors=1.5)


def test_overpaint_grows_the_small_classes_of_the_synthetic_coarse_maps() -> None:
    """overpaint=1: every synthetic coarse map also over-paints its smaller classes, so the classes other than each
    crop's largest cover more of the batch than with overpaint=0 (where degrade_mask alone leaves them smaller)."""
    from idgbr.errors import IdgbrError
    from idgbr.training.batches import CropSampler

    samples = _scene_samples()
    small_area = {}
    for share in (0.0, 1.0):
        batch = CropSampler(samples, tiny(num_classes=5, crop_size=64, batch_size=16, coarse_corruption=1.0,
                                          overpaint=share))(np.random.default_rng(0))
        area = 0
        for mask, coarse in zip(batch["mask"], batch["coarse"]):
            largest = torch.bincount(mask[mask != 255]).argmax()
            area += ((coarse != largest) & (mask != 255)).sum().item() - ((mask != largest) & (mask != 255)).sum().item()
        small_area[share] = area
    assert small_area[1.0] > small_area[0.0] + 500
    with pytest.raises(IdgbrError, match="overpaint"):
        tiny(overpaint=-0.1)


def test_corruption_min_strength_mixes_in_milder_synthetic_coarse_maps() -> None:
    """corruption_min_strength < 1 draws degrade_mask strengths below 1: fewer wrong coarse pixels on average; at 1
    the batch is the one drawn before the field existed (no extra random draw)."""
    from idgbr.errors import IdgbrError
    from idgbr.data.synthetic import degrade_mask
    from idgbr.training.batches import CropSampler

    samples = _scene_samples()
    wrong = {low: _synthetic_wrong_share(samples, batch_size=32, corruption_min_strength=low) for low in (0.0, 1.0)}
    assert wrong[1.0] > wrong[0.0] > 0
    # strength 1 by default: the first crop's coarse map is degrade_mask at full strength with the same draws
    config = tiny(num_classes=5, crop_size=64, batch_size=1, coarse_corruption=1.0)
    rng = np.random.default_rng(3)
    sampler = CropSampler(samples, config)
    first = sampler(np.random.default_rng(3))
    crop = sampler.transform(sampler.samples[int(rng.integers(len(sampler.samples)))], rng)
    assert np.array_equal(first["coarse"][0].numpy(), degrade_mask(crop["mask"], rng, 5))
    with pytest.raises(IdgbrError, match="corruption_min_strength"):
        tiny(corruption_min_strength=1.5)


def test_augmentation_fields_reach_the_crop_sampler() -> None:
    """augment_scale_range=[1, 1] crops without resampling (every crop is a window of a source mask);
    augment_dihedral adds the rotation; a reversed range is refused in one line."""
    from idgbr.errors import IdgbrError
    from idgbr.training.batches import CropSampler

    samples = _scene_samples()
    config = tiny(num_classes=5, crop_size=32, batch_size=8, augment_scale_range=[1.0, 1.0], augment_dihedral=True)
    sampler = CropSampler(samples, config)
    assert [type(t).__name__ for t in sampler.transform.transforms][2] == "RandomRotate90"
    assert sampler.transform.transforms[0].ratio_range == (1.0, 1.0)
    batch = sampler(np.random.default_rng(0))

    def is_window(crop: np.ndarray) -> bool:  # some orientation of it is a 32x32 slice of some source mask
        for source in (s["mask"] for s in samples):
            for k in range(4):
                for flip in (False, True):
                    view = np.rot90(crop[:, ::-1] if flip else crop, -k)
                    for y in range(source.shape[0] - 31):
                        for x in range(source.shape[1] - 31):
                            if np.array_equal(source[y:y + 32, x:x + 32], view):
                                return True
        return False

    assert all(is_window(m.numpy()) for m in batch["mask"])
    resized = CropSampler(samples, tiny(num_classes=5, crop_size=32, batch_size=8, augment_scale_range=[1.5, 2.0]))
    assert not all(is_window(m.numpy()) for m in resized(np.random.default_rng(0))["mask"])
    with pytest.raises(IdgbrError, match="augment_scale_range"):
        tiny(augment_scale_range=[2.0, 1.0])


def test_time_budget_stops_then_resume(data: Path, embed: Path, tmp_path: Path) -> None:
    """A tiny train_minutes stops after the first step with a checkpoint and the final model; resume finishes."""
    run = tmp_path / "run"
    train_refiner(tiny(steps=50, checkpoint_every=100, train_minutes=1e-9, label_embed=str(embed)), data, "c1", run,
                  progress=False)
    log = (run / "train.log").read_text()
    assert "stopped by the time limit" in log and "at step 1 of 50" in log
    assert [s for s, _ in list_checkpoints(run)] == [1] and (run / "model.safetensors").exists()
    train_refiner(tiny(steps=3, checkpoint_every=100, label_embed=str(embed)), data, "c1", run, resume=True,
                  progress=False)
    log = (run / "train.log").read_text()
    assert "resumed from step 1" in log and "finished 3 steps" in log
    assert [s for s, _ in list_checkpoints(run)] == [1, 3]


def test_cli_train_minutes_flag() -> None:
    from idgbr.commands.train import build_config, register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--train-minutes", "2.5"])
    assert build_config(args).train_minutes == 2.5
    assert RefinerConfig.preset_config("lite").checkpoint_every == 1000


def test_cli_lite_preset_picks_the_image_branch_by_bands(tmp_path: Path) -> None:
    """lite reads RGB with the ImageNet encoder (last 2 blocks fine-tuned); other imagery keeps the copied encoder,
    since the pretrained one reads RGB only. An explicit choice is not overridden: it fails on such imagery."""
    from idgbr.commands.train import build_config, register
    from idgbr.errors import IdgbrError
    import argparse

    rgb = make_dataset(tmp_path / "rgb")
    grey = make_dataset(tmp_path / "grey")
    for path in (grey / "images").iterdir():
        Image.open(path).convert("L").save(path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def config(data: Path, *extra: str) -> RefinerConfig:
        return build_config(parser.parse_args(["train", "--data", str(data), "--out", "o", *extra]))

    lite = config(rgb)
    assert (lite.image_encoder, lite.image_encoder_trainable_stages) == ("tf_efficientnet_lite0", 2)
    for other in (config(grey), config(rgb, "--preset", "tiny")):
        assert (other.image_encoder, other.image_encoder_trainable_stages) == ("copy", 0)
    assert config(grey).image_channels == 1
    with pytest.raises(IdgbrError, match="reads RGB"):
        config(grey, "--set", "image_encoder=tf_efficientnet_lite0")


def test_labels_checked_once_at_load() -> None:
    from idgbr.errors import IdgbrError
    from idgbr.training.batches import check_sample_labels

    good = {"mask": np.array([[0, 2, 255]], np.uint8), "coarse": np.array([[1, 2, 0]], np.uint8)}
    check_sample_labels([good], 3)
    with pytest.raises(IdgbrError, match="coarse values"):
        check_sample_labels([good, {**good, "coarse": np.array([[3, 0, 0]], np.uint8)}], 3)


def test_foreach_optimizer_equals_the_loop_on_cpu() -> None:
    """optimizer_impl auto (foreach on CPU) takes the same steps as the per-parameter loop, bit for bit."""
    from idgbr.training.loop import make_optimizer

    results = []
    for impl in ("loop", "auto"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((3, 4), (5,), (2, 2, 3))]
        optimizer = make_optimizer(tiny(optimizer_impl=impl, lr=1e-2), params, "cpu")
        assert optimizer.defaults["foreach"] is (impl == "auto")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            optimizer.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_training_loss_goes_down(data: Path, embed: Path, tmp_path: Path) -> None:
    """The training path (sampler, foreach AdamW, syncs every log_every) learns: finite losses that fall."""
    run = tmp_path / "run"
    train_refiner(tiny(steps=40, checkpoint_every=10, lr=2e-3, label_embed=str(embed)), data, "c1", run,
                  progress=False, log_every=5)
    losses = logged_losses(run)
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_prefetch_gives_the_same_batches_and_exact_resume(data: Path, embed: Path, tmp_path: Path) -> None:
    """prefetch draws the same batches in a background thread; a checkpoint stores the generator state of the
    last consumed batch, so 2 steps + resume to 4 (prefetching) equals 4 steps in series."""
    from safetensors.torch import load_file

    config = tiny(steps=4, checkpoint_every=2, label_embed=str(embed))
    train_refiner(config.replace(prefetch=0), data, None, tmp_path / "series", progress=False)
    train_refiner(config.replace(steps=2, prefetch=3), data, None, tmp_path / "ahead", progress=False)
    train_refiner(config.replace(prefetch=3), data, None, tmp_path / "ahead", resume=True, progress=False)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("series", "ahead"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_throughput_switches_train(data: Path, embed: Path, tmp_path: Path) -> None:
    """channels_last and fused AdamW run through the loop and save a loadable model."""
    from idgbr.nn.model import IDGBRModel

    from safetensors.torch import load_file

    config = tiny(steps=2, label_embed=str(embed))
    train_refiner(config.replace(channels_last=True, optimizer_impl="fused"), data, "c1", tmp_path / "fast",
                  progress=False)
    train_refiner(config.replace(steps=0), data, "c1", tmp_path / "start", progress=False)
    train_refiner(config, data, "c1", tmp_path / "plain", progress=False)
    assert IDGBRModel.from_pretrained(tmp_path / "fast").config.channels_last
    fast, start, plain = (load_file(tmp_path / run / "model.safetensors") for run in ("fast", "start", "plain"))
    # the switches trained: the weights moved from the initial ones, to where the plain loop takes them (fused AdamW
    # rounds differently from foreach, so close rather than equal), and the logged loss is the plain run's
    moved = [k for k in plain if not torch.equal(plain[k], start[k])]
    assert moved and all(not torch.equal(fast[k], start[k]) for k in moved)
    assert all(torch.allclose(fast[k], plain[k], atol=1e-5, rtol=1e-4) for k in plain)
    assert logged_losses(tmp_path / "fast") == pytest.approx(logged_losses(tmp_path / "plain"), rel=1e-4)


def _worker_batches(samples, workers: int, seed: int = 0, start: int = 0, stop: int = 6) -> list[dict]:
    from idgbr.training.batches import CropSampler, WorkerBatches

    loader = WorkerBatches(CropSampler(samples, tiny(seed=seed, num_classes=3)), seed, 0, start, stop, workers)
    try:
        return [loader() for _ in range(stop - start)]
    finally:
        loader.close()


def test_loader_workers_are_deterministic(data: Path) -> None:
    """Batches drawn in DataLoader workers: a seed and a worker count give the same sequence (each step's batch
    comes from its own generator, so even another worker count gives it); another seed gives other batches; a
    resume at step s draws the uninterrupted sequence's batches from s on."""
    from idgbr.training.batches import load_training_samples

    samples, _ = load_training_samples(data, "c1")
    first, again, one = _worker_batches(samples, 2), _worker_batches(samples, 2), _worker_batches(samples, 1)
    resumed = _worker_batches(samples, 2, start=3)
    other = _worker_batches(samples, 2, seed=1)
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert all(same(a, b) for a, b in zip(first, again))
    assert all(same(a, b) for a, b in zip(first, one))
    assert all(same(a, b) for a, b in zip(first[3:], resumed))
    assert not any(same(a, b) for a, b in zip(first, other))
    assert not same(first[0], first[1])  # steps differ


def test_loader_workers_train_deterministically_and_resume_exactly(data: Path, embed: Path, tmp_path: Path) -> None:
    """loader_workers=2: two runs give the same weights, another seed others; 2 steps + resume to 4 equals 4
    straight steps."""
    from safetensors.torch import load_file

    config = tiny(steps=4, checkpoint_every=2, label_embed=str(embed), loader_workers=2)
    train_refiner(config, data, "c1", tmp_path / "a", progress=False)
    train_refiner(config, data, "c1", tmp_path / "b", progress=False)
    train_refiner(config.replace(seed=1), data, "c1", tmp_path / "seed1", progress=False)
    train_refiner(config.replace(steps=2), data, "c1", tmp_path / "resumed", progress=False)
    train_refiner(config, data, "c1", tmp_path / "resumed", resume=True, progress=False)
    a, b, other, resumed = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b", "seed1", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], resumed[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)
    assert "loader worker processes" in (tmp_path / "a" / "train.log").read_text()
