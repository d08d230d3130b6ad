"""Which device a model runs on: ``--device auto|cpu|cuda[:N]`` everywhere a model runs.

``auto`` (the default) is the first CUDA GPU when torch sees one, else the CPU. Asking for CUDA on a host without
it is a one-line :class:`IdgbrError`, raised before anything is read or written.

    >>> resolve_device("auto")                      # cuda:0 on a GPU host, cpu elsewhere
    >>> autocast_dtype(resolve_device("cuda"))      # torch.bfloat16: the network runs under bf16 autocast on CUDA
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import IdgbrError

if TYPE_CHECKING:  # torch is imported where a device is resolved, so that `idgbr --help` stays light
    import torch

DEVICE_HELP = "auto (default: the first CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N"


def resolve_device(spec: "str | torch.device | None" = "auto") -> "torch.device":
    """``None``/``"auto"`` -> ``cuda:0`` when CUDA is available, else ``cpu``; ``"cpu"``; ``"cuda"``/``"cuda:N"``
    (checked against the GPUs torch sees)."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise IdgbrError(f"--device {spec!r}: unknown device; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise IdgbrError(f"--device {spec}: this host has no CUDA GPU that torch can use; use --device cpu (or auto)")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise IdgbrError(f"--device {spec}: this host has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}); pick one of them")
    return torch.device(f"cuda:{index}")


def autocast_dtype(device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype a refiner uses by default on ``device``: bfloat16 on CUDA, none (fp32) on the CPU."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else None


def add_device_argument(parser) -> None:
    """The shared ``--device`` option of the commands that run a model."""
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=f"where models run: {DEVICE_HELP}")
