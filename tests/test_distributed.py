"""detect_objects.py --ray on a local three-node Ray cluster (head + two workers, one CPU each): a killed
detector actor, a removed worker node, an unreadable image and an interrupted driver still give every
image exactly once, with the single-process detections."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, WORKSPACE
from parity import assert_same_detections

pytestmark = pytest.mark.slow

SCRIPT = str(REPO_ROOT / "detect_objects.py")
IMAGES = 20
DETECTOR_TITLE = b"ray::Detector"


@pytest.fixture(scope="module")
def cluster(shared_dir, pedestrian_onnx):
    """Head and two worker nodes, one CPU each; shut down after the module."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


@pytest.fixture(scope="module")
def voc_images(shared_dir) -> list[Path]:
    return sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:IMAGES]


@pytest.fixture(scope="module")
def reference(pedestrian_model, voc_images) -> dict[str, np.ndarray]:
    """Single-process detections (batch 1) of the images, by file name."""
    from conftest import open_model
    from utils.run import detect_batches

    with open_model(pedestrian_model) as runner:
        return {result.path.name: result.rows for batch in detect_batches(runner, voc_images, 1)
                for result in batch.results}


@pytest.fixture
def image_dir(tmp_path, voc_images) -> Path:
    """A fresh folder of the images (a new folder is a new run: nothing to resume)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in voc_images:
        shutil.copy(path, folder / path.name)
    return folder


def start(image_dir: Path, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, str(image_dir), "--ray", address, "--ray-workers", "2",
                             "-b", "1", "-m", "ssdlite_mobilenet_v2_pedestrian", "-w", str(WORKSPACE), "--backend", "onnxruntime",
                             "--json", str(image_dir.parent / "detections.json"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=90)
    return process.returncode, stdout, stderr


def run_folder(image_dir: Path) -> Path | None:
    """The shard folder of the run on ``image_dir`` (found by its manifest), or None before the first shard."""
    for manifest in (WORKSPACE / "ray").glob("*/manifest.json"):
        try:
            if str(image_dir) in manifest.read_text(encoding="utf-8"):
                return manifest.parent
        except OSError:
            continue
    return None


def wait_for_shards(image_dir: Path, count: int, timeout: float = 120.0) -> int:
    """Wait until the run has at least ``count`` complete shards; returns how many it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folder = run_folder(image_dir)
        if folder is not None:
            try:
                done = len(json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["shards"])
            except (OSError, ValueError):
                done = 0
            if done >= count:
                return done
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} shards after {timeout} s")


def detector_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(DETECTOR_TITLE):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def merged(image_dir: Path) -> list:
    from utils.distributed import MERGED, read_records

    return read_records(run_folder(image_dir) / MERGED)


def check_exactly_once(image_dir: Path, reference: dict[str, np.ndarray], bad: set[str] = frozenset()) -> None:
    """Every input once, in input order, good ones with the single-process detections (scores within 1e-6)."""
    records = merged(image_dir)
    names = [Path(record.path).name for record in records]
    assert names == sorted(reference) + sorted(bad)
    assert [record.index for record in records] == list(range(len(records)))
    for record in records:
        name = Path(record.path).name
        if name in bad:
            assert record.error and record.rows is None
            continue
        rows, expected = record.rows, reference[name]
        assert_same_detections(rows[None], [len(rows)], expected[None], [len(expected)], names=[name],
                               what="Ray vs one process", full_at=(None, None), score_tol=1e-6, box_tol=1e-6,
                               iou=1.0)
    shutil.rmtree(run_folder(image_dir))


def test_unreadable_image_is_reported_and_the_others_detected(cluster, image_dir, reference):
    (image_dir / "zz_broken.jpg").write_bytes(b"not a jpeg")
    code, stdout, stderr = finish(start(image_dir, cluster[0].address))
    assert code == 1, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "zz_broken.jpg" in errors[0]
    assert f"1 of {IMAGES + 1} inputs failed" in stderr
    assert stdout.count("Detected person") >= 1
    check_exactly_once(image_dir, reference, bad={"zz_broken.jpg"})
    ours = json.loads((image_dir.parent / "detections.json").read_text(encoding="utf-8"))
    single = subprocess.run([sys.executable, SCRIPT, str(image_dir), "-m", "ssdlite_mobilenet_v2_pedestrian",
                             "--backend", "onnxruntime", "-o", str(image_dir.parent / "drawn"),
                             "--json", str(image_dir.parent / "single.json")], capture_output=True, timeout=180)
    assert single.returncode == 1
    assert ours == json.loads((image_dir.parent / "single.json").read_text(encoding="utf-8"))


def test_killed_detector_actor_is_restarted(cluster, image_dir, reference):
    process = start(image_dir, cluster[0].address)
    done = wait_for_shards(image_dir, 2)
    pids = detector_pids()
    assert pids and done < IMAGES
    os.kill(pids[0], signal.SIGKILL)
    code, _, stderr = finish(process)
    assert code == 0, stderr[-2000:]
    check_exactly_once(image_dir, reference)


def test_interrupted_run_resumes_to_the_same_bytes(cluster, image_dir, reference):
    process = start(image_dir, cluster[0].address)
    wait_for_shards(image_dir, 3)
    process.kill()
    process.wait()
    folder = run_folder(image_dir)
    # Shards the manifest lists are complete and must be reused untouched; a shard written just before
    # the kill but not yet listed is (correctly) redone.
    listed = json.loads((folder / "manifest.json").read_text())["shards"]
    kept = {f"shard_{int(block):06d}.npz": folder.joinpath(f"shard_{int(block):06d}.npz").stat().st_mtime_ns
            for block in listed}
    assert 3 <= len(kept) < IMAGES
    code, _, stderr = finish(start(image_dir, cluster[0].address))
    assert code == 0, stderr[-2000:]
    assert all(folder.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    resumed = (folder / "detections.npz").read_bytes()
    shutil.rmtree(folder)
    code, _, stderr = finish(start(image_dir, cluster[0].address))
    assert code == 0, stderr[-2000:]
    assert (folder / "detections.npz").read_bytes() == resumed
    check_exactly_once(image_dir, reference)


def test_voc_evaluation_writes_the_single_process_result_files(cluster, tmp_path, shared_dir, pedestrian_model):
    workspace = tmp_path / "ws"
    (workspace / "models" / pedestrian_model.name).mkdir(parents=True)
    shutil.copy(pedestrian_model.graph_path, workspace / "models" / pedestrian_model.name)
    command = [sys.executable, str(REPO_ROOT / "voc_evaluation.py"), "onnxruntime", "-m", pedestrian_model.name,
               "-w", str(workspace), "-d", str(shared_dir / "data" / "VOCdevkit" / "VOC2007"), "--limit",
               str(IMAGES), "-b", "4"]
    results = workspace / "results" / pedestrian_model.name / "onnxruntime" / "portable" / "FP32"
    single = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr[-2000:]
    expected = {path.name: path.read_bytes() for path in results.glob("det_*.txt")}
    on_ray = subprocess.run(command + ["-f", "--ray", cluster[0].address], capture_output=True, text=True,
                            timeout=180)
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert {path.name: path.read_bytes() for path in results.glob("det_*.txt")} == expected
    assert len(expected) == 20 and any(expected.values())
    assert single.stdout.split("mAP: ")[1][:6] == on_ray.stdout.split("mAP: ")[1][:6]


def test_removed_worker_node(cluster, image_dir, reference):
    ray_cluster, workers = cluster
    process = start(image_dir, ray_cluster.address)
    done = wait_for_shards(image_dir, 2)
    assert done < IMAGES
    ray_cluster.remove_node(workers[0], allow_graceful=False)
    code, _, stderr = finish(process)
    assert code == 0, stderr[-2000:]
    check_exactly_once(image_dir, reference)


def test_without_ray_the_flag_says_how_to_install(tmp_path):
    code = ("import sys, runpy; sys.modules['ray'] = None; "
            f"sys.argv = ['detect_objects.py', {str(REPO_ROOT / 'images')!r}, '--ray']; "
            f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "error: --ray needs Ray; run: pip install -r requirements-distributed.txt"]
