"""``Refiner``: refine a coarse segmentation map with a trained IDGBR model.

    >>> from idgbr import Refiner
    >>> refiner = Refiner.from_pretrained("runs/lite")
    >>> refined = refiner.refine(image, coarse)                                  # 25 DDIM steps, CFG 3 (the paper)
    >>> fast = refiner.refine(image, coarse, steps=2, strength=0.4, guidance=1.0)  # SDEdit start, no CFG

Any image size: images are cut into overlapping tiles (``config.tile_size``/``tile_overlap``, via
:mod:`idgbr.nn.tiling`), each tile is reflect-padded to ``config.size_multiple``, and the tiles' softmax
probabilities are blended with the tiling weights, then cropped back to the input size.

Several images (a list, or ``refine_folder``) share network batches: windows of different images fill one batch
(:meth:`Refiner._refine_stream`), while each image's starting noise is drawn exactly as for that image alone;
``refine_folder`` reads and tiles the next images in one thread and labels, sieves and writes the finished ones
in another, beside the compute.

Fixes over the authors' pipeline (reference doc §6, §10.12): everything that does not depend on t (image and
coarse latents, guidance-encoder features) is computed once per tile; ``strength < 1`` really starts from the
coarse latent noised to the first kept timestep (SDEdit); ``guidance = 1`` is a single conditional pass; batches
and any image size work; the output is returned at the input size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..data.dataset import IGNORE_INDEX
from .postprocess import check_area_match, check_class_reach, check_flip_margin, check_sieve, finish_labels
from ..errors import IdgbrError, file_error
from .tta import TTA_TRANSFORMS, _agreement, _repeat_batch, check_noise_for_samples, check_tta

Callback = Callable[[int, int, torch.Tensor], None]  # callback(step, t, x0_hat), see Refiner.sample


class Refiner:
    """Sampling pipeline around an ``IDGBRModel`` (``refiner.model``); ``refiner.last_nfe`` counts network
    evaluations per tile of the last call (CFG counts 2 per step)."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = "auto", channels_last: bool = False, compile: bool = False):
        """``device``: ``"auto"`` (CUDA when there is a GPU, else the CPU), ``"cpu"``, ``"cuda[:N]"``, or None (leave
        the model where it is); :func:`idgbr.nn.device.resolve_device`. ``dtype`` (torch.float16 / bfloat16) runs the
        network under autocast on a GPU; ``"auto"`` is bfloat16 on CUDA and fp32 on the CPU, None always fp32.
        ``channels_last`` and ``compile`` (torch.compile of the UNet) are throughput options that leave the
        results unchanged."""
        from ..nn.device import autocast_dtype, resolve_device

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
        model by name (``"dubai-lite"``, see :mod:`idgbr.nn.zoo`), or a Hugging Face repo id where the network allows,
        onto ``device`` (default ``"auto"``: the GPU when there is one)."""
        if device is not None:  # a bad --device fails before the weights are read
            from ..nn.device import resolve_device

            device = resolve_device(device)
        from ..nn.model import IDGBRModel
        from ..nn.zoo import resolve_model

        path = resolve_model(path, "refiner", "point --model at a run folder written by 'idgbr train'")
        if not (path / "config.json").exists():
            from ..nn.run_folder import latest_checkpoint

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
               noise: torch.Tensor, callback: Callback | None = None,
               noise_scale: float = 1.0, tta: str | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (S B, K, H, W) for image tiles (B, C, H, W) and coarse probabilities (B, K, H, W).

        ``noise`` (S B, C_lat, H/f, W/f) is the starting noise of S samples per tile (sample-major: rows s B .. s B
        + B - 1 are sample s); the t-independent conditioning is computed once for the B tiles and shared.
        ``noise_scale`` multiplies it (0: a deterministic start from the zero latent, or from the coarse latent
        itself when ``strength`` < 1). ``strength`` < 1 starts from the coarse latent noised to the first kept
        timestep and runs only the remaining ``round(steps * strength)`` steps (``start``, (B, K, H, W) probabilities:
        another map to start from instead, e.g. another model's; the condition stays ``coarse``). ``callback(step,
        t, x0_hat)`` sees the predicted clean latent after every step (for analyses).

        ``tta`` ("none", "flips", "d4"; default ``config.tta``) samples the tiles (and their noise) under each
        transform of that group, maps the outputs back and returns the log of the mean probability, so a softmax of
        the result is the average over the transforms; ``last_nfe`` then counts every pass, and ``callback`` sees each
        pass's x0 estimates in that pass's transformed frame.
        """
        transforms = TTA_TRANSFORMS[check_tta(self.config.tta if tta is None else tta)]
        if len(transforms) == 1:
            return self._sample_dtype(image, coarse, steps, guidance, strength, noise * noise_scale, callback, start)
        probs, nfe = None, 0
        for forward, inverse in transforms:
            logits = self._sample_dtype(forward(image), forward(coarse), steps, guidance, strength,
                                        forward(noise) * noise_scale, callback,
                                        None if start is None else forward(start))
            p = torch.softmax(inverse(logits).float(), dim=1)
            probs = p if probs is None else probs + p
            nfe += self.last_nfe
        self.last_nfe = nfe
        return torch.log((probs / len(transforms)).clamp_min(1e-12))

    def _sample_dtype(self, image: torch.Tensor, coarse: torch.Tensor, steps: int, guidance: float, strength: float,
                      noise: torch.Tensor, callback: Callback | None, start: torch.Tensor | None) -> torch.Tensor:
        if self.autocast_dtype is not None and self.device.type != "cpu":
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                return self._sample(image, coarse, steps, guidance, strength, noise, callback, start).float()
        return self._sample(image, coarse, steps, guidance, strength, noise, callback, start)

    def _sample(self, image: torch.Tensor, coarse: torch.Tensor, steps: int, guidance: float, strength: float,
                noise: torch.Tensor, callback: Callback | None, start: torch.Tensor | None) -> torch.Tensor:
        model, cfg = self.model, self.config
        self.last_nfe = 0
        if len(noise) % len(image):
            raise IdgbrError(f"noise batch {len(noise)} is not a multiple of the {len(image)} tiles")
        samples = len(noise) // len(image)
        x = model.normalize_image(image)
        z_img = model.encode_image(x)
        z_coarse = model.encode_labels(coarse)
        cond = model.condition(z_img, z_coarse if cfg.use_coarse else torch.zeros_like(z_coarse),
                               coarse.max(1).indices, image=x)  # once per tile (max: argmax, several x faster on a CPU)
        if cfg.objective == "deterministic":  # one pass, no noise
            logits = model.decode_logits(self._denoise(torch.zeros_like(z_coarse), cfg.num_train_timesteps - 1, cond, 1.0))
            return _repeat_batch(logits, samples)
        z_start = z_coarse if start is None else model.encode_labels(start)
        if samples > 1:
            cond, z_start = _repeat_batch(cond, samples), _repeat_batch(z_start, samples)
        scheduler = model.make_scheduler()
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
        if strength < 1:  # SDEdit: noise the coarse latent (or ``start``'s) to the first kept timestep
            timesteps = timesteps[steps - max(1, round(steps * strength)):]
            z = scheduler.add_noise(z_start, noise, timesteps[:1].repeat(len(noise)))
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
               callback: Callback | None = None, samples: int | None = None, noise_scale: float | None = None,
               return_agreement: bool = False, tta: str | None = None, sieve: int | None = None,
               flip_margin: float | None = None, area_match: float | None = None, class_reach: int | None = None):
        """Refine one image or a list of images.

        Args:
            image: (H, W, C) uint8/uint16/float array (float in [0, 1]), or a list of them.
            coarse: (H, W) class-index map (``IGNORE_INDEX`` = nodata) or (K, H, W) probabilities; or a list.
            steps, guidance, strength: DDIM steps, CFG scale (1 = no CFG), SDEdit strength in (0, 1];
                defaults from the model's config (``sample_steps``, ``guidance_scale``, ``strength``).
            generator: CPU ``torch.Generator`` for the noise (same seed and inputs give the same map).
            return_probs: also return the blended (K, H, W) float32 probabilities.
            batch_size: tiles per network batch (for a list: taken across the images; each image's noise is drawn from
                ``generator`` in turn, in chunks of ``batch_size`` tiles, as for one image at a time).
            callback: ``callback(step, t, x0_hat)`` after every sampling step (analyses; see ``sample``).
            samples: S > 1 draws S samples per tile in one batch and averages their probabilities (a posterior-mean
                estimate instead of one noisy sample); default ``config.samples``.
            noise_scale: multiplies the starting noise (0: deterministic zero-noise start); default
                ``config.noise_scale``.
            return_agreement: also return the (H, W) float32 share of the S samples whose label equals the returned
                one (1 everywhere for S = 1): a per-pixel confidence.
            tta: test-time augmentation, "none", "flips" (4 passes) or "d4" (8 passes); the probabilities are
                averaged over the transforms (default ``config.tta``).
            class_reach, area_match, flip_margin, sieve: post-processing, in that order (defaults from the config;
                :func:`idgbr.inference.postprocess.finish_labels`): only classes the coarse map holds within
                ``class_reach`` px (0: any; the returned probabilities too); class areas pulled towards the coarse
                map's, 0 (off) to 1; the refined label only where its probability beats the coarse label's by more
                than ``flip_margin``; regions under ``sieve`` px merged into their largest neighbour.
        Returns:
            (H, W) uint8 index map (nodata pixels stay ``IGNORE_INDEX``), or a tuple ``(map, probs)``, ``(map,
            agreement)`` or ``(map, probs, agreement)``; lists for list input.
        """
        settings = self._settings(steps, guidance, strength, batch_size, samples, noise_scale, tta, sieve, flip_margin,
                                  area_match, class_reach)
        post = self._post(settings)
        many = isinstance(image, (list, tuple))
        images = list(image) if many else [image]
        coarses = list(coarse) if isinstance(coarse, (list, tuple)) else [coarse]
        if len(images) != len(coarses):
            raise IdgbrError(f"{len(images)} images but {len(coarses)} coarse maps; give one coarse map per image")
        if not many:  # one image: its tiles in batches, tile by tile (the reference path)
            probs = self._refine_one(images[0], coarses[0], generator=generator, callback=callback, **settings)
            nodata = None if _is_soft(coarses[0]) else np.asarray(coarses[0]) == IGNORE_INDEX
            return self._finish(probs, nodata, return_probs, return_agreement, _hard(coarses[0]), **post)
        # several: windows batched across images; each image's noise is drawn from ``generator`` as above, in order
        jobs = (self._prepare(img, crs, generator, settings["batch_size"], settings["samples"], key=n)
                for n, (img, crs) in enumerate(zip(images, coarses)))
        return [self._finish(job.blender.result(), job.nodata, return_probs, return_agreement, job.coarse, **post)
                for job in self._refine_stream(jobs, callback=callback, **settings)]

    def _settings(self, steps: int | None, guidance: float | None, strength: float | None, batch_size: int,
                  samples: int | None, noise_scale: float | None, tta: str | None, sieve: int | None,
                  flip_margin: float | None = None, area_match: float | None = None,
                  class_reach: int | None = None) -> dict[str, Any]:
        """The sampling settings, defaults from the config, checked (one-line errors); :meth:`_post` takes the
        post-sampling ones out."""
        cfg = self.config
        steps = cfg.sample_steps if steps is None else int(steps)
        guidance = cfg.guidance_scale if guidance is None else float(guidance)
        strength = cfg.strength if strength is None else float(strength)
        samples = cfg.samples if samples is None else int(samples)
        noise_scale = cfg.noise_scale if noise_scale is None else float(noise_scale)
        sieve = check_sieve(cfg.sieve if sieve is None else sieve)
        margin = check_flip_margin(cfg.flip_margin if flip_margin is None else flip_margin)
        area = check_area_match(cfg.area_match if area_match is None else area_match)
        reach = check_class_reach(cfg.class_reach if class_reach is None else class_reach)
        if steps < 1 or not 0 < strength <= 1 or guidance < 0 or batch_size < 1 or samples < 1 or noise_scale < 0:
            raise IdgbrError(f"need steps >= 1, 0 < strength <= 1, guidance >= 0, batch_size >= 1, samples >= 1 and "
                             f"noise_scale >= 0; got steps={steps}, strength={strength}, guidance={guidance}, "
                             f"batch_size={batch_size}, samples={samples}, noise_scale={noise_scale}")
        check_noise_for_samples(samples, noise_scale)
        return dict(steps=steps, guidance=guidance, strength=strength, batch_size=int(batch_size), samples=samples,
                    noise_scale=noise_scale, tta=tta, sieve=sieve, flip_margin=margin, area_match=area,
                    class_reach=reach)

    @staticmethod
    def _post(settings: dict[str, Any]) -> dict[str, Any]:
        """The post-sampling settings popped out of :meth:`_settings`' dict, as :meth:`_finish` takes them."""
        return dict(sieve=settings.pop("sieve"), margin=settings.pop("flip_margin"), area=settings.pop("area_match"),
                    reach=settings.pop("class_reach"))

    def _finish(self, probs: np.ndarray, nodata: np.ndarray | None, return_probs: bool, return_agreement: bool,
                coarse: np.ndarray | None = None, sieve: int = 0, margin: float = 0.0, area: float = 0.0,
                reach: int = 0):
        """Labels (class reach, areas matched and flip margin against the (H, W) ``coarse`` labels, nodata 255,
        sieved) of blended (K + 1, H, W) probabilities, with the asked extras."""
        probs, agreement = probs[:self.config.num_classes], probs[self.config.num_classes]
        labels, probs = finish_labels(probs, coarse, nodata, sieve, margin, area, reach)
        extra = ([probs] if return_probs else []) + ([agreement] if return_agreement else [])
        return (labels, *extra) if extra else labels

    def _refine_one(self, image: np.ndarray, coarse: np.ndarray, steps: int, guidance: float, strength: float,
                    generator: torch.Generator | None, batch_size: int, callback: Callback | None = None,
                    samples: int = 1, noise_scale: float = 1.0, tta: str | None = None) -> np.ndarray:
        """Blended (K + 1, H, W) for one image, tile by tile: the class probabilities (the mean over ``samples``)
        and, last, the share of samples agreeing with the mean's label.

        The reference path: :meth:`_refine_stream` (lists, folders) must give the same maps for each image."""
        from ..nn.tiling import sliding_window

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
            agreement = _agreement(probs, mean)
            return torch.cat([mean, agreement[:, None]], 1)

        return sliding_window(predict, stacked, cfg.num_classes + 1, tile=cfg.tile_size, overlap=cfg.tile_overlap,
                              batch_size=batch_size, multiple=cfg.size_multiple)

    # ----------------------------------------------------------------------------------------------------------
    # Batching across images: per-image preparation (noise as the per-image path draws it), shared batches.
    # ----------------------------------------------------------------------------------------------------------
    def _prepare(self, image: np.ndarray, coarse: np.ndarray, generator: torch.Generator | None, batch_size: int,
                 samples: int, key: Any = None) -> "_Job":
        """Check one image and cut it into model-ready tiles: the image tiles (input dtype), the prior tiles and
        each tile's starting noise (S, C_lat, h/f, w/f), drawn from ``generator`` exactly as :meth:`_refine_one`
        draws it (chunks of ``batch_size`` tiles, sample-major within a chunk), so batching across images leaves
        every tile's noise as it was. Runs in the reading thread of :meth:`refine_folder`."""
        from ..nn.tiling import Blender, pad_to_multiple, tile_grid

        cfg = self.config
        nodata = None if _is_soft(coarse) else np.asarray(coarse) == IGNORE_INDEX
        image, coarse = self._check_inputs(image, coarse)
        bands = image.shape[-1]
        stacked = torch.from_numpy(np.concatenate([np.moveaxis(image, -1, 0).astype(np.float32),
                                                   coarse.astype(np.float32)]))
        soft = coarse.shape[0] > 1
        dtype = torch.from_numpy(np.empty(0, dtype=image.dtype)).dtype  # tiles go back to the input dtype
        height, width = image.shape[:2]
        windows = tile_grid(height, width, cfg.tile_size, cfg.tile_overlap)
        tiles, crop = [], (slice(None), slice(None))
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            batch = torch.stack([stacked[:, w.row:w.bottom, w.col:w.right] for w in chunk])
            batch, crop = pad_to_multiple(batch, cfg.size_multiple, mode="reflect")
            z_shape = self._latent_shape(batch.shape[-2:])
            noise = torch.stack([torch.randn(z_shape, generator=generator) for _ in range(samples * len(chunk))])
            noise = noise.unflatten(0, (samples, len(chunk)))
            pixels = batch[:, :bands].to(dtype)
            prior = batch[:, bands:] if soft else _one_hot(batch[:, bands].long(), cfg.num_classes)
            tiles += [(pixels[i], prior[i], noise[:, i]) for i in range(len(chunk))]
        blender = Blender(cfg.num_classes + 1, height, width, (windows[0].height, windows[0].width), cfg.tile_overlap)
        return _Job(key, windows, tiles, crop, blender, nodata, _hard(coarse))

    def _refine_stream(self, jobs: Iterable["_Job"], steps: int, guidance: float, strength: float, batch_size: int,
                       samples: int, noise_scale: float, tta: str | None,
                       callback: Callback | None = None) -> Iterator["_Job"]:
        """Sample the tiles of a stream of prepared images in batches of ``batch_size`` taken across images; yield
        each image (its ``blender`` complete) in input order once all its tiles are blended.

        Tiles wait in one queue per tile shape (and dtype) until a batch is full; at most ``batch_size + 1`` images
        are open at once (the oldest one's queue is then run part-full). An exception raised by ``jobs`` is re-raised
        after the images before it are finished and yielded (so a folder run writes them, as it did in series)."""
        from collections import deque

        queues: dict[Any, deque] = {}
        open_jobs: deque = deque()
        max_open = batch_size + 1

        def run(key: Any) -> None:
            items = [queues[key].popleft() for _ in range(min(batch_size, len(queues[key])))]
            image = torch.stack([job.tiles[n][0] for job, n in items]).to(self.device)
            prior = torch.stack([job.tiles[n][1] for job, n in items]).to(self.device)
            noise = torch.stack([job.tiles[n][2] for job, n in items], 1).flatten(0, 1)  # sample-major (S B, ...)
            logits = self.sample(image, prior, steps, guidance, strength, noise.to(self.device), callback, noise_scale,
                                 tta)
            probs = torch.softmax(logits.float(), dim=1).unflatten(0, (samples, len(items)))  # (S, B, K, h, w)
            mean = probs.mean(0)
            agreement = _agreement(probs, mean)
            out = torch.cat([mean, agreement[:, None]], 1).float().cpu()
            for (job, n), tile in zip(items, out):
                job.blender.add(job.windows[n], tile[..., job.crop[0], job.crop[1]])
                job.done += 1

        def finished() -> Iterator[_Job]:
            while open_jobs and open_jobs[0].done == len(open_jobs[0].tiles):
                job = open_jobs.popleft()
                job.tiles = []  # free the inputs before the output is handed on
                yield job

        def finish_oldest() -> Iterator[_Job]:
            oldest = open_jobs[0]
            while oldest.done < len(oldest.tiles):
                run(oldest.queue_key)
            yield from finished()

        error = None
        iterator = iter(jobs)
        while True:
            try:
                job = next(iterator)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - raised once the images before it are done
                error = exc
                break
            job.queue_key = (tuple(job.tiles[0][0].shape), job.tiles[0][0].dtype, tuple(job.tiles[0][1].shape))
            open_jobs.append(job)
            queue = queues.setdefault(job.queue_key, deque())
            queue.extend((job, n) for n in range(len(job.tiles)))
            while len(queue) >= batch_size:
                run(job.queue_key)
            yield from finished()
            while len(open_jobs) > max_open:
                yield from finish_oldest()
        while open_jobs:
            yield from finish_oldest()
        if error is not None:
            raise error

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
                      seed: int = 0, skip_existing: bool = False, progress: bool = True, read_ahead: int = 2,
                      **kw: Any) -> list[Path]:
        """Refine every image of a dataset split into ``out_dir/<stem>.png``; each image is seeded with ``seed``.

        See :func:`idgbr.inference.folder.refine_folder`, which this runs."""
        from .folder import refine_folder

        return refine_folder(self, data_root, split, coarse_name, out_dir, seed=seed, skip_existing=skip_existing,
                             progress=progress, read_ahead=read_ahead, **kw)


@dataclasses.dataclass(eq=False)
class _Job:
    """One image in :meth:`Refiner._refine_stream`: its windows, model-ready tiles ``(image, prior, noise)``, the
    crop of a padded tile back to its window, the blending accumulators and the nodata mask of its coarse map."""

    key: Any
    windows: list
    tiles: list
    crop: tuple[slice, slice]
    blender: Any
    nodata: np.ndarray | None
    coarse: np.ndarray | None = None  # the (H, W) coarse labels (argmax of soft ones), for the flip margin
    done: int = 0
    queue_key: Any = None


def _hard(coarse: Any) -> np.ndarray:
    """(H, W) coarse labels of an index map ((H, W) or (1, H, W)) or of (K, H, W) probabilities (their argmax)."""
    array = np.asarray(coarse)
    if _is_soft(array):
        return array.argmax(0).astype(np.uint8)
    return array[0] if array.ndim == 3 else array


def _is_soft(coarse: Any) -> bool:
    array = np.asarray(coarse)
    return array.ndim == 3 and array.dtype.kind == "f"


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) indices -> (B, K, H, W) float one-hot; ``IGNORE_INDEX`` (nodata) gives all zeros."""
    valid = labels != IGNORE_INDEX
    out = torch.nn.functional.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2).float()
    return out * valid[:, None]
