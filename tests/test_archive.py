"""``idgbr refine-archive`` on dask.distributed: two local workers, the manifest, skip and resume, bad scenes, a
worker killed mid-scene, a task run twice, and the one-job-per-folder lock.

One module-scoped ``LocalCluster`` of two spawned worker processes (one torch thread each) serves every test that
needs a cluster; scenes are 96 x 96 GeoTIFFs refined by an untrained tiny model in 32 px tiles (16 tiles each).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
torch = pytest.importorskip("torch")
distributed = pytest.importorskip("distributed")

from rasterio.transform import from_origin  # noqa: E402

from idgbr.inference import archive  # noqa: E402
from idgbr.inference.archive import JOB_LOCK, MANIFEST, find_pairs, read_pairs, refine_archive, refine_task  # noqa: E402
from idgbr.inference.locks import Lock  # noqa: E402
from idgbr.commands.main import main  # noqa: E402
from idgbr.nn.config import RefinerConfig  # noqa: E402
from idgbr.errors import IdgbrError  # noqa: E402
from idgbr.nn.model import IDGBRModel  # noqa: E402
from idgbr.inference.pipeline import Refiner  # noqa: E402
from idgbr.inference.scene import refine_scene  # noqa: E402

K, SIZE = 3, 96
CRS, TRANSFORM = "EPSG:32633", from_origin(500000.0, 4600000.0, 10.0, 10.0)
SETTINGS = dict(tile=32, overlap=8, batch_size=2)  # 16 tiles, 8 batches per scene
CLI_SETTINGS = ["--tile", "32", "--overlap", "8", "--batch", "2", "--threads", "1", "--no-progress"]


def write_tif(path, array, nodata=None, crs=CRS, transform=TRANSFORM):
    array = np.asarray(array)
    array = array[None] if array.ndim == 2 else array
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                       dtype=array.dtype.name, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(array)
    return path


def truth(seed, size=SIZE):
    rows, cols = np.mgrid[:size, :size]
    return ((rows + 2 * cols + 11 * seed) // 19 % K).astype(np.uint8)


def make_scenes(root, stems=("a", "b", "c")):
    """SCENES and COARSE folders with one 3-band scene and its (shifted) coarse map per stem."""
    palette = np.array([[40, 90, 30], [200, 180, 160], [20, 60, 200]], np.uint8)
    (root / "scenes").mkdir(parents=True, exist_ok=True)
    (root / "coarse").mkdir(parents=True, exist_ok=True)
    for n, stem in enumerate(stems):
        labels = truth(n)
        image = np.moveaxis(palette[labels], -1, 0) + np.random.default_rng(n).integers(0, 30, (3, SIZE, SIZE), np.uint8)
        write_tif(root / "scenes" / f"{stem}.tif", image)
        write_tif(root / "coarse" / f"{stem}.tif", np.roll(labels, 3, axis=1), nodata=255)
    return root / "scenes", root / "coarse"


def read(path):
    with rasterio.open(path) as src:
        return src.read(1)


def reference(model, image, coarse, out):
    """The one-process refinement the archive must equal (one torch thread, like each worker here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refine_scene(Refiner.from_pretrained(model, device="cpu"), image, coarse, out, progress=False, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    labels = read(out)
    assert np.bincount(labels.ravel(), minlength=K)[:K].min() > 50  # every class present: equality means something
    return labels


def leftovers(out):
    """Anything in OUT besides final maps and the manifest: sidecars, locks, temporary files."""
    return sorted(p.name for p in out.iterdir() if not (p.suffix == ".tif" and not p.name.startswith(".")) and p.name != MANIFEST)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny model with scrambled weights: an untrained one maps everything to one class, which would make the
    pixel-equality checks vacuous; this one's maps depend on the image, the coarse map and the noise."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny"
    network = IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=K, image_channels=3))
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.5)
    network.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def client():
    """Two spawned worker processes (archive.local_cluster, as `--workers 2 --threads 1` builds it)."""
    from distributed import Client

    cluster = archive.local_cluster(workers=2, threads=1)
    with cluster, Client(cluster) as dask_client:
        dask_client.wait_for_workers(2, timeout=120)
        yield dask_client


def _worker_facts():
    import multiprocessing

    return {"spawned": "__mp_main__" in sys.modules, "daemon": multiprocessing.current_process().daemon,
            "gdal_cachemax": os.environ.get("GDAL_CACHEMAX")}


def _slow_batches(delay):
    """Runs on the workers: each tile batch takes ``delay`` seconds longer (a window to kill a worker in)."""
    import idgbr.inference.scene

    run = getattr(idgbr.inference.scene, "_fast_run_batch", idgbr.inference.scene._run_batch)
    idgbr.inference.scene._fast_run_batch = run

    def slow(*args, **kwargs):
        time.sleep(delay)
        return run(*args, **kwargs)

    idgbr.inference.scene._run_batch = slow if delay else run


@pytest.fixture()
def slow_workers(client):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    client.run(_slow_batches, 0.3)
    yield
    client.run(_slow_batches, 0)


def test_two_workers_manifest_skip_and_equal_to_one_process(client, model, tmp_path, capsys):
    facts = client.run(_worker_facts)
    assert len(facts) == 2 and all(f == {"spawned": True, "daemon": True, "gdal_cachemax": "256"} for f in facts.values())
    scenes, coarse = make_scenes(tmp_path)
    out = tmp_path / "out"
    args = ["refine-archive", str(scenes), str(coarse), str(out), "--model", model, "--scheduler",
            client.scheduler.address, *CLI_SETTINGS]
    assert main(args) == 0
    assert "3 done, 0 skipped, 0 failed of 3 scenes" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    entries = manifest["scenes"]
    assert sorted(entries) == ["a", "b", "c"] and manifest["counts"] == {"done": 3}
    for stem, entry in entries.items():
        assert entry["status"] == "done" and entry["error"] is None and entry["tiles"] == 16 and entry["seconds"] > 0
        np.testing.assert_array_equal(read(out / f"{stem}.tif"),
                                      reference(model, scenes / f"{stem}.tif", coarse / f"{stem}.tif", tmp_path / f"ref_{stem}.tif"))
    assert len({entry["pid"] for entry in entries.values()}) == 2  # both workers took scenes
    assert all(torch_threads == 1 for torch_threads in client.run(lambda: __import__("torch").get_num_threads()).values())
    assert leftovers(out) == []
    # the same command again: every scene is skipped, no file is rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    assert main(args) == 0
    assert "0 done, 3 skipped, 0 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")} == mtimes
    again = json.loads((out / MANIFEST).read_text())["scenes"]
    assert {e["status"] for e in again.values()} == {"skipped"} and {e["tiles"] for e in again.values()} == {16}
    # other settings on the same folder: refused, nothing touched
    assert main([*args[:-len(CLI_SETTINGS)], "--tile", "64", "--overlap", "8", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")} == mtimes
    # the flip margin (a sampling flag shared with `idgbr refine`) is part of the settings too
    assert manifest["settings"]["flip_margin"] == 0.0
    assert main([*args, "--flip-margin", "0.3"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert manifest["settings"]["area_match"] == 0.0  # so is the area match
    assert main([*args, "--area-match", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert manifest["settings"]["class_reach"] == 0  # and the class reach
    assert main([*args, "--class-reach", "8"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_resume_half_done_scene_and_pairs_csv(client, model, tmp_path):
    scenes, coarse = make_scenes(tmp_path)
    out = tmp_path / "out"
    seen = []

    def stop_after_two_batches(indices):
        seen.append(indices)
        if len(seen) == 2:
            raise KeyboardInterrupt

    torch.set_num_threads(1)
    with pytest.raises(KeyboardInterrupt):  # a run killed after 2 of its 8 batches: sidecars hold 4 tiles
        refine_scene(Refiner.from_pretrained(model, device="cpu"), scenes / "a.tif", coarse / "a.tif", out / "a.tif",
                     progress=False, callback=stop_after_two_batches, **SETTINGS)
    assert (out / "a.tif.progress.json").exists() and not (out / "a.tif").exists()
    reference(model, scenes / "b.tif", coarse / "b.tif", out / "b.tif")  # b is done already
    (out / ".c.x1y2.tif.part").write_bytes(b"half a file")  # a killed write's temporary file
    (tmp_path / "pairs.csv").write_text("image,coarse\n" + "".join(f"scenes/{s}.tif,coarse/{s}.tif\n" for s in "abc"))
    manifest = refine_archive(read_pairs(tmp_path / "pairs.csv"), out, model, client=client, threads=1,
                              progress=False, **SETTINGS)
    entries = manifest["scenes"]
    assert manifest["job"] == {"a": "done", "b": "skipped", "c": "done"}
    assert entries["a"]["resumed_tiles"] == 4 and entries["a"]["computed"] == 12
    assert entries["c"]["resumed_tiles"] == 0 and entries["c"]["computed"] == 16
    for stem in "ac":
        np.testing.assert_array_equal(read(out / f"{stem}.tif"), reference(
            model, scenes / f"{stem}.tif", coarse / f"{stem}.tif", tmp_path / f"ref_{stem}.tif"))
    assert leftovers(out) == []


def test_bad_scenes_fail_alone_with_one_line_errors(client, model, tmp_path, capsys):
    scenes, coarse = make_scenes(tmp_path, stems=("good", "broken", "utm34", "small", "classes", "orphan"))
    (scenes / "broken.tif").write_bytes(b"II*\x00garbage")
    labels = read(coarse / "good.tif")
    write_tif(coarse / "utm34.tif", labels, crs="EPSG:32634")
    write_tif(coarse / "small.tif", labels[:80])
    write_tif(coarse / "classes.tif", np.where(labels == 2, 7, labels).astype(np.uint8))
    (coarse / "orphan.tif").unlink()
    out = tmp_path / "out"
    args = ["refine-archive", str(scenes), str(coarse), str(out), "--model", model, "--scheduler",
            client.scheduler.address, *CLI_SETTINGS]
    assert main(args) == 2
    err = capsys.readouterr().err.rstrip().splitlines()
    assert err[-1].startswith("idgbr: error: ") and "5 of 6 scenes failed" in err[-1]
    entries = json.loads((out / MANIFEST).read_text())["scenes"]
    expected = {"broken": "broken.tif: unreadable", "utm34": "utm34.tif.*reproject", "small": "small.tif.*differs",
                "classes": "classes.tif: values \\[7\\] are outside", "orphan": "no coarse map with the stem 'orphan'"}
    import re

    assert entries["good"]["status"] == "done" and (out / "good.tif").exists()
    for stem, pattern in expected.items():
        assert entries[stem]["status"] == "failed" and re.search(pattern, entries[stem]["error"]), entries[stem]
        error = entries[stem]["error"]
        assert error.startswith(str(scenes if stem in ("broken", "orphan") else coarse)) and "internal error" not in error
        assert "\n" not in error and not (out / f"{stem}.tif").exists()
        assert any(line.startswith(f"  {stem}: ") for line in err)
    assert leftovers(out) == []
    # without --model, the shipped refiner: a scene whose classes do not fit fails with how to train one
    assert main(["refine-archive", str(scenes), str(coarse), str(tmp_path / "shipped"), "--scheduler",
                 client.scheduler.address, "--no-progress"]) == 2
    entry = json.loads((tmp_path / "shipped" / MANIFEST).read_text())["scenes"]["classes"]
    assert entry["status"] == "failed" and "holds class 7, but the shipped refiner" in entry["error"]


def _wait_for(condition, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def _running_scene(out, min_done=2):
    """(stem, pid of the worker refining it) once a scene has ``min_done`` tiles saved in its sidecar."""
    for progress in out.glob("*.tif.progress.json"):
        try:
            done = len(json.loads(progress.read_text())["done"])
            holder = json.loads(progress.with_name(progress.name.replace(".progress.json", ".lock")).read_text())
        except (OSError, ValueError, KeyError):
            continue
        if done >= min_done:
            return progress.name.split(".")[0], holder["pid"]
    return None


def _in_thread(function, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_worker_killed_mid_scene_job_finishes_pixel_equal(client, model, tmp_path, slow_workers):
    scenes, coarse = make_scenes(tmp_path)
    out = tmp_path / "out"
    thread, box = _in_thread(refine_archive, find_pairs(scenes, coarse), out, model, client=client, threads=1,
                             progress=False, **SETTINGS)
    stem, pid = _wait_for(lambda: _running_scene(out))
    os.kill(pid, signal.SIGKILL)  # kill -9 the worker process in the middle of the scene
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    entries = box["result"]["scenes"]
    assert {e["status"] for e in entries.values()} == {"done"}
    assert entries[stem]["pid"] != pid and entries[stem]["resumed_tiles"] >= 2  # another worker resumed it
    for name in entries:
        np.testing.assert_array_equal(read(out / f"{name}.tif"), reference(
            model, scenes / f"{name}.tif", coarse / f"{name}.tif", tmp_path / f"ref_{name}.tif"))
    assert leftovers(out) == []


def test_second_job_on_same_folder_refuses(client, model, tmp_path, slow_workers, capsys):
    scenes, coarse = make_scenes(tmp_path)
    out = tmp_path / "out"
    thread, box = _in_thread(refine_archive, find_pairs(scenes, coarse), out, model, client=client, threads=1,
                             progress=False, **SETTINGS)
    _wait_for(lambda: _running_scene(out, min_done=1))
    args = ["refine-archive", str(scenes), str(coarse), str(out), "--model", model, "--scheduler",
            client.scheduler.address, *CLI_SETTINGS]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{JOB_LOCK}: another refine-archive job (pid {os.getpid()} on {socket.gethostname()})" in err
    thread.join(timeout=120)
    assert "error" not in box and set(box["result"]["job"].values()) == {"done"}
    assert not (out / JOB_LOCK).exists()
    # a lock left by a job that died (kill -9) on this host is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / JOB_LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0.0}))
    assert main(args) == 0 and not (out / JOB_LOCK).exists()


def test_task_run_twice_leaves_one_final_file(model, tmp_path):
    """dask runs a task at least once: a second attempt, concurrent or later, finds the output done."""
    scenes, coarse = make_scenes(tmp_path, stems=("a",))
    out = tmp_path / "out" / "a.tif"
    job = {"stem": "a", "image": str(scenes / "a.tif"), "coarse": str(coarse / "a.tif"), "out": str(out),
           "model": model, "shipped": False, "threads": 1, "options": SETTINGS, "stale_after": 600}
    first, one = _in_thread(refine_task, job)
    second, two = _in_thread(refine_task, job)
    first.join(timeout=60)
    second.join(timeout=60)
    assert sorted([one["result"]["status"], two["result"]["status"]]) == ["done", "exists"], (one, two)
    mtime = out.stat().st_mtime_ns
    assert refine_task(job)["status"] == "exists" and out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.tif"]
    np.testing.assert_array_equal(read(out), reference(model, scenes / "a.tif", coarse / "a.tif", tmp_path / "ref.tif"))


def test_lock_file_semantics(tmp_path):
    path = tmp_path / "x.lock"
    first, second = Lock(path), Lock(path)
    assert first.try_acquire() is None
    holder = second.try_acquire()
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    second.release()  # not the holder: nothing happens
    assert path.exists()
    first.release()
    assert not path.exists() and second.try_acquire() is None
    second.release()
    # another host's lock: live while its heartbeat is young, taken over once older than stale_after
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0.0}))
    assert first.try_acquire(stale_after=60) is not None
    old = time.time() - 120
    os.utime(path, (old, old))
    assert first.try_acquire(stale_after=60) is None and json.loads(path.read_text())["token"] == first.token
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lock"]


def test_pairs_by_stem_and_csv_errors(tmp_path):
    scenes, coarse = make_scenes(tmp_path, stems=("a", "b"))
    (coarse / "b.tif").unlink()
    pairs = find_pairs(scenes, coarse)
    assert [(p.stem, p.coarse is not None) for p in pairs] == [("a", True), ("b", False)]
    (scenes / "a.tiff").write_bytes(b"")
    with pytest.raises(IdgbrError, match="a.tiff: stem 'a' also names a.tif; rename one"):
        find_pairs(scenes, coarse)
    with pytest.raises(IdgbrError, match="empty: no GeoTIFF"):
        (tmp_path / "empty").mkdir()
        find_pairs(tmp_path / "empty", coarse)
    (tmp_path / "dup.csv").write_text("scenes/a.tif,coarse/a.tif\nother/a.tif,coarse/a.tif\n")
    with pytest.raises(IdgbrError, match="dup.csv: line 2: stem 'a' appears twice"):
        read_pairs(tmp_path / "dup.csv")
    assert main(["refine-archive", "--pairs", str(tmp_path / "dup.csv"), str(scenes), str(tmp_path / "o")]) == 2

