"""``IDGBRModel``: label embedding, latent codec, denoiser UNet, guidance network and context, assembled from a
:class:`~idgbr.nn.config.RefinerConfig`; saved and loaded as ``config.json`` + ``architecture.json`` +
``model.safetensors`` (never a pickle). The contract used by ``train.py`` and ``pipeline.py`` is in
``docs/design.md``.

Data flow (paper §III; reference §1, §3):

    z_img = codec(normalize(image))                  # once per tile
    cond  = guidance.encode(z_img, E_S(coarse))      # frozen/trainable encoder at t = 1, once per tile
    emb, skips, mid = unet encoder(z_t, t)           # the denoiser's own features (run once per step)
    f_g   = CG_l(f_zt_l, cond_l) for every level     # ControlNet-style residuals, zeroed where drop
    pred  = unet decoder(emb, skips + f_g, mid + f_g_mid)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import unet_parts
from .codecs import SpaceToDepthCodec, VAECodec
from .config import RefinerConfig
from .encoders import IMAGENET_MEAN, IMAGENET_STD
from ..errors import IdgbrError, file_error
from .guidance import GuidanceFeatures, GuidanceNetwork
from .labelembed import LabelEmbedding, separated_table

WEIGHTS_NAME = "model.safetensors"
ARCHITECTURE_NAME = "architecture.json"

# SD-1.5's AutoencoderKL (used to rebuild an sd15 checkpoint when architecture.json is absent).
SD15_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512,
)

SD15_LAYOUT = (
    "expected a diffusers SD-1.5 folder with unet/ (config.json + diffusion_pytorch_model.safetensors), "
    "vae/ (same), text_encoder/ (config.json + model.safetensors) and tokenizer/, or a single-file "
    "checkpoint (.safetensors/.ckpt)"
)


def unet_config(config: RefinerConfig, latent_channels: int) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` kwargs for the preset (SD-1.5's architecture for sd15)."""
    return dict(
        sample_size=max(1, config.tile_size // config.latent_factor), in_channels=latent_channels,
        out_channels=latent_channels, down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types), block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block, cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
        mid_block_type=config.mid_block_type,
    )


def _weights_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).exists()), None)


def check_sd15_path(path: str | None) -> Path:
    """Fail fast (no loading) when the SD-1.5 path is missing or incomplete."""
    if not path:
        raise IdgbrError(f"the sd15 preset needs local SD-1.5 weights: pass --pretrained PATH ({SD15_LAYOUT})")
    root = Path(path).expanduser()
    if not root.exists():
        raise file_error(root, "SD-1.5 weights not found", SD15_LAYOUT)
    if root.is_file():
        if root.suffix not in (".safetensors", ".ckpt"):
            raise file_error(root, "not a .safetensors/.ckpt checkpoint", SD15_LAYOUT)
        return root
    missing = [f"{sub}/config.json" for sub in ("unet", "vae", "text_encoder") if not (root / sub / "config.json").exists()]
    for sub, names in (
        ("unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
        ("vae", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
        ("text_encoder", ("model.safetensors", "pytorch_model.bin")),
    ):
        if _weights_file(root / sub, names) is None:
            missing.append(f"{sub}/{names[0]}")
    if not (root / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise file_error(root, f"incomplete SD-1.5 folder, missing {', '.join(missing)}", SD15_LAYOUT)
    return root


def load_sd15(path: str | None) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(unet, vae, context) from a local SD-1.5 folder or single file; context = CLIP("") of shape (1, 77, 768)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = check_sd15_path(path)
    if root.is_file():
        try:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_single_file(str(root), local_files_only=True, safety_checker=None)
        except Exception as exc:  # diffusers needs the SD-1.5 configs locally for single files
            raise file_error(root, f"cannot load the single-file checkpoint offline ({type(exc).__name__})",
                             "convert it to a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) and pass that") from None
        unet, vae, tokenizer, text_encoder = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    with torch.no_grad():  # the empty prompt, computed once (reference §3.6: always "")
        ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        context = text_encoder(ids)[0].float()
    return unet, vae, context


class IDGBRModel(nn.Module):
    """The IDGBR denoiser with everything around it. See ``docs/design.md`` for the contract.

    Args:
        config: the refiner configuration.
        load_weights: load pretrained parts named by the config (SD-1.5, a label embedding folder). ``False``
            builds the same architecture with fresh weights, as :meth:`from_pretrained` does before loading.
        architecture: diffusers configs of the UNet (and VAE) as written to ``architecture.json``.
    """

    def __init__(self, config: RefinerConfig, *, load_weights: bool = True, architecture: dict[str, Any] | None = None):
        super().__init__()
        from diffusers import AutoencoderKL, UNet2DConditionModel

        architecture = architecture or {}
        self.config = config
        # --- codec and denoiser ------------------------------------------------------------------------------
        if config.preset == "sd15" and load_weights:
            unet, vae, context = load_sd15(config.pretrained)
        else:
            unet = vae = context = None
        if config.codec == "vae":
            if vae is None:
                vae = AutoencoderKL.from_config(architecture.get("vae", SD15_VAE_CONFIG))
            vae.requires_grad_(False).eval()
            self.codec: VAECodec | SpaceToDepthCodec = VAECodec(vae, config.vae_scaling_factor)
        else:
            self.codec = SpaceToDepthCodec(config.latent_factor, config.embed_dim)
        latent_channels = self.codec.label_latent_channels
        if unet is None:
            unet = UNet2DConditionModel.from_config(architecture.get("unet", unet_config(config, latent_channels)))
        if unet.config.in_channels != latent_channels or unet.config.out_channels != latent_channels:
            raise IdgbrError(f"the UNet takes {unet.config.in_channels} channels but the codec makes {latent_channels}")
        unet_parts.check_supported(unet)
        if config.coarse_residual:  # a fresh model starts as the identity on the coarse map
            nn.init.zeros_(unet.conv_out.weight)
            nn.init.zeros_(unet.conv_out.bias)
        self.unet = unet
        # --- context: CLIP("") for sd15 (a buffer), a learned token sequence otherwise -----------------------
        dim = unet.config.cross_attention_dim
        if config.preset == "sd15":
            self.register_buffer("context", context if context is not None else torch.zeros(1, config.context_tokens, dim))
        else:
            self.context = nn.Parameter(torch.randn(1, config.context_tokens, dim) * dim**-0.5)
        # --- guidance ----------------------------------------------------------------------------------------
        self.guidance = GuidanceNetwork(
            unet, self.codec.image_latent_channels(config.image_channels), config.guidance_attention_width,
            config.guidance_heads, config.guidance_attention,
            base_grid=max(1, (config.crop_size if config.pos_embed_size == "crop" else config.tile_size) // self.codec.factor),
            kv_grid=config.guidance_kv_grid, freeze_encoder=config.freeze_guidance_encoder,
            attention_stride=config.guidance_attention_stride, image_encoder=config.image_encoder,
            latent_factor=self.codec.factor, trainable_stages=config.image_encoder_trainable_stages,
            load_weights=load_weights,
        )
        # --- label embedding (trained first, frozen here) ----------------------------------------------------
        if load_weights and config.label_embed:
            self.set_label_embedding(load_label_embedding(config.label_embed))
        else:
            embed = LabelEmbedding(num_classes=config.num_classes, label_emb_inchannels=config.embed_dim, hidden=config.embed_hidden)
            with torch.no_grad():
                embed.embedding_table.weight.copy_(separated_table(config.num_classes, config.embed_dim))
            self.set_label_embedding(embed)
        self.projector: nn.Module | None = None  # REPA, built by the trainer with build_projector (never saved)

    # ------------------------------------------------------------------------------------------------------------
    def set_label_embedding(self, embed: LabelEmbedding) -> None:
        """Install a (trained) label embedding; it is frozen inside the refiner, as in the paper."""
        if embed.num_classes != self.config.num_classes:
            raise IdgbrError(f"the label embedding has {embed.num_classes} classes but the config says "
                             f"{self.config.num_classes}; train one with 'idgbr train-embed --classes {self.config.num_classes}'")
        hidden = embed.embedding_conv[0].out_channels
        if hidden != self.config.embed_hidden:
            self.config = self.config.replace(embed_hidden=hidden)
        self.label_embed = embed.requires_grad_(False).eval()

    def build_projector(self, teacher_dim: int) -> nn.Module:
        """Create the REPA projector for the deepest down-skip CG output (reference §4)."""
        from .repa import Projector

        channels = unet_parts.level_channels(self.unet)[-2]
        self.projector = Projector(channels, self.config.repa_hidden, teacher_dim).to(self.context.device)
        return self.projector

    def train(self, mode: bool = True) -> "IDGBRModel":
        super().train(mode)
        self.label_embed.eval()
        if isinstance(self.codec, VAECodec):
            self.codec.vae.eval()
        self.guidance.train(mode)
        return self

    # --- inputs ---------------------------------------------------------------------------------------------------
    def normalize_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or float in [0, 1] -> float in the codec's range ([-1, 1], or ImageNet statistics)."""
        if image.ndim != 4 or image.shape[1] != self.config.image_channels:
            raise IdgbrError(f"expected images of shape (B, {self.config.image_channels}, H, W), got {tuple(image.shape)}; "
                             "set image_channels in the config to the number of bands")
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if self.config.image_normalization == "imagenet":  # reference §10.10
            if x.shape[1] != 3:
                raise IdgbrError("image_normalization='imagenet' needs 3-band images; use 'minus_one_one'")
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            return (x - mean) / std
        return x * 2 - 1

    def encode_image(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised (B, C, H, W) -> (B, C_img_lat, H/f, W/f)."""
        return self.codec.encode_image(x, generator)

    def encode_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """E_S: long (B, H, W) indices or float (B, K, H, W) probabilities -> (B, C_lat, H/f, W/f)."""
        return self.codec.encode_embedding(self.label_embed.encode(labels), generator)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """D_S: (B, C_lat, h, w) -> (B, K, h f, w f) logits."""
        return self.label_embed.decode(self.codec.decode_embedding(z))

    def condition(self, z_img: torch.Tensor, z_coarse: torch.Tensor | None,
                  coarse_labels: torch.Tensor | None = None, image: torch.Tensor | None = None) -> GuidanceFeatures:
        """Guidance-encoder features of image and coarse latents (t-independent: compute once per tile).

        ``z_coarse`` None, or ``config.use_coarse`` False, gives image-only guidance (coarse features are zeros).
        ``coarse_labels`` (B, H, W) long: the coarse map, needed for ``config.residual_band``.
        ``image``: the :meth:`normalize_image` output behind ``z_img``, needed by a pretrained ``image_encoder``.
        """
        if not self.config.use_coarse:
            z_coarse = None
        if self.guidance.image_branch is not None and image is None:
            raise IdgbrError(f"image_encoder {self.config.image_encoder!r} reads the image: call "
                             "condition(z_img, z_coarse, labels, image=normalize_image(images))")
        features = self.guidance.encode(z_img, z_coarse, self.context, image, self.config.image_normalization)
        if self.config.coarse_residual and z_coarse is not None:
            features.base = z_coarse
            if self.config.residual_band > 0:
                if coarse_labels is None:
                    raise IdgbrError("residual_band needs the coarse labels: call condition(z_img, z_coarse, labels)")
                features.band = boundary_band(coarse_labels, self.config.residual_band, self.codec.factor).to(z_coarse)
        return features

    # --- denoiser -------------------------------------------------------------------------------------------------
    def forward(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: GuidanceFeatures,
        drop: torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Predict eps / x0 / v (``config.prediction_type``) for noisy label latents.

        Args:
            z_t: (B, C_lat, h, w) noisy latents; t: (B,) or scalar timesteps; cond: from :meth:`condition`, batch
                1 (broadcast) or B; drop: bool (B,), True zeroes the CG residuals of that sample (the CFG
                unconditional branch, and conditioning dropout in training).
        Returns:
            (B, C_lat, h, w); with ``return_aux`` also ``{"repa": (B, C, h', w') CG output at the deepest down skip
            (before drop), "residuals": per-level CG outputs (after drop)}``.
        """
        batch = z_t.shape[0]
        cond = cond.expand(batch)
        context = self.context.expand(batch, *self.context.shape[1:]).to(z_t.dtype)
        emb = unet_parts.time_embedding(self.unet, t, batch, z_t)
        hidden = self.unet.conv_in(z_t)
        skips, mid = unet_parts.encode_features(self.unet, hidden, emb, context)
        residuals = self.guidance.residuals(skips + [mid], cond)
        student = residuals[len(skips) - 1]
        keep = None if drop is None else (~drop.bool()).to(z_t.dtype).view(batch, 1, 1, 1)
        if keep is not None:
            residuals = [r * keep for r in residuals]
        skips = [s + r for s, r in zip(skips, residuals[:-1])]
        mid = mid + residuals[-1]
        pred = unet_parts.decode(self.unet, emb, skips, mid, context)
        if cond.band is not None:  # residual_band: corrections only near coarse boundaries
            pred = pred * cond.band.to(pred.dtype)
        if cond.base is not None:  # coarse_residual: x0 = z_coarse + correction
            base = cond.base if keep is None or self.config.dropped_keeps_base else cond.base * keep
            pred = pred + base.to(pred.dtype)
        if return_aux:
            return pred, {"repa": student, "residuals": residuals}
        return pred

    def make_scheduler(self):
        """A fresh diffusers DDIMScheduler (reference §5; ``linear`` as the paper, ``scaled_linear`` as the code)."""
        from diffusers import DDIMScheduler

        c = self.config
        return DDIMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
            beta_schedule=c.beta_schedule, prediction_type=c.prediction_type, clip_sample=False,
            set_alpha_to_one=False, steps_offset=1 if c.timestep_spacing == "leading" else 0,
            timestep_spacing=c.timestep_spacing,
        )

    # --- parameters -----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser gets: the UNet, context, CG modules, a non-frozen guidance encoder, the projector."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_groups(self, params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """``params`` as AdamW parameter groups: the pretrained image encoder's fine-tuned blocks (if any) at
        ``lr x image_encoder_lr_scale``, everything else at the optimiser's lr."""
        branch = self.guidance.image_branch
        slow = {id(p) for p in branch.finetuned_parameters()} if branch is not None else set()
        groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in slow]}]
        if slow:
            groups.append({"params": [p for p in params if id(p) in slow],
                           "lr": self.config.lr * self.config.image_encoder_lr_scale})
        return groups

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """``{part: (total, trainable)}`` for every part, plus ``"total"``."""
        parts: dict[str, Any] = {
            "label_embed": self.label_embed, "codec": self.codec, "unet": self.unet,
            "guidance_encoder": self.guidance.encoder, "cg_modules": self.guidance.cg,
        }
        if self.guidance.image_branch is not None:
            parts["image_encoder"] = self.guidance.image_branch
        if self.projector is not None:
            parts["projector"] = self.projector
        counts = {name: (sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad))
                  for name, m in parts.items()}
        is_param = isinstance(self.context, nn.Parameter)
        counts["context"] = (self.context.numel(), self.context.numel() if is_param and self.context.requires_grad else 0)
        counts["total"] = (sum(v[0] for v in counts.values()), sum(v[1] for v in counts.values()))
        return counts

    # --- save / load ----------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json``, ``architecture.json`` and ``model.safetensors`` (everything but the REPA projector)."""
        from safetensors.torch import save_file

        from ..data.io import atomic_path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path / "config.json")
        architecture = {"unet": _plain(self.unet.config)}
        if isinstance(self.codec, VAECodec):
            architecture["vae"] = _plain(self.codec.vae.config)
        with atomic_path(path / ARCHITECTURE_NAME) as tmp:
            tmp.write_text(json.dumps(architecture, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("projector.")}
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "idgbr": "IDGBRModel"})

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "IDGBRModel":
        """Rebuild from a directory written by :meth:`save_pretrained` (safetensors only; no SD-1.5 folder needed)."""
        path = Path(path)
        missing = [n for n in ("config.json", WEIGHTS_NAME) if not (path / n).exists()]
        if missing:
            raise file_error(path, f"missing {', '.join(missing)}",
                             "point at a directory written by IDGBRModel.save_pretrained / 'idgbr train'")
        config = RefinerConfig.load(path / "config.json")
        architecture = None
        if (path / ARCHITECTURE_NAME).exists():
            try:
                architecture = json.loads((path / ARCHITECTURE_NAME).read_text())
            except ValueError as exc:
                raise file_error(path / ARCHITECTURE_NAME, f"not valid JSON ({exc})", "restore the file from the run") from None
        model = cls(config, load_weights=False, architecture=architecture)
        state = load_safetensors(path / WEIGHTS_NAME, device=str(map_location))
        result = model.load_state_dict(state, strict=False)
        missing_keys = [k for k in result.missing_keys if not k.startswith("projector.")]
        if missing_keys or result.unexpected_keys:
            raise file_error(path / WEIGHTS_NAME, f"weights do not match config.json (missing {missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})", "the directory is from another version or was edited")
        return model


def boundary_map(labels: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, W) bool: pixels with another label within a (2 width + 1)² window (class boundaries, ``width`` px)."""
    x = labels[:, None].float()
    size = 2 * width + 1

    def window_max(y: torch.Tensor) -> torch.Tensor:  # a square max is a row max of a column max (same values)
        y = F.max_pool2d(y, (1, size), stride=1, padding=(0, width))
        return F.max_pool2d(y, (size, 1), stride=1, padding=(width, 0))

    return (window_max(x) != -window_max(-x))[:, 0]


def boundary_band(labels: torch.Tensor, width: int, factor: int) -> torch.Tensor:
    """(B, 1, H/f, W/f) float: 1 for latent cells holding a pixel within ``width`` px of a boundary of ``labels``."""
    return F.max_pool2d(boundary_map(labels, width)[:, None].float(), factor)


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file; anything else (a pickle, a ``torch.save`` zip, a truncated file) is a
    one-line user error. Nothing is ever unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:1] == b"\x80" or head[:2] == b"PK":  # pickle protocol 2+ / the zip of torch.save
            problem = "not a safetensors file: it is a pickle / torch.save file, which is never loaded (it can run code)"
        else:
            problem = f"not a safetensors file or truncated ({str(exc).splitlines()[0][:80]})"
        raise file_error(path, problem, "restore the file written by 'idgbr train' (or re-run training)") from None


def load_label_embedding(path: str | Path) -> LabelEmbedding:
    """Load a label embedding folder (ours from ``train-embed``, or the authors' released files)."""
    folder = Path(path)
    if not (folder / "config.json").exists() or _weights_file(folder, ("diffusion_pytorch_model.safetensors",)) is None:
        raise file_error(folder, "not a label-embedding folder (config.json + diffusion_pytorch_model.safetensors)",
                         "create one with 'idgbr train-embed --classes K --out DIR'")
    return LabelEmbedding.from_pretrained(folder)


def _plain(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}
