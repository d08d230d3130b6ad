"""Refine an archive of GeoTIFF scenes on dask.distributed: one task per scene, resumable, nothing done twice.

    >>> from idgbr.inference.archive import find_pairs, refine_archive
    >>> manifest = refine_archive(find_pairs("scenes/", "coarse/"), "refined/", model="runs/lite", workers=2)

* **Engine.** ``client.map`` over the scenes on a ``dask.distributed`` cluster: the scheduler balances scenes over
  workers as they free up and reruns the task of a worker that dies. By default a :func:`local_cluster` (one
  worker process per GPU on a GPU host, else one; spawn start method; ``GDAL_CACHEMAX`` = :data:`GDAL_CACHEMAX_MB`
  per worker; torch threads = cores / workers); ``scheduler=ADDRESS`` uses an existing cluster (dask-jobqueue on
  SLURM, dask-kubernetes: ``docs/archive.md``). Tasks receive paths, never datasets, and each scene is one
  :func:`idgbr.inference.scene.refine_scene` call; tile reads overlap the network in a thread (a worker is daemonic).
* **Outputs.** ``OUT/<stem>.tif`` per scene, written by ``refine_scene`` under a temporary name and renamed, so
  a final path never holds a partial file; ``OUT/manifest.json`` (rewritten atomically after each scene) records
  per scene ``status`` (``done``, ``failed``, ``skipped`` when done by an earlier job), ``seconds``, ``tiles``,
  ``error`` and where it ran.
* **Nothing lost, nothing done twice.** A scene whose output exists is skipped; a half-done one resumes from its
  ``<out>.progress.json`` sidecar, on whichever worker gets it. While a task refines a scene it holds
  ``<out>.lock`` (pid, host, a heartbeat per tile batch): a second attempt of the same scene (dask runs a task at
  least once; a worker of a killed job may still be finishing) waits for it and then finds the output done. A lock
  whose process is dead (same host) or whose heartbeat is older than ``stale_after`` seconds (another host) is
  taken over.
* **One job per folder.** The job holds ``OUT/.idgbr-archive.lock`` (pid, host); a second job on the same folder
  refuses with a one-line error; a lock left by a dead job on this host is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import IdgbrError, file_error
from ..data.io import atomic_path
from .locks import Lock

__all__ = ["Pair", "find_pairs", "read_pairs", "refine_archive", "local_cluster", "refine_task"]

MANIFEST = "manifest.json"
JOB_LOCK = ".idgbr-archive.lock"
GDAL_CACHEMAX_MB = 256
STALE_AFTER = 600.0  # seconds without a heartbeat after which another host's scene lock is taken over
SUFFIXES = (".tif", ".tiff")
OPTIONS = ("tile", "overlap", "steps", "guidance", "strength", "noise_scale", "tta", "sieve", "flip_margin",
           "area_match", "class_reach", "seed",
           "batch_size", "gate_width", "bands")


# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """A scene, its coarse map (``None``: none matched; the scene fails) and its stem (the output's name)."""

    stem: str
    image: Path
    coarse: Path | None


def _by_stem(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise file_error(folder, "not a folder", f"give {role} as a folder of GeoTIFFs (or --pairs CSV)")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
            if path.stem in found:
                raise file_error(path, f"stem {path.stem!r} also names {found[path.stem].name}",
                                 "rename one: scenes and coarse maps are matched by file stem")
            found[path.stem] = path.resolve()
    return found


def find_pairs(scenes: str | Path, coarse: str | Path) -> list[Pair]:
    """The GeoTIFFs of ``scenes`` with the coarse map of the same stem in ``coarse`` (sorted by stem)."""
    images, maps = _by_stem(Path(scenes), "SCENES"), _by_stem(Path(coarse), "COARSE")
    if not images:
        raise file_error(scenes, "no GeoTIFF (.tif/.tiff) in this folder", "give the folder of the scenes")
    return [Pair(stem, path, maps.get(stem)) for stem, path in images.items()]


def read_pairs(csv_path: str | Path) -> list[Pair]:
    """Pairs from a CSV of ``image,coarse`` paths (a header row is optional; relative paths are relative to the
    CSV's folder); the output is named by the image's stem, which must be unique."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise file_error(csv_path, "file not found", "give --pairs a CSV of image,coarse paths")
    pairs: dict[str, Pair] = {}
    with open(csv_path, newline="") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            row = [cell.strip() for cell in row]
            if not any(row) or (number == 1 and [c.lower() for c in row[:2]] == ["image", "coarse"]):
                continue
            if len(row) != 2:
                raise file_error(csv_path, f"line {number} has {len(row)} fields", "write two per line: image,coarse")
            image, coarse = ((csv_path.parent / cell).resolve() for cell in row)
            stem = image.stem
            if stem in pairs:
                raise file_error(csv_path, f"line {number}: stem {stem!r} appears twice",
                                 "outputs are named by the image's stem; rename one image")
            pairs[stem] = Pair(stem, image, coarse)
    if not pairs:
        raise file_error(csv_path, "no pairs", "write one image,coarse line per scene")
    return list(pairs.values())


# ----------------------------------------------------------------------------------------------------------------
# Scene locks (idgbr.inference.locks)
# ----------------------------------------------------------------------------------------------------------------
def scene_lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


# ----------------------------------------------------------------------------------------------------------------
# The task (runs on a worker: paths in, a JSON-able dict out)
# ----------------------------------------------------------------------------------------------------------------
_REFINERS: dict[str, Any] = {}


def _worker_device() -> str:
    """The GPU of this worker (``cuda:<worker name mod GPUs>``: a local cluster names its workers 0..N-1), else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ValueError, TypeError):  # not in a worker, or a cluster that names workers otherwise: its one GPU
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _worker_refiner(model: str):
    if model not in _REFINERS:
        from .pipeline import Refiner

        _REFINERS.clear()
        _REFINERS[model] = Refiner.from_pretrained(model, device=_worker_device())
    return _REFINERS[model]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_tiles(height: int, width: int, tile: int, overlap: int, factor: int) -> int:
    from ..nn.tiling import tile_grid

    return len(tile_grid(-(-height // factor) * factor, -(-width // factor) * factor, tile, overlap))


def refine_task(job: dict[str, Any]) -> dict[str, Any]:
    """Refine one scene (``job``: stem, image, coarse, out, model, shipped, threads, options, stale_after).

    Returns status ``done`` (this task wrote it), ``exists`` (the output was already there: an earlier attempt
    finished it) or ``failed`` with the one-line error, and the timings (``seconds`` includes the imports and the
    model load of a worker's first scene; ``load_seconds`` is the model load)."""
    started = time.time()
    import rasterio
    import torch

    from .scene import refine_scene
    from .scene_io import sidecar_paths

    result: dict[str, Any] = {"stem": job["stem"], "status": "failed", "seconds": 0.0, "tiles": None, "computed": 0,
                              "resumed_tiles": 0, "error": None, "host": socket.gethostname(), "pid": os.getpid(),
                              "started": started}
    try:
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX_MB * 2 ** 20):
            out = Path(job["out"])
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise file_error(out.parent, f"cannot create the output folder ({exc.strerror})", "choose a writable OUT") from None
            lock = Lock(scene_lock_path(out))
            lock.acquire(job.get("stale_after", STALE_AFTER))
            try:
                if out.exists():  # an earlier attempt finished it (only stale sidecars may be left)
                    import shutil

                    paths = sidecar_paths(out)
                    shutil.rmtree(paths["scratch"], ignore_errors=True)
                    paths["progress"].unlink(missing_ok=True)
                    result["status"] = "exists"
                else:
                    if job["shipped"]:
                        from ..nn.zoo import shipped_refiner

                        shipped_refiner(coarse=Path(job["coarse"]), announce=False)
                    loading = time.time()
                    refiner = _worker_refiner(job["model"])
                    result["load_seconds"] = time.time() - loading
                    options = dict(job["options"])
                    summary = refine_scene(refiner, job["image"], job["coarse"], out, progress=False,
                                           callback=lock.touch, read_ahead=2, **options)
                    result.update(status="done", tiles=summary["tiles"], computed=summary["computed"],
                                  resumed_tiles=summary["done_before"])
            finally:
                lock.release()
    except IdgbrError as exc:
        result["error"] = str(exc)
    except MemoryError:
        result["error"] = f"{job['image']}: out of memory; use a smaller --tile or --batch, or fewer --workers"
    except Exception as exc:  # noqa: BLE001 - one scene's bug must not stop the archive; reported in the manifest
        first = str(exc).splitlines()[0] if str(exc) else ""
        result["error"] = f"{job['image']}: internal error: {type(exc).__name__}: {first} (please report it)"
    result.update(seconds=time.time() - started, finished=time.time(), peak_rss_mb=round(_peak_rss_mb(), 1))
    return result


# ----------------------------------------------------------------------------------------------------------------
# The cluster
# ----------------------------------------------------------------------------------------------------------------
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker per GPU on a GPU host, else one."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def default_threads(workers: int) -> int:
    return max(1, _cores() // max(1, workers))


def local_cluster(workers: int | None = None, threads: int | None = None):
    """A ``LocalCluster`` of ``workers`` spawned worker processes, one task at a time each (torch gets ``threads``
    threads: cores / workers by default), ``GDAL_CACHEMAX`` bounded per worker, no dashboard; workers import
    idgbr (and torch) while they start, not during their first scene."""
    import dask
    from distributed import LocalCluster

    workers = workers or default_workers()
    threads = threads or default_threads(workers)
    dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
    env = {"GDAL_CACHEMAX": str(GDAL_CACHEMAX_MB), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env,
                        preload=["idgbr.inference.scene"])


@contextlib.contextmanager
def _client(client, scheduler: str | None, workers: int | None, threads: int | None) -> Iterator[tuple[Any, int | None]]:
    """(client, torch threads per task): the given client, one connected to ``scheduler``, or a local cluster's."""
    if client is not None:
        yield client, threads
        return
    from distributed import Client

    if scheduler is not None:
        try:
            remote = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise IdgbrError(f"--scheduler {scheduler}: cannot connect ({str(exc).splitlines()[0][:100]}); start the "
                             "cluster first or check the address (tcp://HOST:8786)") from None
        with remote:
            yield remote, threads
        return
    workers = workers or default_workers()
    threads = threads or default_threads(workers)
    with local_cluster(workers, threads) as cluster, Client(cluster) as local:
        yield local, threads


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------
def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    counts: dict[str, int] = {}
    for entry in manifest["scenes"].values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    manifest["counts"], manifest["updated"] = counts, time.strftime("%Y-%m-%dT%H:%M:%S")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def _model_settings(model: str | None) -> tuple[str, bool, Any]:
    """(what workers load, shipped?, config): a run folder becomes an absolute path; a bad one fails here, once."""
    from ..nn.config import RefinerConfig
    from ..nn.zoo import DEFAULT_REFINER, resolve_model

    shipped = model is None
    path = resolve_model(DEFAULT_REFINER if shipped else model, "refiner",
                         "point --model at a run folder written by 'idgbr train'")
    if not (path / "config.json").exists():
        raise file_error(path, "no config.json (not a finished run)", "point --model at a run folder written by 'idgbr train'")
    return (DEFAULT_REFINER if shipped else str(path.resolve())), shipped, RefinerConfig.load(path / "config.json")


def refine_archive(pairs: list[Pair], out: str | Path, model: str | None = None, *, workers: int | None = None,
                   threads: int | None = None, scheduler: str | None = None, client=None, progress: bool = True,
                   stale_after: float = STALE_AFTER, **options: Any) -> dict[str, Any]:
    """Refine every pair into ``out/<stem>.tif`` on dask (see the module docstring); returns the manifest, with
    ``job`` (the statuses of this job's scenes) and ``wall_seconds`` added.

    ``model`` None: the shipped refiner, for the scenes whose classes fit it (the others fail). ``options``:
    :data:`OPTIONS` of :func:`idgbr.inference.scene.refine_scene` (None: the model's default). ``client``: an existing
    ``distributed.Client`` (else ``scheduler`` ADDRESS, else a :func:`local_cluster` of ``workers``)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise IdgbrError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    options = {key: value for key, value in options.items() if value is not None}
    out = Path(out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_error(out, f"cannot create the output folder ({exc.strerror})", "choose a writable OUT") from None
    targets = {pair.stem: out / f"{pair.stem}.tif" for pair in pairs}
    inputs = {p for pair in pairs for p in (pair.image, pair.coarse) if p is not None}
    clash = next((t for t in targets.values() if t in inputs), None)
    if clash is not None:
        raise file_error(clash, "an output would overwrite an input", "choose an OUT folder apart from the inputs")
    model_ref, shipped, config = _model_settings(model)
    settings = _settings(model_ref, options, config)
    job_lock = Lock(out / JOB_LOCK)
    holder = job_lock.try_acquire()
    if holder is not None:
        raise file_error(out / JOB_LOCK, f"another refine-archive job (pid {holder.get('pid')} on {holder.get('host')}) "
                         "is writing to this folder", "wait for it to finish or choose another OUT (delete the lock "
                         "file only if that job is gone)")
    start = time.time()
    try:
        for part in out.glob(".*.part"):  # a killed write's temporary file (never at a final path)
            part.unlink(missing_ok=True)
        manifest_path = out / MANIFEST
        manifest = {"settings": settings, "scenes": {}}
        if manifest_path.exists():
            try:
                previous = json.loads(manifest_path.read_text())
            except ValueError:
                previous = {}
            if previous.get("settings") not in (None, settings) and any(
                    (out / f"{stem}.tif").exists() for stem in previous.get("scenes", {})):
                raise file_error(manifest_path, "this folder holds scenes refined with other settings or another model",
                                 "rerun with the same settings, or choose another OUT")
            manifest["scenes"] = previous.get("scenes", {})
        tile = options.get("tile", config.tile_size)
        overlap = options.get("overlap", config.tile_overlap)
        jobs, entries = [], manifest["scenes"]
        for pair in pairs:
            target = targets[pair.stem]
            entry = {"image": str(pair.image), "coarse": str(pair.coarse) if pair.coarse else None, "out": str(target),
                     "status": "pending", "seconds": 0.0, "tiles": None, "error": None}
            if pair.coarse is None:
                entry.update(status="failed", error=f"{pair.image}: no coarse map with the stem {pair.stem!r}; add "
                                                    f"COARSE/{pair.stem}.tif or list the pair in --pairs")
            elif target.exists():
                entry.update(status="skipped", tiles=_tiles_of(target, tile, overlap, config.latent_factor))
            else:
                jobs.append({"stem": pair.stem, "image": str(pair.image), "coarse": str(pair.coarse), "out": str(target),
                             "model": model_ref, "shipped": shipped, "options": options, "stale_after": stale_after})
            entries[pair.stem] = entry
        _write_manifest(manifest_path, manifest)
        if jobs:
            with _client(client, scheduler, workers, threads) as (dask_client, task_threads):
                _run_jobs(dask_client, jobs, task_threads, manifest, manifest_path, tile, overlap, config, progress)
        manifest["wall_seconds"] = time.time() - start
        manifest["job"] = {pair.stem: entries[pair.stem]["status"] for pair in pairs}
        _write_manifest(manifest_path, manifest)
    finally:
        job_lock.release()
    return manifest


def _settings(model: str, options: dict[str, Any], config) -> dict[str, Any]:
    """What decides the refined maps, defaults resolved (the batch size does not: tiles are independent)."""
    defaults = {"tile": config.tile_size, "overlap": config.tile_overlap, "steps": config.sample_steps,
                "guidance": config.guidance_scale, "strength": config.strength, "noise_scale": config.noise_scale,
                "tta": config.tta, "sieve": config.sieve, "flip_margin": config.flip_margin,
                "area_match": config.area_match, "class_reach": config.class_reach, "seed": 0,
                "gate_width": None, "bands": None}
    return {"model": model, **{key: options.get(key, default) for key, default in defaults.items()}}


def _tiles_of(path: Path, tile: int, overlap: int, factor: int) -> int | None:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return count_tiles(src.height, src.width, tile, overlap, factor)
    except Exception:  # noqa: BLE001 - only a count for the manifest
        return None


def _run_jobs(client, jobs: list[dict[str, Any]], threads: int | None, manifest: dict[str, Any], manifest_path: Path,
              tile: int, overlap: int, config, progress: bool) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    for job in jobs:
        job["threads"] = threads
    run = uuid.uuid4().hex[:8]  # keys unique to this job: a reused cluster never hands back an older result
    submitted = time.time()
    futures = client.map(refine_task, jobs, key=[f"idgbr-refine-{job['stem']}-{run}" for job in jobs], retries=0)
    stems = {future.key: job["stem"] for future, job in zip(futures, jobs)}
    entries = manifest["scenes"]
    with tqdm(total=len(futures), desc="scenes", unit="scene", disable=not progress) as bar:
        for future in as_completed(futures):
            stem = stems[future.key]
            try:
                result = {**future.result(), "received": time.time()}
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the scene killed its worker repeatedly
                result = {"status": "failed", "error": f"{entries[stem]['image']}: the task failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); rerun the "
                          "same command to retry it"}
            if result["status"] == "exists":  # finished by an earlier attempt of this job's task
                result.update(status="done", tiles=_tiles_of(Path(entries[stem]["out"]), tile, overlap,
                                                              config.latent_factor))
            result.pop("stem", None)
            result["submitted"] = submitted
            entries[stem].update(result)
            _write_manifest(manifest_path, manifest)
            future.release()
            bar.update(1)
