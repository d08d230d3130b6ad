"""``Refiner``: refine a coarse segmentation map with a trained IDGBR model.

    >>> from idgbr import Refiner
    >>> refiner = Refiner.from_pretrained("runs/lite")
    >>> refined = refiner.refine(image, coarse)                                  # 25 DDIM steps, CFG 3 (the paper)
    >>> fast = refiner.refine(image, coarse, steps=2, strength=0.4, guidance=1.0)  # SDEdit start, no CFG

Any image size: images are cut into overlapping tiles (``config.tile_size``/``tile_overlap``, via
:mod:`idgbr.tiling`), each tile is reflect-padded to ``config.size_multiple``, and the tiles' softmax
probabilities are blended with the tiling weights, then cropped back to the input size.

Fixes over the authors' pipeline (reference doc §6, §10.12): everything that does not depend on t (image and
coarse latents, guidance-encoder features) is computed once per tile; ``strength < 1`` really starts from the
coarse latent noised to the first kept timestep (SDEdit); ``guidance = 1`` is a single conditional pass; batches
and any image size work; the output is returned at the input size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data import IGNORE_INDEX, SegmentationDataset
from .postprocess import check_sieve, sieve_labels
from .errors import IdgbrError, file_error
from .io import write_label


def _repeat_batch(tree: Any, times: int = 2) -> Any:
    """Concatenate every tensor of a (nested) conditioning structure ``times`` times along the batch axis (CFG,
    several samples per tile)."""
    if isinstance(tree, torch.Tensor):
        return torch.cat([tree] * times)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # e.g. guidance.GuidanceFeatures
        return dataclasses.replace(tree, **{f.name: _repeat_batch(getattr(tree, f.name), times)
                                            for f in dataclasses.fields(tree)})
    if isinstance(tree, dict):
        return {key: _repeat_batch(value, times) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_repeat_batch(value, times) for value in tree)
    return tree


class Refiner:
    """Sampling pipeline around an ``IDGBRModel`` (``refiner.model``); ``refiner.last_nfe`` counts network
    evaluations per tile of the last call (CFG counts 2 per step)."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = "auto", channels_last: bool = False, compile: bool = False):
        """``device``: ``"auto"`` (CUDA when there is a GPU, else the CPU), ``"cpu"``, ``"cuda[:N]"``, or None (leave
        the model where it is); :func:`idgbr.device.resolve_device`. ``dtype`` (torch.float16 / bfloat16) runs the
        network under autocast on a GPU; ``"auto"`` is bfloat16 on CUDA and fp32 on the CPU, None always fp32.
        ``channels_last`` and ``compile`` (torch.compile of the UNet) are throughput options that leave the
        results unchanged."""
        from .device import autocast_dtype, resolve_device

        self.model = model.eval()
        if device is not None:
            self.model.to(resolve_device(device))
        self.autocast_dtype = autocast_dtype(self.device) if isinstance(dtype, str) and dtype == "auto" else dtype
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.unet = torch.compile(self.model.unet)
        self.last_nfe = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = "auto", **options: Any) -> "Refiner":
        """Load a run folder written by ``idgbr train`` (or one of its ``checkpoints/step-N`` folders), a shipped
        model by name (``"dubai-lite"``, see :mod:`idgbr.zoo`), or a Hugging Face repo id where the network allows,
        onto ``device`` (default ``"auto"``: the GPU when there is one)."""
        if device is not None:  # a bad --device fails before the weights are read
            from .device import resolve_device

            device = resolve_device(device)
        from .model import IDGBRModel
        from .zoo import resolve_model

        path = resolve_model(path, "refiner", "point --model at a run folder written by 'idgbr train'")
        if not (path / "config.json").exists():
            from .train import latest_checkpoint

            latest = latest_checkpoint(path)
            fix = (f"training did not finish; use --model {latest}" if latest is not None
                   else "point --model at a run folder written by 'idgbr train'")
            raise file_error(path, "no config.json (not a finished run)", fix)
        return cls(IDGBRModel.from_pretrained(path), device, **options)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------------------------------------------
    # The sampling loop, for one batch of tiles.
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, image: torch.Tensor, coarse: torch.Tensor, steps: int, guidance: float, strength: float,
               noise: torch.Tensor, callback: Callable[[int, int, torch.Tensor], None] | None = None,
               noise_scale: float = 1.0, tta: str | None = None) -> torch.Tensor:
        """Class logits (S B, K, H, W) for image tiles (B, C, H, W) and coarse probabilities (B, K, H, W).

        ``noise`` (S B, C_lat, H/f, W/f) is the starting noise of S samples per tile (sample-major: rows s B .. s B
        + B - 1 are sample s); the t-independent conditioning is computed once for the B tiles and shared.
        ``noise_scale`` multiplies it (0: a deterministic start from the zero latent, or from the coarse latent
        itself when ``strength`` < 1). ``strength`` < 1 starts from the coarse latent noised to the first kept
        timestep and runs only the remaining ``round(steps * strength)`` steps. ``callback(step, t, x0_hat)`` sees
        the predicted clean latent after every step (for analyses).

        ``tta`` ("none", "flips", "d4"; default ``config.tta``) samples the tiles (and their noise) under each
        transform of that group, maps the outputs back and returns the log of the mean probability, so a softmax of
        the result is the average over the transforms; ``last_nfe`` then counts every pass, and ``callback`` sees each
        pass's x0 estimates in that pass's transformed frame.
        """
        transforms = TTA_TRANSFORMS[check_tta(self.config.tta if tta is None else tta)]
        if len(transforms) == 1:
            return self._sample_dtype(image, coarse, steps, guidance, strength, noise * noise_scale, callback)
        probs, nfe = None, 0
        for forward, inverse in transforms:
            logits = self._sample_dtype(forward(image), forward(coarse), steps, guidance, strength,
                                        forward(noise) * noise_scale, callback)
            p = torch.softmax(inverse(logits).float(), dim=1)
            probs = p if probs is None else probs + p
            nfe += self.last_nfe
        self.last_nfe = nfe
        return torch.log((probs / len(transforms)).clamp_min(1e-12))

    def _sample_dtype(self, image: torch.Tensor, coarse: torch.Tensor, steps: int, guidance: float, strength: float,
                      noise: torch.Tensor, callback: Callable[[int, int, torch.Tensor], None] | None) -> torch.Tensor:
        if self.autocast_dtype is not None and self.device.type != "cpu":
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self._sample(image, coarse, steps, guidance, strength, noise, callback).float()
        return self._sample(image, coarse, steps, guidance, strength, noise, callback)

    def _sample(self, image: torch.Tensor, coarse: torch.Tensor, steps: int, guidance: float, strength: float,
                noise: torch.Tensor, callback: Callable[[int, int, torch.Tensor], None] | None) -> torch.Tensor:
        model, cfg = self.model, self.config
        self.last_nfe = 0
        if len(noise) % len(image):
            raise IdgbrError(f"noise batch {len(noise)} is not a multiple of the {len(image)} tiles")
        samples = len(noise) // len(image)
        x = model.normalize_image(image)
        z_img = model.encode_image(x)
        z_coarse = model.encode_labels(coarse)
        cond = model.condition(z_img, z_coarse if cfg.use_coarse else torch.zeros_like(z_coarse),
                               coarse.argmax(1), image=x)  # once per tile
        if cfg.objective == "deterministic":  # one pass, no noise
            logits = model.decode_logits(self._denoise(torch.zeros_like(z_coarse), cfg.num_train_timesteps - 1, cond, 1.0))
            return _repeat_batch(logits, samples)
        if samples > 1:
            cond, z_coarse = _repeat_batch(cond, samples), _repeat_batch(z_coarse, samples)
        scheduler = model.make_scheduler()
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        if strength < 1:  # SDEdit: noise the coarse latent to the first kept timestep
            timesteps = timesteps[steps - max(1, round(steps * strength)):]
            z = scheduler.add_noise(z_coarse, noise, timesteps[:1].repeat(len(noise)))
        else:
            z = noise * scheduler.init_noise_sigma
        x0_hat = z
        for step, t in enumerate(timesteps):
            out = scheduler.step(self._denoise(z, t, cond, guidance), t, z)
            z, x0_hat = out.prev_sample, out.pred_original_sample
            if callback is not None:
                callback(step, int(t), x0_hat)
        # The last step's clean-latent estimate: prev_sample would still hold the noise of alphas_cumprod[0] < 1.
        return model.decode_logits(x0_hat)

    def _denoise(self, z: torch.Tensor, t: torch.Tensor | int, cond: Any, guidance: float) -> torch.Tensor:
        """Network output at timestep ``t``; with ``guidance`` != 1, classifier-free guidance ``u + g (c - u)``."""
        batch = z.shape[0]
        t = torch.as_tensor(t, device=z.device).long().reshape(1).expand(batch)
        if guidance == 1:
            self.last_nfe += 1
            return self.model(z, t, cond, drop=None)
        drop = torch.arange(2 * batch, device=z.device) < batch  # first half unconditional
        both = self.model(torch.cat([z, z]), torch.cat([t, t]), _repeat_batch(cond), drop=drop)
        self.last_nfe += 2
        uncond, cond_out = both.chunk(2)
        return uncond + guidance * (cond_out - uncond)

    # ----------------------------------------------------------------------------------------------------------
    # Public API: arrays in, index maps out.
    # ----------------------------------------------------------------------------------------------------------
    def refine(self, image: np.ndarray | Sequence[np.ndarray], coarse: np.ndarray | Sequence[np.ndarray],
               steps: int | None = None, guidance: float | None = None, strength: float | None = None,
               generator: torch.Generator | None = None, return_probs: bool = False, batch_size: int = 4,
               callback: Callable[[int, int, torch.Tensor], None] | None = None, samples: int | None = None,
               noise_scale: float | None = None, return_agreement: bool = False, tta: str | None = None,
               sieve: int | None = None):
        """Refine one image or a list of images.

        Args:
            image: (H, W, C) uint8/uint16/float array (float in [0, 1]), or a list of them.
            coarse: (H, W) class-index map (``IGNORE_INDEX`` = nodata) or (K, H, W) probabilities; or a list.
            steps, guidance, strength: DDIM steps, CFG scale (1 = no CFG), SDEdit strength in (0, 1];
                defaults from the model's config (``sample_steps``, ``guidance_scale``, ``strength``).
            generator: CPU ``torch.Generator`` for the noise (same seed and inputs give the same map).
            return_probs: also return the blended (K, H, W) float32 probabilities.
            batch_size: tiles per network batch.
            callback: ``callback(step, t, x0_hat)`` after every sampling step (analyses; see ``sample``).
            samples: S > 1 draws S samples per tile in one batch and averages their probabilities (a posterior-mean
                estimate instead of one noisy sample); default ``config.samples``.
            noise_scale: multiplies the starting noise (0: deterministic zero-noise start); default
                ``config.noise_scale``.
            return_agreement: also return the (H, W) float32 share of the S samples whose label equals the returned
                one (1 everywhere for S = 1): a per-pixel confidence.
            tta: test-time augmentation, "none", "flips" (4 passes) or "d4" (8 passes); the probabilities are
                averaged over the transforms (default ``config.tta``).
            sieve: merge regions smaller than this many pixels into their largest neighbour (0: off; default
                ``config.sieve``; :mod:`idgbr.postprocess`). The probabilities are not changed.
        Returns:
            (H, W) uint8 index map (nodata pixels stay ``IGNORE_INDEX``), or a tuple ``(map, probs)``, ``(map,
            agreement)`` or ``(map, probs, agreement)``; lists for list input.
        """
        cfg = self.config
        steps = cfg.sample_steps if steps is None else int(steps)
        guidance = cfg.guidance_scale if guidance is None else float(guidance)
        strength = cfg.strength if strength is None else float(strength)
        samples = cfg.samples if samples is None else int(samples)
        noise_scale = cfg.noise_scale if noise_scale is None else float(noise_scale)
        sieve = check_sieve(cfg.sieve if sieve is None else sieve)
        if steps < 1 or not 0 < strength <= 1 or guidance < 0 or batch_size < 1 or samples < 1 or noise_scale < 0:
            raise IdgbrError(f"need steps >= 1, 0 < strength <= 1, guidance >= 0, batch_size >= 1, samples >= 1 and "
                             f"noise_scale >= 0; got steps={steps}, strength={strength}, guidance={guidance}, "
                             f"batch_size={batch_size}, samples={samples}, noise_scale={noise_scale}")
        check_noise_for_samples(samples, noise_scale)
        many = isinstance(image, (list, tuple))
        images = list(image) if many else [image]
        coarses = list(coarse) if isinstance(coarse, (list, tuple)) else [coarse]
        if len(images) != len(coarses):
            raise IdgbrError(f"{len(images)} images but {len(coarses)} coarse maps; give one coarse map per image")
        results = []
        for img, crs in zip(images, coarses):
            probs = self._refine_one(img, crs, steps, guidance, strength, generator, batch_size, callback, samples,
                                     noise_scale, tta)
            probs, agreement = probs[:cfg.num_classes], probs[cfg.num_classes]
            labels = probs.argmax(0).astype(np.uint8)
            if not _is_soft(crs):
                labels[np.asarray(crs) == IGNORE_INDEX] = IGNORE_INDEX
            labels = sieve_labels(labels, sieve)
            extra = ([probs] if return_probs else []) + ([agreement] if return_agreement else [])
            results.append((labels, *extra) if extra else labels)
        return results if many else results[0]

    def _refine_one(self, image: np.ndarray, coarse: np.ndarray, steps: int, guidance: float, strength: float,
                    generator: torch.Generator | None, batch_size: int,
                    callback: Callable[[int, int, torch.Tensor], None] | None = None, samples: int = 1,
                    noise_scale: float = 1.0, tta: str | None = None) -> np.ndarray:
        """Blended (K + 1, H, W) for one image, tile by tile: the class probabilities (the mean over ``samples``)
        and, last, the share of samples agreeing with the mean's label."""
        from .tiling import sliding_window

        cfg = self.config
        image, coarse = self._check_inputs(image, coarse)
        bands = image.shape[-1]
        stacked = np.concatenate([np.moveaxis(image, -1, 0).astype(np.float32), coarse.astype(np.float32)])
        soft = coarse.shape[0] > 1
        dtype = torch.from_numpy(np.empty(0, dtype=image.dtype)).dtype  # tiles go back to the input dtype

        def predict(batch: torch.Tensor) -> torch.Tensor:  # (B, C + 1 or C + K, h, w) -> (B, K + 1, h, w)
            tiles = batch[:, :bands].to(dtype).to(self.device)
            prior = batch[:, bands:] if soft else _one_hot(batch[:, bands].long(), cfg.num_classes)
            prior = prior.to(self.device)
            z_shape = self._latent_shape(tiles.shape[-2:])
            noise = torch.stack([torch.randn(z_shape, generator=generator) for _ in range(samples * len(tiles))])
            logits = self.sample(tiles, prior, steps, guidance, strength, noise.to(self.device), callback, noise_scale,
                                 tta)
            probs = torch.softmax(logits.float(), dim=1).unflatten(0, (samples, len(tiles)))  # (S, B, K, h, w)
            mean = probs.mean(0)
            agreement = (probs.argmax(2) == mean.argmax(1)).float().mean(0)  # (B, h, w)
            return torch.cat([mean, agreement[:, None]], 1)

        return sliding_window(predict, stacked, cfg.num_classes + 1, tile=cfg.tile_size, overlap=cfg.tile_overlap,
                              batch_size=batch_size, multiple=cfg.size_multiple)

    def _latent_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(C_lat, h, w) of the label latent for a (H, W) tile."""
        if not hasattr(self, "_label_channels"):
            probe = torch.zeros(1, self.config.num_classes, self.config.size_multiple, self.config.size_multiple,
                                device=self.device)
            self._label_channels = int(self.model.encode_labels(probe).shape[1])
        f = self.config.latent_factor
        return self._label_channels, size[0] // f, size[1] // f

    def _check_inputs(self, image: np.ndarray, coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate; return image (H, W, C) and coarse (1, H, W) indices or (K, H, W) probabilities."""
        cfg = self.config
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or min(image.shape[:2]) == 0:
            raise IdgbrError(f"image must be a non-empty (H, W, C) array, got shape {image.shape}")
        if image.shape[-1] != cfg.image_channels:
            raise IdgbrError(f"image has {image.shape[-1]} bands but the model was trained on {cfg.image_channels}; "
                             "give imagery with the training bands")
        if image.dtype.kind == "f":
            image = image.astype(np.float32)
            if not np.isfinite(image).all():
                raise IdgbrError("image contains NaN/inf values; fill nodata before refining")
        coarse = np.asarray(coarse)
        if _is_soft(coarse):
            if coarse.ndim != 3 or coarse.shape[0] != cfg.num_classes or coarse.shape[1:] != image.shape[:2]:
                raise IdgbrError(f"soft coarse map must be ({cfg.num_classes}, {image.shape[0]}, {image.shape[1]}), "
                                 f"got {coarse.shape}")
            if not np.isfinite(coarse).all() or coarse.min() < 0:
                raise IdgbrError("soft coarse map has NaN/inf or negative values; give class probabilities")
            return image, coarse.astype(np.float32)
        if coarse.shape != image.shape[:2]:
            raise IdgbrError(f"coarse map size {coarse.shape} differs from the image size {image.shape[:2]}")
        bad = np.unique(coarse[(coarse >= cfg.num_classes) & (coarse != IGNORE_INDEX)])
        if bad.size or (coarse.dtype.kind == "i" and coarse.min() < 0):
            raise IdgbrError(f"coarse values {bad[:5].tolist()} are outside the model's {cfg.num_classes} classes; "
                             f"use 0..{cfg.num_classes - 1} or {IGNORE_INDEX} for nodata")
        return image, coarse[None]

    def refine_folder(self, data_root: str | Path, split: str | None, coarse_name: str | None, out_dir: str | Path,
                      seed: int = 0, skip_existing: bool = False, progress: bool = True, **kw: Any) -> list[Path]:
        """Refine every image of a dataset split into ``out_dir/<stem>.png``; each image is seeded with ``seed``.

        ``coarse_name`` may be None only for an image-only model (``use_coarse=False``, the paper's Experiment A).
        """
        from tqdm import tqdm

        if coarse_name is None and self.config.use_coarse:
            raise IdgbrError("this model refines coarse maps: give --coarse NAME (a folder under DATA/coarse/)")
        dataset = SegmentationDataset(data_root, split, coarse=coarse_name, load_mask=False)
        out_dir = Path(out_dir)
        written = []
        for index in tqdm(range(len(dataset)), desc="refine", unit="img", disable=not progress):
            target = out_dir / f"{dataset.stems[index]}.png"
            if not (skip_existing and target.exists()):
                sample = dataset[index]
                coarse = sample["coarse"] if coarse_name else np.zeros(sample["image"].shape[:2], np.uint8)
                try:
                    refined = self.refine(sample["image"], coarse, generator=torch.Generator().manual_seed(seed), **kw)
                except IdgbrError as exc:  # name the offending image
                    raise IdgbrError(f"{dataset.image_path(dataset.stems[index])}: {exc}") from None
                write_label(target, refined)
            written.append(target)
        return written


def _dihedral(k: int, transpose: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(forward, inverse) on the last two axes: optional transpose, then ``k`` quarter turns."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x.transpose(-1, -2) if transpose else x, k, dims=(-2, -1))

    def inverse(x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, -k, dims=(-2, -1))
        return x.transpose(-1, -2) if transpose else x

    return forward, inverse


def _flip(dims: tuple[int, ...]) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    def flip(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims) if dims else x

    return flip, flip


TTA_TRANSFORMS = {
    "none": [_flip(())],
    "flips": [_flip(()), _flip((-1,)), _flip((-2,)), _flip((-2, -1))],
    "d4": [_dihedral(k, t) for t in (False, True) for k in range(4)],
}


def check_tta(tta: str) -> str:
    """``tta`` if it names a transform group of ``TTA_TRANSFORMS``, else a one-line error."""
    if tta not in TTA_TRANSFORMS:
        raise IdgbrError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_TRANSFORMS)}")
    return tta


def check_noise_for_samples(samples: int, noise_scale: float) -> None:
    """Several samples differ only through their starting noise: refuse ``samples > 1`` with ``noise_scale`` 0."""
    if samples > 1 and noise_scale == 0:
        raise IdgbrError(f"--samples {samples} draws identical maps with a zero-noise start (this model's default); "
                         "add --noise-scale 1")


def _is_soft(coarse: Any) -> bool:
    array = np.asarray(coarse)
    return array.ndim == 3 and array.dtype.kind == "f"


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) indices -> (B, K, H, W) float one-hot; ``IGNORE_INDEX`` (nodata) gives all zeros."""
    valid = labels != IGNORE_INDEX
    out = torch.nn.functional.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return out * valid[:, None]
