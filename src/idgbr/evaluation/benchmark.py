"""The full protocol on any canonical dataset (issue 4 §3), with the two controls a reviewer asks for.

For each coarse architecture A:
1. train A on ``train``; 2. predict coarse maps on ``train`` and ``test`` (with ``coarse_folds`` K >= 2 the train
maps are out-of-fold: :func:`idgbr.training.coarse.predict_coarse_oof`);
3. train the refiner on ``train``: on A's coarse maps of its own training images mixed with synthetic ones, or (the
lite default, ``coarse_corruption`` 1) on synthetic degradations of the ground truth only, once for every A;
4. refine ``test``; 5. evaluate coarse and refined maps.
Controls: the *deterministic refiner* (the same network and inputs trained with cross-entropy instead of diffusion)
and, on request, *image only* (no coarse guidance, the paper's Experiment A; trained once).

Every stage writes ``<stage dir>/stage.json`` with its parameters when it finishes; a rerun into the same RUN
reuses finished stages whose parameters match.

On a CPU with two or more threads, the shared refiner and its deterministic control (and then the coarse models) are
trained side by side, in two processes of half the threads each (:func:`train_side_by_side`): the lite networks are
too small to keep two threads busy, so two trainings at one thread each finish in about the time one takes at two.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import IdgbrError
from .benchmark_report import write_reports
from .coarse_tracks import check_coarse_track, coarse_stages, import_coarse_track


AUTO_FOLDS = 3  # out-of-fold folds when the refiner learns from real errors and nothing else brings them


@dataclass
class BenchmarkSettings:
    coarse_archs: Sequence[str] = ("deeplabv3plus", "unet")
    preset: str = "lite"
    coarse_encoder: str | None = "tu-mobilenetv3_small_100"  # None: smp's default (resnet18), ~3x slower on CPU
    # the coarse encoder's starting weights: None (random), a local weights file, or "imagenet" (the packaged
    # ImageNet weights, for tu-tf_efficientnet_lite0: strong coarse models on any RGB data set in one command)
    coarse_encoder_weights: str | None = None
    coarse_iters: int = 200
    coarse_crop: int = 256
    coarse_batch: int = 4
    refiner_steps: int | None = None  # training steps (None: the preset's)
    # Sampling: the fast mode (4 DDIM steps from pure noise, no CFG: 4 network evaluations per tile instead of the
    # paper's 50). None falls back to the preset's defaults (25 steps, CFG 3).
    sample_steps: int | None = 4
    guidance: float | None = 1.0
    strength: float | None = 1.0
    samples: int | None = None  # samples averaged per tile (None: the model's config)
    noise_scale: float | None = None  # starting-noise scale (None: the model's config)
    tta: str | None = None  # test-time augmentation "none" / "flips" / "d4" (None: the model's config)
    # Minimum mapping unit (idgbr.inference.postprocess; None: the refiner config's, lite 0). Applied when scoring: the
    # refined folders hold the raw maps, and the report also scores them unsieved ("unsieved").
    sieve: int | None = None
    flip_margin: float | None = None  # refined labels only where surer than the coarse label by this (None: config's)
    area_match: float | None = None  # pull class areas towards the coarse map's, 0-1 (None: the config's)
    class_reach: int | None = None  # only classes the coarse map holds within this many px (None: the config's)
    controls: bool = True
    image_only: bool = False  # with controls: also the image-only control (it does not depend on the coarse maps)
    gate_width: int | None = 8  # also score the gated maps (refined within this many px of coarse boundaries)
    seed: int = 0
    # 0: in-sample train maps; K >= 2: K-fold out-of-fold maps (the coarse models' real errors on images they did not
    # see). None: AUTO_FOLDS when the refiner learns from real errors (coarse_corruption < 1) and no track brings
    # them, else 0.
    coarse_folds: int | None = None
    coarse_fold_group: str | None = None  # regex: stems with the same match share a fold (e.g. r"tile\d+")
    # Complete coarse tracks made beforehand (e.g. committed fixtures of a converged model): folders with a map for
    # every train and test stem and a provenance.json ('idgbr predict-coarse --folds K --with-test'). When given, they
    # replace the coarse stages above (coarse_archs and coarse_folds are not used).
    coarse_maps: Sequence[str] = ()
    # Real errors: the shared refiner (and its control) train on the train maps of these complete coarse tracks,
    # pooled (each image once per track), mixed with synthetic degradations at the config's coarse_corruption; one
    # refiner then serves every coarse model of the run. Empty: the refiner trains as the config says.
    refiner_coarse_maps: Sequence[str] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # RefinerConfig fields
    device: str = "auto"  # where the refiners and coarse models run (idgbr.nn.device); training picks its own
    # Train the shared refiner and its control side by side (train_side_by_side): None = where it pays (a CPU with
    # >= 2 threads), False = one after the other with every thread, True = always (tests).
    side_by_side: bool | None = None


class Stages:
    """Run-once stages recorded by ``stage.json`` files (parameters + seconds)."""

    def __init__(self, run: Path, log: Callable[[str], None] = print):
        self.run = run
        self.log = log
        self.seconds: dict[str, float] = {}

    @staticmethod
    def finished(folder: Path, params: dict) -> dict | None:
        """The record ``folder/stage.json`` of a finished run with ``params``, or None (outputs outside the folder are
        not checked here)."""
        marker = folder / "stage.json"
        if not marker.exists():
            return None
        done = json.loads(marker.read_text())
        return done if _comparable(done.get("params")) == _comparable(json.loads(json.dumps(params, default=str))) else None

    @staticmethod
    def finished_params(folder: Path) -> str | None:
        """A short digest of the parameters ``folder/stage.json`` records, or None when it has none."""
        import hashlib

        marker = folder / "stage.json"
        if not marker.exists():
            return None
        params = json.loads(marker.read_text()).get("params")
        return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]

    def __call__(self, name: str, folder: Path, params: dict, fn: Callable[[], Any],
                 fingerprint: Callable[[], str] | None = None) -> float:
        """Run ``fn`` unless ``folder`` records a finished run with ``params``. ``fingerprint`` digests outputs that
        live outside the run folder (coarse maps under ``DATA/coarse/``, which another run may overwrite): a
        finished stage whose outputs no longer match it is run again."""
        marker = folder / "stage.json"
        params = json.loads(json.dumps(params, default=str))
        done = self.finished(folder, params)
        if done is not None:
            if fingerprint is None or done.get("fingerprint") == fingerprint():
                self.log(f"[reuse] {name} ({folder})")
                self.seconds[name] = done.get("seconds", 0.0)
                return self.seconds[name]
            self.log(f"[redo] {name}: its output changed since it ran (another run wrote there)")
        self.log(f"[stage] {name}")
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        folder.mkdir(parents=True, exist_ok=True)
        from ..data.io import atomic_path

        with atomic_path(marker) as tmp:
            record = {"params": params, "seconds": seconds}
            if fingerprint is not None:
                record["fingerprint"] = fingerprint()
            tmp.write_text(json.dumps(record, indent=2))
        self.seconds[name] = seconds
        return seconds


def refiner_config(data_root: Path, preset: str, steps: int | None, seed: int, overrides: dict[str, Any]):
    """A RefinerConfig whose classes and bands come from the dataset."""
    from ..nn.config import RefinerConfig
    from ..data.dataset import SegmentationDataset

    dataset = SegmentationDataset(data_root, "train", load_mask=False)
    bands = dataset[0]["image"].shape[-1]
    values = dict(num_classes=dataset.classes.num_classes, image_channels=bands, seed=seed)
    if steps is not None:
        values["steps"] = steps
    values.update(overrides)
    return RefinerConfig.preset_config(preset, **values)


def control_config(config):
    """The deterministic control of a refiner config: every field the same (the network, the image encoder switch
    and its fine-tuning, REPA, the inputs, the budget), trained with cross-entropy instead of diffusion."""
    return config.replace(objective="deterministic")


def train_and_refine(stages: Stages, data_root: Path, run: Path, name: str, config, coarse: str | None,
                     settings: BenchmarkSettings, pooled: Sequence[str] = ()) -> dict:
    """Train one refiner, refine the test split with it, evaluate; returns the evaluation result.

    A refiner that trains on synthetic coarse maps only (``coarse_corruption`` 1) never reads the coarse model's
    maps, so it is trained once, as ``<kind>_synthetic``, and shared by every coarse model; so is one trained on the
    ``pooled`` coarse maps (names under ``DATA/coarse/``), as ``<kind>_pooled``."""
    from .evaluate import evaluate_folder
    from ..inference.pipeline import Refiner

    model_dir = refiner_stage(stages, data_root, run, name, config, coarse, pooled=pooled)
    pred_dir = run / "refined" / name
    # the post-sampling settings come from this benchmark's config, not from the reused model's saved one
    infer = {"steps": settings.sample_steps, "guidance": settings.guidance, "strength": settings.strength,
             "samples": settings.samples, "noise_scale": settings.noise_scale, "tta": settings.tta,
             **post_sampling(settings, config)}
    # the refiner's training record is part of the key: a refiner retrained in place (other --set values) must not
    # be scored with the maps its predecessor refined
    trained = Stages.finished_params(model_dir)
    stages(f"refine test with {name}", pred_dir, {"model": str(model_dir), "trained": trained, "coarse": coarse, **infer},
           lambda: Refiner.from_pretrained(model_dir, device=settings.device).refine_folder(
               data_root, "test", coarse, pred_dir, **infer, sieve=0))
    coarse_dir = data_root / "coarse" / coarse if coarse else None
    sieve = config.sieve if settings.sieve is None else settings.sieve
    result = evaluate_folder(data_root, pred_dir, "test", coarse_dir=coarse_dir, sieve=sieve)
    if sieve > 1:
        result["unsieved"] = evaluate_folder(data_root, pred_dir, "test", coarse_dir=coarse_dir)
    if coarse_dir is not None and settings.gate_width is not None:
        result["gated"] = evaluate_folder(data_root, pred_dir, "test", coarse_dir=coarse_dir,
                                          gate_width=settings.gate_width, sieve=sieve)
    return result


def refiner_stage(stages: Stages, data_root: Path, run: Path, name: str, config, coarse: str | None,
                  pooled: Sequence[str] = (), **progress: Any) -> Path:
    """Train (or reuse) the refiner that ``name`` refines with; returns its folder. One trained on synthetic coarse
    maps only is named ``<kind>_synthetic``, one trained on the ``pooled`` coarse tracks ``<kind>_pooled``; both
    are shared by every coarse model. ``progress``: tqdm options of :func:`idgbr.training.loop.train_refiner`."""
    from ..training.loop import train_refiner

    synthetic = config.use_coarse and config.coarse_corruption >= 1  # (coarse is None only for image-only models)
    if config.use_coarse and pooled and not synthetic:
        model_name, train_coarse = f"{name.split('_')[0]}_pooled", list(pooled)
    else:
        model_name, train_coarse = (f"{name.split('_')[0]}_synthetic", None) if synthetic else (name, coarse)
    model_dir = run / "refiners" / model_name
    stages(f"train refiner {model_name}", model_dir, refiner_params(config, train_coarse),
           lambda: train_refiner(config, data_root, train_coarse, model_dir, resume=True, **progress))
    return model_dir


# Training fields added after refiners were trained and recorded, with the default that keeps the earlier behaviour.
_ADDED_LATER = {"overpaint": 0.0}
# Config fields applied after sampling: a trained refiner is reused whatever they are.
POST_SAMPLING = ("sieve", "area_match", "flip_margin", "class_reach")


def post_sampling(settings: BenchmarkSettings, config) -> dict[str, Any]:
    """The flip margin, area match and class reach the test maps are refined with: the benchmark's flags, else its
    config's (the sieve is applied when scoring)."""
    return {key: getattr(config, key) if getattr(settings, key) is None else getattr(settings, key)
            for key in ("flip_margin", "area_match", "class_reach")}


def _comparable(params: Any) -> Any:
    """Stage parameters as they are compared: a refiner's config without its post-sampling fields, and without
    the fields of ``_ADDED_LATER`` at their defaults."""
    if not (isinstance(params, dict) and isinstance(params.get("config"), dict)):
        return params
    config = {key: value for key, value in params["config"].items() if key not in POST_SAMPLING
              and not (key in _ADDED_LATER and value == _ADDED_LATER[key])}
    return {**params, "config": config}


def refiner_params(config, train_coarse: str | Sequence[str] | None) -> dict:
    """What a refiner's training stage records (and must match to be reused). The fields of ``POST_SAMPLING`` are
    applied after sampling, so a refiner trained before they existed (or with other values) is reused; so is one
    trained before a training field of ``_ADDED_LATER`` existed, while that field keeps its default."""
    coarse = train_coarse if isinstance(train_coarse, (str, type(None))) else list(train_coarse)
    return _comparable({"config": config.to_dict(), "coarse": coarse})


def side_by_side_threads(settings: BenchmarkSettings, config, pooled: Sequence[str] = ()) -> int:
    """Threads per process when the shared refiner and its control train side by side, or 0 (one after the other).

    Only refiners trained on synthetic maps are shared, and so known before any coarse model exists; on a GPU (or
    one CPU thread) two trainings would only share the same device, so there they run one after the other."""
    import torch

    shared = config.coarse_corruption >= 1 or bool(pooled)
    if settings.side_by_side is False or not settings.controls or not config.use_coarse or not shared:
        return 0
    if settings.side_by_side is None and (torch.cuda.is_available() or torch.get_num_threads() < 2):
        return 0
    return max(1, torch.get_num_threads() // 2)


def refiners_trained(run: Path, config, pooled: Sequence[str] = ()) -> bool:
    """Whether the shared diffusion refiner and its control already trained in ``run`` (a rerun, or refiners copied
    in to score another coarse track): then there is nothing to put side by side."""
    suffix, coarse = ("pooled", list(pooled)) if pooled and config.coarse_corruption < 1 else ("synthetic", None)
    return all(Stages.finished(run / "refiners" / f"{kind}_{suffix}", refiner_params(c, coarse)) is not None
               for kind, c in (("diffusion", config), ("deterministic", control_config(config))))


def train_side_by_side(stages: Stages, data_root: Path, run: Path, settings: BenchmarkSettings, config,
                       archs: Sequence[str], threads: int, pooled: Sequence[str] = ()) -> None:
    """Run the training stages of a benchmark in two processes of ``threads`` threads each: the shared diffusion
    refiner and then the coarse models ``archs`` in one, the deterministic control in the other (it trains the
    same steps at ~1.3x the step time, so the two finish close together). The stages write their usual
    ``stage.json``, so the benchmark then reuses them. A failure in either stops both and raises here."""
    import dataclasses
    import os
    import subprocess
    import tempfile

    lanes = [[["refiner", "diffusion", config.to_dict()], *[["coarse", arch] for arch in archs]],
             [["refiner", "deterministic", control_config(config).to_dict()]]]
    stages.log(f"[side by side] the diffusion refiner{' and the coarse models' if archs else ''} | the deterministic "
               f"control: 2 processes x {threads} thread(s) (--sequential: one after the other)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start, procs = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for position, lane in enumerate(lanes):
                spec = Path(tmp) / f"lane{position}.json"
                spec.write_text(json.dumps({"data_root": str(data_root), "run": str(run), "threads": threads,
                                            "position": position, "lane": lane, "pooled": list(pooled),
                                            "settings": dataclasses.asdict(settings)}))
                # a fresh interpreter (not multiprocessing): no re-import of the caller's __main__, any thread count
                procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from idgbr.evaluation.benchmark import "
                                               "train_lane; sys.exit(train_lane(sys.argv[1]))", str(spec)], env=env))
            while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
                time.sleep(0.5)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                proc.wait()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        what = ["diffusion refiner / coarse models", "deterministic control"][failed[0][0]]
        raise IdgbrError(f"training side by side failed in the {what} process (exit code {failed[0][1]}; its error is "
                         f"above); rerun the same command to resume, or add --sequential")
    stages.log(f"[side by side] done in {time.perf_counter() - start:.0f} s")


def train_lane(spec_file: str) -> int:
    """One process of :func:`train_side_by_side`: run the stages listed in ``spec_file``; returns an exit code."""
    import torch

    from ..nn.config import RefinerConfig

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    data_root, run = Path(spec["data_root"]), Path(spec["run"])
    settings = BenchmarkSettings(**spec["settings"])
    stages = Stages(run, log=lambda message: print(message, flush=True))
    try:
        for kind, name, *config in spec["lane"]:
            if kind == "refiner":  # a shared refiner: synthetic maps only, or the pooled tracks' train maps
                refiner_stage(stages, data_root, run, name, RefinerConfig.from_dict(config[0]), None,
                              pooled=spec.get("pooled", ()), progress_desc=f"train {name}",
                              progress_position=spec["position"])
            else:
                coarse_stages(stages, data_root, run, name, settings)
    except IdgbrError as exc:
        print(f"idgbr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def run_benchmark(data_root: str | Path, run: str | Path, settings: BenchmarkSettings,
                  log: Callable[[str], None] = print) -> dict:
    """Run the protocol and write ``RUN/report.json`` and ``RUN/report.md``; returns the report dict."""
    from .evaluate import evaluate_folder

    import dataclasses

    wall_start = time.perf_counter()
    data_root, run = Path(data_root), Path(run)
    shared = refiner_config(data_root, settings.preset, settings.refiner_steps, settings.seed, settings.overrides)
    real_errors = shared.use_coarse and shared.coarse_corruption < 1
    if settings.coarse_folds is None:
        auto = real_errors and not settings.coarse_maps and not settings.refiner_coarse_maps
        settings = dataclasses.replace(settings, coarse_folds=AUTO_FOLDS if auto else 0)
    if not (data_root / "classes.json").exists():
        raise IdgbrError(f"{data_root}: not a prepared dataset (no classes.json); run 'idgbr prepare' first")
    if settings.coarse_folds:  # a bad K fails now, not after the first refiner has trained
        from ..training.coarse import fold_stems
        from ..data.dataset import SegmentationDataset

        fold_stems(SegmentationDataset(data_root, "train", load_mask=False).stems, settings.coarse_folds,
                   flag="--coarse-folds", group=settings.coarse_fold_group)
    # a bad track fails now, before anything is trained or written
    checked = {str(Path(f)): check_coarse_track(data_root, Path(f))
               for f in (*settings.coarse_maps, *settings.refiner_coarse_maps)}
    from ..nn.device import resolve_device

    resolve_device(settings.device)  # a bad --device fails now
    run.mkdir(parents=True, exist_ok=True)
    stages = Stages(run, log)
    pooled = [import_coarse_track(stages, data_root, run, Path(f), checked[str(Path(f))])[0]
              for f in settings.refiner_coarse_maps]
    results = []
    image_only = None
    if settings.controls and settings.image_only:
        config = refiner_config(data_root, settings.preset, settings.refiner_steps, settings.seed,
                                {**settings.overrides, "use_coarse": False})
        image_only = train_and_refine(stages, data_root, run, "image_only", config, None, settings)
    sources = [(Path(folder), None) for folder in settings.coarse_maps] or [(None, a) for a in settings.coarse_archs]
    tags: dict[int, tuple[str, str]] = {}  # coarse maps made before the refiner trains (they are its data)
    if real_errors and not pooled and (settings.coarse_maps or settings.coarse_folds):
        # one refiner learns from the real errors of every coarse model of the run: their out-of-fold train maps
        for index, (folder, arch) in enumerate(sources):
            tags[index] = (import_coarse_track(stages, data_root, run, folder, checked[str(folder)]) if folder is not None
                           else (coarse_stages(stages, data_root, run, arch, settings), arch))
        pooled = [tag for tag, _ in tags.values()]
    elif real_errors and not pooled:
        log("[note] the refiner learns real errors from each coarse model's in-sample train maps, which are cleaner "
            "than its test maps; --coarse-folds K gives out-of-fold ones")
    threads = side_by_side_threads(settings, shared, pooled)
    if threads and refiners_trained(run, shared, pooled):
        threads = 0
    if threads:
        train_side_by_side(stages, data_root, run, settings, shared,
                           [] if settings.coarse_maps or tags else list(settings.coarse_archs), threads, pooled)
    for index, (folder, arch) in enumerate(sources):
        if index in tags:
            tag, arch = tags[index]
        elif folder is not None:
            tag, arch = import_coarse_track(stages, data_root, run, folder, checked[str(folder)])
        else:
            tag = coarse_stages(stages, data_root, run, arch, settings)
        coarse_eval = evaluate_folder(data_root, data_root / "coarse" / tag, "test")
        coarse_train = evaluate_folder(data_root, data_root / "coarse" / tag, "train")
        config = shared
        label = arch if folder is None else tag  # two committed tracks may share an architecture
        refined = train_and_refine(stages, data_root, run, f"diffusion_{label}", config, tag, settings, pooled)
        entry: dict[str, Any] = {"coarse_arch": arch, "coarse": _strip(coarse_eval), "refined": _strip(refined),
                                 "coarse_train": _strip(coarse_train), "coarse_folds": settings.coarse_folds,
                                 "coarse_fold_group": settings.coarse_fold_group,
                                 "repair": refined.get("repair", {}),
                                 "coarse_corruption": config.coarse_corruption,
                                 **({"refiner_pool": list(pooled)} if pooled and real_errors else {}),
                                 **({"refiner_coarse_maps": list(settings.refiner_coarse_maps)}
                                    if settings.refiner_coarse_maps else {})}
        if folder is not None:
            provenance = json.loads((folder / "provenance.json").read_text())
            entry.update(coarse_maps=str(folder), coarse_folds=provenance.get("folds", 0),
                         coarse_fold_group=provenance.get("settings", {}).get("fold_group"),
                         coarse_provenance=provenance.get("command") or provenance.get("settings"))
        if "gated" in refined:
            entry["gated"] = refined["gated"]
        if "unsieved" in refined:  # the raw maps, before the sieve (what the sieve costs and buys)
            entry["unsieved"] = _strip(refined["unsieved"])
            entry["unsieved_repair"] = refined["unsieved"].get("repair", {})
        if settings.controls:
            det = train_and_refine(stages, data_root, run, f"deterministic_{label}",
                                   control_config(config), tag, settings, pooled)
            entry["controls"] = {**({"image_only": _strip(image_only)} if image_only else {}),
                                 "deterministic": _strip(det)}
            if "gated" in det:
                entry["controls"]["deterministic_gated"] = det["gated"]
            if "unsieved" in det:
                entry["controls"]["deterministic_unsieved"] = _strip(det["unsieved"])
            entry["control_repair"] = det.get("repair", {})
        entry["seconds"] = {k: round(v, 1) for k, v in stages.seconds.items()
                            if label in k or "image_only" in k or "synthetic" in k}
        entry["settings"] = {"preset": settings.preset, "sample_steps": settings.sample_steps,
                             "guidance": settings.guidance, "strength": settings.strength,
                             "gate_width": settings.gate_width,
                             "sieve": config.sieve if settings.sieve is None else settings.sieve,
                             **post_sampling(settings, config)}
        results.append(entry)
    report = {"results": results, "wall_seconds": round(time.perf_counter() - wall_start, 1),
              "side_by_side_threads": threads}
    write_reports(run, report)
    return report


def _strip(result: dict | None) -> dict:
    if result is None:
        return {}
    return {k: v for k, v in result.items() if k not in ("repair", "gated", "unsieved")}
