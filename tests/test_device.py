"""--device auto|cpu|cuda[:N] everywhere a model runs (idgbr.nn.device), checked on a CPU-only host with CUDA faked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idgbr.commands.main import main
from idgbr.nn.config import RefinerConfig
from idgbr.nn.device import autocast_dtype, resolve_device
from idgbr.errors import IdgbrError
from idgbr.data.io import write_image, write_label
from idgbr.nn.model import IDGBRModel
from idgbr.inference.pipeline import Refiner

COMMANDS = ("refine", "demo", "benchmark", "bench-speed", "train-coarse", "predict-coarse")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


def test_auto_is_the_first_gpu_with_cuda(two_gpus):
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(IdgbrError, match="2 CUDA GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line(no_cuda, spec):
    with pytest.raises(IdgbrError, match="no CUDA GPU") as info:
        resolve_device(spec)
    assert "\n" not in str(info.value) and "--device cpu" in str(info.value)


def test_unknown_device_is_refused():
    with pytest.raises(IdgbrError, match="unknown device"):
        resolve_device("gpu0")


def test_bf16_autocast_on_cuda_only():
    assert autocast_dtype(torch.device("cuda:0")) is torch.bfloat16
    assert autocast_dtype(torch.device("cpu")) is None
    refiner = Refiner(IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=3)), device="cpu")
    assert refiner.device.type == "cpu" and refiner.autocast_dtype is None


@pytest.mark.parametrize("command", COMMANDS)
def test_every_model_command_has_device(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--device DEVICE" in capsys.readouterr().out


def _tiny_inputs(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    write_image(tmp_path / "tile.png", image)
    write_label(tmp_path / "coarse.png", np.zeros((32, 32), np.uint8))
    model = tmp_path / "model"
    IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=3)).save_pretrained(model)
    return model


def test_refine_on_cuda_without_cuda_writes_nothing(no_cuda, tmp_path, capsys):
    model = _tiny_inputs(tmp_path)
    out = tmp_path / "refined.png"
    code = main(["refine", "--model", str(model), "--image", str(tmp_path / "tile.png"), "--coarse",
                 str(tmp_path / "coarse.png"), "--out", str(out), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_refine_passes_the_device_to_the_refiner(no_cuda, tmp_path, monkeypatch):
    model = _tiny_inputs(tmp_path)
    seen = []
    load = Refiner.from_pretrained.__func__

    def spy(cls, path, device="auto", **options):
        seen.append(device)
        return load(cls, path, device=device, **options)

    monkeypatch.setattr(Refiner, "from_pretrained", classmethod(spy))
    out = tmp_path / "refined.png"
    assert main(["refine", "--model", str(model), "--image", str(tmp_path / "tile.png"), "--coarse",
                 str(tmp_path / "coarse.png"), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert seen == ["cpu"] and out.exists()
