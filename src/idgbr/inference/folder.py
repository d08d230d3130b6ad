"""Refining a whole dataset split: :func:`refine_folder` (what ``Refiner.refine_folder`` runs), with reading and
tiling ahead in one thread and labelling, sieving and writing in another, beside the compute."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from ..data.dataset import IGNORE_INDEX, SegmentationDataset, probs_folder
from ..data.io import write_label
from ..errors import IdgbrError

if TYPE_CHECKING:
    from .pipeline import Refiner, _Job


def refine_folder(refiner: "Refiner", data_root: str | Path, split: str | None, coarse_name: str | None,
                  out_dir: str | Path, seed: int = 0, skip_existing: bool = False, progress: bool = True, read_ahead: int = 2,
                  **kw: Any) -> list[Path]:
    """Refine every image of a dataset split into ``out_dir/<stem>.png``; each image is seeded with ``seed``.

    Windows are batched across images (``batch_size`` tiles per network call, whatever the image they come from);
    each image's noise is drawn from its own ``torch.Generator().manual_seed(seed)`` exactly as ``refine`` draws
    it for that image alone, so the maps are those of one ``refine`` call per image (up to the last bits of
    batched arithmetic). Reading and tiling run ``read_ahead`` images ahead in a thread, labelling, sieving and
    writing in another (0: reading in series with the compute). ``kw``: ``refine``'s sampling settings.

    ``coarse_name`` may be None only for an image-only model (``use_coarse=False``, the paper's Experiment A). A
    model trained on soft coarse input (``soft_coarse``) reads the maps' probabilities where the folder has them
    (``<coarse>_probs/``, as ``idgbr predict-coarse --probs npy`` writes them), else the labels.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from .background import ReadAhead

    if coarse_name is None and refiner.config.use_coarse:
        raise IdgbrError("this model refines coarse maps: give --coarse NAME (a folder under DATA/coarse/)")
    callback = kw.pop("callback", None)
    settings = refiner._settings(kw.pop("steps", None), kw.pop("guidance", None), kw.pop("strength", None),
                                 kw.pop("batch_size", 4), kw.pop("samples", None), kw.pop("noise_scale", None),
                                 kw.pop("tta", None), kw.pop("sieve", None), kw.pop("flip_margin", None),
                                 kw.pop("area_match", None), kw.pop("class_reach", None))
    if kw:
        raise IdgbrError(f"refine_folder: unknown options {sorted(kw)}")
    post = refiner._post(settings)
    dataset = SegmentationDataset(data_root, split, coarse=coarse_name, load_mask=False)
    soft = bool(coarse_name) and refiner.config.soft_coarse and probs_folder(dataset.coarse_dir).is_dir()
    out_dir = Path(out_dir)
    targets = [out_dir / f"{stem}.png" for stem in dataset.stems]
    todo = [index for index, target in enumerate(targets) if not (skip_existing and target.exists())]
    refiner._latent_shape((refiner.config.size_multiple,) * 2)  # probe the model here, not in the reading thread

    def read() -> Iterator[_Job]:
        for index in todo:
            sample = dataset[index]
            coarse = sample["coarse"] if coarse_name else np.zeros(sample["image"].shape[:2], np.uint8)
            try:
                given = dataset.read_coarse_probs(dataset.stems[index], coarse.shape) if soft else coarse
                job = refiner._prepare(sample["image"], given, torch.Generator().manual_seed(seed),
                                       settings["batch_size"], settings["samples"], key=index)
                if soft:  # the labels' nodata stays nodata
                    job.nodata = coarse == IGNORE_INDEX
                yield job
            except IdgbrError as exc:  # name the offending image
                raise IdgbrError(f"{dataset.image_path(dataset.stems[index])}: {exc}") from None

    def write(job: _Job) -> None:
        labels = refiner._finish(job.blender.result(), job.nodata, False, False, job.coarse, **post)
        write_label(targets[job.key], labels)

    bar = tqdm(total=len(targets), initial=len(targets) - len(todo), desc="refine", unit="img",
               disable=not progress)
    with ReadAhead(read(), depth=read_ahead, name="idgbr-refine-read") as jobs, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="idgbr-refine-write") as writer:
        writes: deque = deque()
        for job in refiner._refine_stream(jobs, callback=callback, **settings):
            writes.append(writer.submit(write, job))
            while len(writes) > 2 or (writes and writes[0].done()):
                writes.popleft().result()
                bar.update(1)
        while writes:
            writes.popleft().result()
            bar.update(1)
    bar.close()
    return targets
