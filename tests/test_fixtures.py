"""The committed coarse tracks (fixtures/coarse) are complete and say how they were made."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRACKS = sorted(p for p in (ROOT / "fixtures" / "coarse").glob("*/*_*") if p.is_dir())


def test_there_are_tracks_for_both_coarse_architectures():
    assert {t.name for t in TRACKS} >= {f"{arch}_{kind}" for arch in ("deeplabv3plus", "unet")
                                       for kind in ("converged", "pretrained")}


@pytest.mark.parametrize("track", TRACKS, ids=lambda t: t.name)
def test_track_is_complete_and_out_of_fold(track):
    provenance = json.loads((track / "provenance.json").read_text())
    assert provenance["kind"] == "idgbr-coarse-oof" and provenance["command"].startswith("idgbr predict-coarse")
    assert track.name.startswith(provenance["settings"]["arch"])
    train = sorted(s for fold in provenance["fold_models"] for s in fold["held_out"])
    test = provenance["test"]["stems"]
    assert sorted(p.stem for p in track.glob("*.png")) == sorted(train + test)
    for fold in provenance["fold_models"]:
        tiles = {s.split("_")[0] for s in fold["held_out"]}
        assert not tiles & {s.split("_")[0] for s in fold["trained_on"]}  # whole source tiles held out
        assert fold["validation"][-1]["iter"] == provenance["settings"]["iters"]
    pretrained = provenance["settings"].get("encoder_weights") == "imagenet" or "--encoder-weights imagenet" in provenance["command"]
    assert pretrained == track.name.endswith("_pretrained")
    classes = 6  # the Dubai set's classes
    for path in sorted(track.glob("*.png"))[:: 7]:
        label = np.array(Image.open(path))
        assert label.ndim == 2 and label.dtype == np.uint8 and label.max() < classes
