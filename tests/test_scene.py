"""Whole-scene refinement: GeoTIFF round trip, nodata, seams, noise field, gating, resume, soft/N-band input, CLI.

Most tests replace ``Refiner.sample`` by a cheap deterministic function of the tile (the tests check I/O and
tiling invariants, not quality); one round trip and the CLI test run an untrained tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
torch = pytest.importorskip("torch")

from rasterio.transform import from_origin  # noqa: E402

from idgbr.commands.main import main  # noqa: E402
from idgbr.nn.config import RefinerConfig  # noqa: E402
from idgbr.errors import IdgbrError  # noqa: E402
from idgbr.nn.model import IDGBRModel  # noqa: E402
from idgbr.inference.pipeline import Refiner  # noqa: E402
from idgbr.inference.seams import NoiseField, gate_band, seam_score  # noqa: E402
from idgbr.inference.scene import refine_scene
from idgbr.inference.scene_io import sidecar_paths

K = 3
CRS = "EPSG:32633"
TRANSFORM = from_origin(500000.0, 4600000.0, 10.0, 10.0)
H, W = 70, 90  # not multiples of the latent factor: windows are laid on the padded canvas


def write_tif(path, array, nodata=None, crs=CRS, transform=TRANSFORM):
    array = np.asarray(array)
    array = array[None] if array.ndim == 2 else array
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(array)
    return path


def truth_map(h=H, w=W):
    """Diagonal stripes and a disc: every class crosses tile borders."""
    rows, cols = np.mgrid[:h, :w]
    truth = ((rows + cols) // 23 % 2).astype(np.uint8)
    truth[(rows - 35) ** 2 + (cols - 45) ** 2 < 15 ** 2] = 2
    return truth


@pytest.fixture()
def scene(tmp_path):
    """A 3-band uint8 GeoTIFF (nodata 0 on a 3 px border and a corner block) and its coarse map (255 holes)."""
    truth = truth_map()
    palette = np.array([[40, 90, 30], [200, 180, 160], [20, 60, 200]], np.uint8)
    image = np.moveaxis(palette[truth], -1, 0).copy()
    image[:, :3], image[:, :, :3] = 0, 0
    image[:, 38:, 58:] = 0  # a nodata corner containing a whole tile
    coarse = np.roll(truth, 2, axis=1)
    coarse[10:14, 40:44] = 255
    return {"image": write_tif(tmp_path / "scene.tif", image, nodata=0),
            "coarse": write_tif(tmp_path / "coarse.tif", coarse, nodata=255),
            "truth": truth, "nodata": (image == 0).all(0) | (coarse == 255), "coarse_map": coarse}


def tiny_refiner(channels=3, seed=0):
    torch.manual_seed(seed)
    return Refiner(IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=K, image_channels=channels)))


class FakeSampler:
    """Stands in for ``Refiner.sample``: logits from the tile's content (``mode="content"``, class = brightest band
    pattern) or from the starting noise (``mode="noise"``); records every call."""

    def __init__(self, mode="content"):
        self.mode, self.calls, self.noises, self.priors, self.ttas = mode, 0, [], [], []

    def __call__(self, image, coarse, steps, guidance, strength, noise, tta="none"):
        self.calls += len(image)
        self.ttas.append(tta)
        self.noises.append(noise.clone())
        self.priors.append(coarse.clone())
        if self.mode == "noise":
            up = noise[:, :K].repeat_interleave(4, -2).repeat_interleave(4, -1)
            return 10 * up
        x = image.float()
        label = torch.where(x[:, 2] > 180, 2, torch.where(x[:, 0] > 120, 1, 0))
        return 10 * torch.nn.functional.one_hot(label, K).permute(0, 3, 1, 2).float()


def fake_refiner(mode="content"):
    refiner = tiny_refiner()
    refiner.sample = FakeSampler(mode)
    return refiner


def read(path):
    with rasterio.open(path) as src:
        return src.read(1), src.profile


def test_geotiff_round_trip_and_nodata(scene, tmp_path):
    out = tmp_path / "out" / "refined.tif"
    summary = refine_scene(tiny_refiner(), scene["image"], scene["coarse"], out, steps=1, guidance=1, strength=0.5,
                           batch_size=12, progress=False)
    labels, profile = read(out)
    assert profile["crs"].to_string() == CRS and profile["transform"] == TRANSFORM
    assert (profile["height"], profile["width"]) == (H, W) and profile["nodata"] == 255
    assert profile["tiled"] and profile["compress"] == "deflate"
    np.testing.assert_array_equal(labels == 255, scene["nodata"])
    assert labels[~scene["nodata"]].max() < K
    assert summary["skipped_nodata"] >= 1 and summary["computed"] + summary["skipped_nodata"] == summary["tiles"]
    assert not any(p.exists() for p in sidecar_paths(out).values())
    assert [p.name for p in out.parent.iterdir()] == ["refined.tif"]  # no temporary files left


def test_blending_leaves_no_seam(scene, tmp_path):
    out = tmp_path / "refined.tif"
    refine_scene(fake_refiner(), scene["image"], scene["coarse"], out, tile=32, overlap=8, progress=False)
    labels, _ = read(out)
    valid = ~scene["nodata"]
    np.testing.assert_array_equal(labels[valid], scene["truth"][valid])  # windows pasted at the right place
    score = seam_score(labels, 32, 8)
    assert score == seam_score(np.where(valid, scene["truth"], 255), 32, 8)
    # the score sees seams: shift every other tile column by one class
    seamy = scene["truth"].copy()
    seamy[:, 24:48] = (seamy[:, 24:48] + 1) % K
    assert seam_score(seamy, 32, 8)["ratio"] > 1.5 * seam_score(scene["truth"], 32, 8)["ratio"]
    assert seam_score(np.zeros((64, 64), np.uint8), 32, 8) == {"border_rate": 0.0, "interior_rate": 0.0, "ratio": 1.0}


def test_tta_reaches_every_tile_and_is_checked(scene, tmp_path):
    refiner = fake_refiner()
    refine_scene(refiner, scene["image"], scene["coarse"], tmp_path / "a.tif", tile=32, overlap=8, progress=False)
    assert set(refiner.sample.ttas) == {"none"}  # the model's default
    refiner = fake_refiner()
    refine_scene(refiner, scene["image"], scene["coarse"], tmp_path / "b.tif", tile=32, overlap=8, progress=False,
                 tta="d4")
    assert refiner.sample.ttas and set(refiner.sample.ttas) == {"d4"}
    with pytest.raises(IdgbrError, match="unknown tta"):
        refine_scene(refiner, scene["image"], scene["coarse"], tmp_path / "c.tif", tile=32, progress=False, tta="x")
    assert not (tmp_path / "c.tif").exists()


def test_overlapping_tiles_get_identical_noise(scene, tmp_path):
    field = NoiseField(seed=3, channels=4, block=8)
    whole = field.cut(0, 0, 0, 40, 40)
    torch.testing.assert_close(field.cut(0, 5, 13, 20, 17), whole[:, 5:25, 13:30])
    assert not torch.equal(NoiseField(3, 4, 8).cut(1, 0, 0, 40, 40), whole)  # samples draw other fields
    # the fake's output is the sign pattern of the scene noise: identical across tiles iff the noise is
    refiner = fake_refiner("noise")
    refine_scene(refiner, scene["image"], scene["coarse"], tmp_path / "a.tif", tile=32, overlap=8, seed=5, progress=False)
    labels, _ = read(tmp_path / "a.tif")
    channels = refiner.sample.noises[0].shape[1]
    expected = NoiseField(5, channels).cut(0, 0, 0, 18, 23)[:K].argmax(0)
    expected = expected.repeat_interleave(4, 0).repeat_interleave(4, 1)[:H, :W].numpy()
    valid = ~scene["nodata"]
    np.testing.assert_array_equal(labels[valid], expected[valid])


def test_gating_keeps_coarse_outside_band_and_skips_tiles(tmp_path):
    h, w = 64, 96
    coarse = np.zeros((h, w), np.uint8)
    coarse[4:12, 4:12] = 1  # the only boundary, in the first tile
    image = np.full((3, h, w), 100, np.uint8)
    image[0] = 200  # the fake predicts class 1 everywhere
    write_tif(tmp_path / "img.tif", image)
    write_tif(tmp_path / "c.tif", coarse)
    refiner = fake_refiner()
    summary = refine_scene(refiner, tmp_path / "img.tif", tmp_path / "c.tif", tmp_path / "g.tif", tile=32, overlap=8,
                           gate_width=2, progress=False)
    labels, _ = read(tmp_path / "g.tif")
    band = gate_band(coarse, 2)
    assert band.sum() > 0 and (labels[~band] == coarse[~band]).all()
    assert (labels[band] == 1).all()
    assert summary["skipped_gate"] == summary["tiles"] - 1 and refiner.sample.calls == 1
    assert summary["skipped_fraction"] == pytest.approx((summary["tiles"] - 1) / summary["tiles"])
    ungated = refine_scene(fake_refiner(), tmp_path / "img.tif", tmp_path / "c.tif", tmp_path / "u.tif", tile=32,
                           overlap=8, progress=False)
    assert ungated["skipped_fraction"] == 0 and (read(tmp_path / "u.tif")[0] == 1).all()


def test_resume_computes_only_missing_tiles(scene, tmp_path, monkeypatch):
    kw = dict(tile=32, overlap=8, batch_size=2, samples=2, progress=False)
    reference = refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], tmp_path / "ref.tif", **kw)
    out = tmp_path / "r.tif"

    def stop_after_two_batches():
        seen = []

        def callback(indices):
            seen.append(indices)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return callback

    with pytest.raises(KeyboardInterrupt):
        refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], out, callback=stop_after_two_batches(), **kw)
    assert not out.exists() and len(json.loads(sidecar_paths(out)["progress"].read_text())["done"]) == 4
    # a kill between the scratch update and the progress file: the journal rolls the batch back
    import idgbr.inference.scene as scene_module

    real_write, calls = scene_module._write_json, []

    def crash_on_second_progress(path, payload):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, payload)

    monkeypatch.setattr(scene_module, "_write_json", crash_on_second_progress)
    with pytest.raises(KeyboardInterrupt):
        refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], out, **kw)
    monkeypatch.setattr(scene_module, "_write_json", real_write)
    assert (sidecar_paths(out)["scratch"] / "journal.npz").exists()
    refiner = fake_refiner("noise")
    summary = refine_scene(refiner, scene["image"], scene["coarse"], out, **kw)
    assert summary["resumed"] and summary["done_before"] == 6
    assert summary["computed"] == reference["computed"] - 6 and refiner.sample.calls == 2 * summary["computed"]
    np.testing.assert_array_equal(read(out)[0], read(tmp_path / "ref.tif")[0])
    np.testing.assert_array_equal(read(tmp_path / "r_uncertainty.tif")[0], read(tmp_path / "ref_uncertainty.tif")[0])
    # other settings do not resume from stale sidecars
    with pytest.raises(KeyboardInterrupt):
        refine_scene(fake_refiner(), scene["image"], scene["coarse"], out, callback=stop_after_two_batches(), **kw)
    again = refine_scene(fake_refiner(), scene["image"], scene["coarse"], out, **{**kw, "samples": 1})
    assert not again["resumed"] and again["done_before"] == 0


def test_soft_coarse_input(scene, tmp_path):
    onehot = (scene["coarse_map"][None] == np.arange(K)[:, None, None]).astype(np.float32)
    soft = 0.8 * onehot + 0.2 / K
    write_tif(tmp_path / "soft.tif", soft)
    refiner = fake_refiner()
    refine_scene(refiner, scene["image"], tmp_path / "soft.tif", tmp_path / "s.tif", tile=32, overlap=8,
                 gate_width=1, confidence=0.5, progress=False)
    first = refiner.sample.priors[0][0]
    np.testing.assert_allclose(first[:, 3:32, 3:32].numpy(), soft[:, 3:32, 3:32], rtol=1e-6)  # probabilities reach the model
    assert (first[:, :3] == 0).all()  # nodata is never content
    labels, _ = read(tmp_path / "s.tif")
    assert labels[~scene["nodata"]].max() < K
    bad = soft.copy()
    bad[0, 20, 20] = np.nan
    write_tif(tmp_path / "nan.tif", bad)
    with pytest.raises(IdgbrError, match="nan.tif.*NaN"):
        refine_scene(refiner, scene["image"], tmp_path / "nan.tif", tmp_path / "x.tif", tile=32, overlap=8, progress=False)
    write_tif(tmp_path / "k2.tif", soft[:2])
    with pytest.raises(IdgbrError, match="k2.tif.*3 float32 bands"):
        refine_scene(refiner, scene["image"], tmp_path / "k2.tif", tmp_path / "x.tif", tile=32, overlap=8, progress=False)


def test_bad_inputs_name_file_and_fix(scene, tmp_path):
    refiner = fake_refiner()
    coarse = scene["coarse_map"]
    cases = {
        "small.tif": (coarse[:60], {}, "differs from the image"),
        "utm34.tif": (coarse, {"crs": "EPSG:32634"}, "reproject"),
        "shifted.tif": (coarse, {"transform": from_origin(500010.0, 4600000.0, 10.0, 10.0)}, "resample"),
        "classes.tif": (np.where(coarse == 2, 7, coarse).astype(np.uint8), {}, "outside the model's 3 classes"),
    }
    for name, (array, geo, message) in cases.items():
        write_tif(tmp_path / name, array, **geo)
        with pytest.raises(IdgbrError, match=f"{name}.*{message}"):
            refine_scene(refiner, scene["image"], tmp_path / name, tmp_path / "x.tif", progress=False)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(IdgbrError, match="broken.tif: unreadable"):
        refine_scene(refiner, tmp_path / "broken.tif", scene["coarse"], tmp_path / "x.tif", progress=False)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(IdgbrError, match="a_file.*writable --out"):
        refine_scene(refiner, scene["image"], scene["coarse"], tmp_path / "a_file" / "x.tif", progress=False)
    with pytest.raises(IdgbrError, match="scene.tif: 3 image bands but the model takes 4.*--bands 1,2,3,4"):
        refine_scene(tiny_refiner(channels=4), scene["image"], scene["coarse"], tmp_path / "x.tif", progress=False)


def test_png_scene_writes_png(scene, tmp_path):
    from PIL import Image

    with rasterio.open(scene["image"]) as src:
        Image.fromarray(np.moveaxis(src.read(), 0, -1)).save(tmp_path / "scene.png")
    Image.fromarray(scene["truth"]).save(tmp_path / "coarse.png")
    refine_scene(fake_refiner(), tmp_path / "scene.png", tmp_path / "coarse.png", tmp_path / "out.png", tile=32,
                 overlap=8, progress=False)
    labels = np.asarray(Image.open(tmp_path / "out.png"))
    assert labels.shape == (H, W) and labels.max() < K  # a PNG has no nodata value: the border is content


def test_cli_multispectral_bands_and_samples(scene, tmp_path, capsys):
    with rasterio.open(scene["image"]) as src:
        rgb = src.read()
    nir = np.where(rgb[0] > 0, 255 - rgb[1], 0).astype(np.uint8)
    write_tif(tmp_path / "ms.tif", np.concatenate([rgb, nir[None]]), nodata=0)
    tiny_refiner(channels=4).model.save_pretrained(tmp_path / "run4")
    out = tmp_path / "ms_refined.tif"
    common = ["refine", "--coarse", str(scene["coarse"]), "--steps", "1", "--strength", "0.5", "--guidance", "1",
              "--no-progress"]
    assert main([*common, "--model", str(tmp_path / "run4"), "--image", str(tmp_path / "ms.tif"), "--out", str(out),
                 "--samples", "3", "--tile", "32", "--overlap", "8", "--batch", "8"]) == 0
    assert "ms_refined_uncertainty.tif" in capsys.readouterr().out
    labels, _ = read(out)
    uncertainty, profile = read(tmp_path / "ms_refined_uncertainty.tif")
    assert profile["crs"].to_string() == CRS and profile["nodata"] == 255
    np.testing.assert_array_equal(uncertainty == 255, labels == 255)
    assert uncertainty[labels != 255].max() <= 67  # 0, 33 or 67 % of 3 samples disagree with the vote
    # a 3-band model on the 4-band scene needs --bands
    tiny_refiner(channels=3).model.save_pretrained(tmp_path / "run3")
    args = [*common, "--model", str(tmp_path / "run3"), "--image", str(tmp_path / "ms.tif"), "--out", str(tmp_path / "b.tif")]
    assert main(args) == 2 and "--bands 1,2,3" in capsys.readouterr().err
    assert main([*args, "--bands", "4,2,1"]) == 0 and read(tmp_path / "b.tif")[0].shape == (H, W)


def test_sieve_is_seam_free_across_row_bands(scene, tmp_path, monkeypatch):
    """Scene mode sieves each written row band with a halo: the result equals sieving the whole map at once."""
    import idgbr.inference.scene
    from idgbr.inference.postprocess import sieve_labels

    raw, banded = tmp_path / "raw.tif", tmp_path / "banded.tif"
    refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], raw, tile=32, overlap=8, progress=False,
                 sieve=0)
    monkeypatch.setattr(idgbr.inference.scene, "ROW_BAND", 8)  # many bands, each cutting regions
    refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], banded, tile=32, overlap=8, progress=False,
                 sieve=24)
    raw_labels, sieved = read(raw)[0], read(banded)[0]
    expected = sieve_labels(raw_labels, 24)
    assert not np.array_equal(expected, raw_labels)
    np.testing.assert_array_equal(sieved, expected)


@pytest.mark.parametrize("mode", ["model", "noise"])
def test_windows_in_flight_equal_the_serial_path(scene, tmp_path, monkeypatch, mode):
    """With tiles read ahead in a thread and each batch saved in another while the next is sampled, the map (and the
    uncertainty) equal the serial path's (read_ahead=0) bit for bit; reading runs ahead of the sampling."""
    import threading

    import idgbr.inference.scene as scene_module

    real_prepare, prepared = scene_module._prepare_tile, []

    def recording_prepare(*args, **kw):
        prepared.append(threading.current_thread().name)
        return real_prepare(*args, **kw)

    monkeypatch.setattr(scene_module, "_prepare_tile", recording_prepare)
    real_write_json, progress_writers = scene_module._write_json, []

    def recording_write_json(path, payload):
        progress_writers.append(threading.current_thread().name)
        real_write_json(path, payload)

    monkeypatch.setattr(scene_module, "_write_json", recording_write_json)
    kw = dict(tile=32, overlap=8, batch_size=2, steps=1, samples=2, noise_scale=1.0, gate_width=6, seed=3,
              progress=False)
    outputs, ahead = {}, []
    for read_ahead in (0, 3):
        refiner = tiny_refiner() if mode == "model" else fake_refiner("noise")
        real_sample = refiner.sample

        def sample(*args, **kwargs):
            if read_ahead and not ahead:  # the first batch waits until the reader has gone past it
                for _ in range(200):
                    if len(prepared) > 3 * 2:
                        break
                    threading.Event().wait(0.01)
                ahead.append(len(prepared))
            return real_sample(*args, **kwargs)

        refiner.sample = sample
        prepared.clear()
        progress_writers.clear()
        out, batches = tmp_path / f"ahead{read_ahead}.tif", []
        summary = refine_scene(refiner, scene["image"], scene["coarse"], out, read_ahead=read_ahead,
                               callback=batches.append, **kw)
        outputs[read_ahead] = (read(out)[0], read(tmp_path / f"ahead{read_ahead}_uncertainty.tif")[0], summary,
                               batches)
        here = threading.current_thread().name
        assert set(prepared) == ({"idgbr-scene-read"} if read_ahead else {here})
        # the progress file: first and last written here, after each batch by the writing thread
        assert progress_writers == [here] + [("idgbr-scene-write_0" if read_ahead else here)] * len(batches) + [here]
    (labels0, unc0, sum0, batches0), (labels3, unc3, sum3, batches3) = outputs[0], outputs[3]
    assert batches3 == batches0 and sum(map(len, batches0)) == sum0["computed"]
    assert sum0["computed"] > 4 and sum0["skipped_gate"] + sum0["skipped_nodata"] > 0  # several batches, skips
    np.testing.assert_array_equal(labels3, labels0)
    np.testing.assert_array_equal(unc3, unc0)
    assert {k: v for k, v in sum3.items() if k not in ("out", "uncertainty", "seconds")} == \
        {k: v for k, v in sum0.items() if k not in ("out", "uncertainty", "seconds")}
    assert ahead and ahead[0] > 2  # more tiles were read than the first batch holds: windows in flight
    assert not any(p.exists() for p in sidecar_paths(tmp_path / "ahead3.tif").values())


def test_flip_margin_keeps_coarse_where_the_refiner_is_unsure(scene, tmp_path):
    """Scene mode applies the flip margin when it writes: a margin no refiner can beat leaves the coarse map, a
    small one keeps the refined labels the fake sampler is sure of (its logits are one-hot x 10)."""
    plain, sure, never = tmp_path / "plain.tif", tmp_path / "sure.tif", tmp_path / "never.tif"
    for out, margin in ((plain, 0.0), (sure, 0.5), (never, 0.9999999)):
        refine_scene(fake_refiner(), scene["image"], scene["coarse"], out, tile=32, overlap=8, progress=False,
                     flip_margin=margin)
    valid = ~scene["nodata"]
    plain_map, sure_map, never_map = (read(p)[0] for p in (plain, sure, never))
    assert (plain_map[valid] != scene["coarse_map"][valid]).sum() > 50
    np.testing.assert_array_equal(sure_map, plain_map)
    np.testing.assert_array_equal(never_map[valid], scene["coarse_map"][valid])
    with pytest.raises(IdgbrError, match="--flip-margin"):
        refine_scene(fake_refiner(), scene["image"], scene["coarse"], tmp_path / "bad.tif", progress=False,
                     flip_margin=-0.1)


def test_class_reach_in_scene_mode_is_seam_free(scene, tmp_path, monkeypatch):
    """Scene mode with class_reach R: every written label is a class the coarse map holds within R px, a pixel
    whose plain label is such a class keeps it, and row bands of 8 rows write the same map (each band reads the
    coarse map with a halo: the disc of class 2 starts 6 rows below a band edge); a bad reach is one line."""
    import idgbr.inference.scene
    from idgbr.inference.postprocess import reach_mask

    plain, reached, banded = tmp_path / "plain.tif", tmp_path / "reached.tif", tmp_path / "banded.tif"
    refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], plain, tile=32, overlap=8, progress=False,
                 class_reach=0)
    refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], reached, tile=32, overlap=8,
                 progress=False, class_reach=6)
    monkeypatch.setattr(idgbr.inference.scene, "ROW_BAND", 8)
    refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], banded, tile=32, overlap=8,
                 progress=False, class_reach=6)
    plain, reached, banded = read(plain)[0], read(reached)[0], read(banded)[0]
    np.testing.assert_array_equal(banded, reached)
    allowed = reach_mask(scene["coarse_map"], 6, K)
    written = reached != 255
    rows, cols = np.nonzero(written)
    assert allowed[reached[rows, cols], rows, cols].all()
    ok = written & allowed[np.minimum(plain, K - 1), np.arange(plain.shape[0])[:, None], np.arange(plain.shape[1])]
    np.testing.assert_array_equal(reached[ok], plain[ok])
    assert (reached != plain).sum() > 20  # the noise sampler puts classes far from the coarse map's: not vacuous
    with pytest.raises(IdgbrError, match="--class-reach"):
        refine_scene(fake_refiner(), scene["image"], scene["coarse"], tmp_path / "bad.tif", progress=False,
                     class_reach=-3)


def test_area_match_brings_the_scene_class_areas_towards_the_coarse_map(scene, tmp_path):
    """Scene mode fits one offset per class on the whole scene: the written map's class areas (a third each: the
    fake sampler's labels follow its noise) move towards the coarse map's; strength 0 writes the plain map; a bad
    strength is one line."""
    plain, off, matched = tmp_path / "plain.tif", tmp_path / "off.tif", tmp_path / "matched.tif"
    for out, area in ((plain, None), (off, 0.0), (matched, 1.0)):
        refine_scene(fake_refiner("noise"), scene["image"], scene["coarse"], out, tile=32, overlap=8, progress=False,
                     **({} if area is None else {"area_match": area}))
    valid = ~scene["nodata"]
    maps = {p: read(p)[0] for p in (plain, off, matched)}
    np.testing.assert_array_equal(maps[off], maps[plain])
    target = np.bincount(scene["coarse_map"][valid], minlength=K)
    gap = {p: np.abs(np.bincount(m[valid], minlength=K) - target).sum() for p, m in maps.items()}
    assert gap[matched] < 0.5 * gap[plain], gap
    np.testing.assert_array_equal(maps[matched] == 255, maps[plain] == 255)
    with pytest.raises(IdgbrError, match="--area-match"):
        refine_scene(fake_refiner(), scene["image"], scene["coarse"], tmp_path / "bad.tif", progress=False,
                     area_match=2.0)
