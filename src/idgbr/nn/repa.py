"""REPA: align the deepest guidance features with DINOv2 patch tokens (paper §III-C; reference §4).

* Teacher: a ``transformers.Dinov2Model`` loaded from a local Hugging Face folder, or from the official
  ``dinov2_vit*14_pretrain.pth`` (keys mapped here; the authors used ViT-g/14). Frozen, no grad.
* Teacher input: the image resized bicubically to ``floor14(0.875 side)`` (512 -> 448, a 32 x 32 grid).
* Student: the CG output at the deepest down skip (``aux["repa"]``), projected per token by a 3-layer MLP,
  bilinearly resized to the teacher grid.
* Or (``RefinerConfig.repa_target``) a packaged ImageNet encoder's deepest features (:class:`EncoderTeacher`).
* Loss: negative cosine; the teacher is normalised with eps 1e-6, student tokens with norm <= 1e-6 are masked out
  (the CG output starts at exactly zero). Weight 0.5 for the first 200 steps (``RefinerConfig.repa_*``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdgbrError, file_error

DINOV2_LAYOUT = ("a local Hugging Face Dinov2 folder (config.json + model.safetensors) or the official "
                 "dinov2_vit{s,b,l,g}14_pretrain.pth")
_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}  # ViT-S/B/L/g


def load_dinov2(path: str | Path) -> nn.Module:
    """A frozen ``Dinov2Model`` in eval mode from a local folder or an official ``.pth``."""
    from transformers import Dinov2Model

    path = Path(path).expanduser()
    if not path.exists():
        raise file_error(path, "DINOv2 weights not found", f"put {DINOV2_LAYOUT} there, or leave --dinov2 out (REPA off)")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise file_error(path, "no config.json in the DINOv2 folder", f"expected {DINOV2_LAYOUT}")
        model = Dinov2Model.from_pretrained(path, local_files_only=True)
    elif path.suffix in (".pth", ".pt"):
        model = _dinov2_from_official(path)
    else:
        raise file_error(path, "unrecognised DINOv2 file", f"expected {DINOV2_LAYOUT}")
    return model.requires_grad_(False).eval()


def _dinov2_from_official(path: Path) -> nn.Module:
    """Map an official DINOv2 state dict (facebookresearch/dinov2 key names) onto ``Dinov2Model``."""
    from transformers import Dinov2Config, Dinov2Model

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise file_error(path, f"cannot read the checkpoint ({type(exc).__name__})", f"expected {DINOV2_LAYOUT}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise file_error(path, "not an official DINOv2 backbone state dict", f"convert it or use {DINOV2_LAYOUT}")
    if any(k.startswith("register_tokens") for k in state) or any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
        raise file_error(path, "register-token or chunked DINOv2 checkpoints are not mapped", "use a Hugging Face folder")
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    swiglu = "blocks.0.mlp.w12.weight" in state
    if dim not in _HEADS:
        raise file_error(path, f"unknown DINOv2 width {dim}", "use a Hugging Face folder")
    mlp_ratio = 4 if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0] // dim
    config = Dinov2Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=_HEADS[dim], mlp_ratio=mlp_ratio,
        patch_size=patch, image_size=grid * patch, use_swiglu_ffn=swiglu, layerscale_value=1.0,
    )
    model = Dinov2Model(config)
    mapped = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    if "mask_token" in state:
        mapped["embeddings.mask_token"] = state["mask_token"].reshape(1, dim)
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj")):
                mapped[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
            query, key, value = state[f"{src}attn.qkv.{kind}"].chunk(3, 0)
            mapped[f"{dst}attention.q_proj.{kind}"] = query
            mapped[f"{dst}attention.k_proj.{kind}"] = key
            mapped[f"{dst}attention.v_proj.{kind}"] = value
            if swiglu:  # official fused SwiGLU: w12 -> (gate, up), w3 -> down
                gate, up = state[f"{src}mlp.w12.{kind}"].chunk(2, 0)
                mapped[f"{dst}mlp.gate_proj.{kind}"] = gate
                mapped[f"{dst}mlp.up_proj.{kind}"] = up
                mapped[f"{dst}mlp.down_proj.{kind}"] = state[f"{src}mlp.w3.{kind}"]
            else:
                mapped[f"{dst}mlp.fc1.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
                mapped[f"{dst}mlp.fc2.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
        mapped[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        mapped[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if k != "embeddings.mask_token"]
    if missing or result.unexpected_keys:
        raise file_error(path, f"could not map the checkpoint (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})",
                         "convert it to a Hugging Face folder")
    return model


class Projector(nn.Module):
    """3-layer MLP applied per token: Linear, SiLU, Linear, SiLU, Linear (xavier weights, zero biases; ref §4)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.net(tokens)


def teacher_size(side: int, patch: int = 14) -> int:
    """``floor_to_multiple(max(patch, int(0.875 side)))``: 512 -> 448 (reference §4)."""
    return max(patch, int(0.875 * side)) // patch * patch


@torch.no_grad()
def teacher_tokens(dinov2: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """DINOv2 patch tokens of an ImageNet-normalised (B, 3, H, W) image -> (B, N, D) on the resized grid.

    Skips the CLS token and any register tokens.
    """
    patch = dinov2.config.patch_size
    size = (teacher_size(image.shape[-2], patch), teacher_size(image.shape[-1], patch))
    dtype = next(dinov2.parameters()).dtype
    resized = F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False).to(dtype)
    hidden = dinov2(pixel_values=resized).last_hidden_state
    num_patches = (size[0] // patch) * (size[1] // patch)
    return hidden[:, -num_patches:].float()


def repa_loss(student: torch.Tensor, teacher: torch.Tensor, projector: nn.Module, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Negative cosine between projected student tokens and teacher tokens.

    Args:
        student: (B, C, h, w) CG output at the deepest down skip; teacher: (B, N, D) patch tokens on a square grid
            (or ``grid`` = (gh, gw)); projector: C -> D per token.
    Returns:
        scalar: mean over valid tokens of ``-cos``; 0 (with a graph) when every student token is ~0.
    """
    batch, channels, height, width = student.shape
    gh, gw = grid or (int(round(teacher.shape[1] ** 0.5)),) * 2
    if gh * gw != teacher.shape[1]:
        raise ValueError(f"teacher has {teacher.shape[1]} tokens, not a {gh}x{gw} grid")
    projected = projector(student.float().flatten(2).transpose(1, 2))  # (B, h w, D)
    projected = projected.transpose(1, 2).reshape(batch, -1, height, width)
    projected = F.interpolate(projected, size=(gh, gw), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    teacher = F.normalize(teacher.float(), dim=-1, eps=1e-6)
    norm = projected.norm(dim=-1)
    valid = norm > 1e-6
    cosine = (projected * teacher).sum(-1) / norm.clamp_min(1e-6)
    if not valid.any():
        return projected.sum() * 0.0
    return -(cosine[valid]).mean()


class EncoderTeacher(nn.Module):
    """A packaged ImageNet encoder (:mod:`idgbr.nn.encoders`) as the REPA teacher, the CPU stand-in for DINOv2: its
    deepest feature map (stride 32; for EfficientNet-Lite0 320 channels) as (B, N, D) tokens. Frozen, eval mode,
    never saved (like the DINOv2 teacher). The deepest stage rather than the stride the student sits at: like
    DINOv2's last layer it is the most semantic one, and it is not the input of the guidance, so the alignment
    is not the identity even when the image branch reads the same encoder."""

    def __init__(self, name: str):
        super().__init__()
        from .encoders import load_pretrained_encoder

        self.name = name
        self.model = load_pretrained_encoder(name, features_only=True)
        self.model.requires_grad_(False).eval()
        self.dim = self.model.feature_info.channels()[-1]

    def train(self, mode: bool = True) -> "EncoderTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, normalization: str) -> torch.Tensor:
        """Model-range RGB (B, 3, H, W) -> (B, (H/32)(W/32), D)."""
        from .image_branch import encoder_input

        return self.model(encoder_input(x[:, :3], normalization, self.name))[-1].float().flatten(2).transpose(1, 2)


def check_teacher_input(normalization: str) -> None:
    """DINOv2 expects ImageNet statistics; the caller must convert images in another range."""
    if normalization not in ("imagenet", "minus_one_one"):
        raise IdgbrError(f"unknown image normalisation {normalization!r}")


def to_imagenet(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """Model-range (B, C, H, W) image -> ImageNet-normalised first three bands for the teacher."""
    check_teacher_input(normalization)
    if normalization == "imagenet":
        return x[:, :3]
    rgb = (x[:, :3] + 1) / 2
    from .encoders import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (rgb - mean) / std
