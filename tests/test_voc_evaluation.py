"""voc_evaluation.py end to end on the shared VOC images with the real pedestrian model."""

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from utils.voc import evaluate, load_dataset, mean_ap, read_results

SCRIPT = str(REPO_ROOT / "voc_evaluation.py")
LIMIT = "120"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pedestrian_model):
    """A scratch workspace holding a copy of the cached pedestrian graph (no download, own results)."""
    folder = tmp_path_factory.mktemp("ws")
    target = folder / "models" / pedestrian_model.name
    target.mkdir(parents=True)
    shutil.copy(pedestrian_model.graph_path, target / "frozen_inference_graph.pb")
    return folder


@pytest.fixture(scope="module")
def voc_dir(shared_dir):
    return shared_dir / "data" / "VOCdevkit" / "VOC2007"


def run(*args, workspace, check_code=None):
    completed = subprocess.run([sys.executable, SCRIPT, *args, "-m", "ssdlite_mobilenet_v2_pedestrian",
                                "-w", str(workspace)], capture_output=True, text=True, timeout=600)
    if check_code is not None:
        assert completed.returncode == check_code, completed.stderr[-2000:]
    return completed


def person_ap(stdout: str, occurrence: int = 0) -> float:
    return float(re.findall(r"^person\s*: (\d\.\d{4})$", stdout, re.MULTILINE)[occurrence])


@pytest.fixture(scope="module")
def compared(workspace, voc_dir):
    """onnxruntime --compare tensorflow on the first 120 images, with --plot."""
    return run("onnxruntime", "-d", str(voc_dir), "--limit", LIMIT, "--compare", "tensorflow", "--plot",
               workspace=workspace, check_code=0)


def test_onnxruntime_keeps_tensorflows_person_ap(compared):
    ours, theirs = person_ap(compared.stdout, 0), person_ap(compared.stdout, 1)
    assert 0.3 < ours < 1.0
    assert abs(ours - theirs) * 100 <= 0.3, (ours, theirs)
    assert "within the tolerance" in compared.stdout
    table = compared.stdout.split("backend onnxruntime FP32 (portable)\n")[1].splitlines()
    assert table[19] .startswith("tvmonitor") and table[20].startswith("n/a: 19 classes")
    assert table[21].startswith("mAP: ")  # the last line of the table
    assert re.search(r"End to end: \d+\.\d images/s; inference only: \d+\.\d images/s", compared.stdout)
    assert "aeroplane  : n/a" in compared.stdout


def test_result_files_parse_back_to_the_same_ap(compared, workspace, voc_dir):
    folder = workspace / "results" / "ssdlite_mobilenet_v2_pedestrian" / "onnxruntime" / "portable" / "FP32"
    files = sorted(p.name for p in folder.glob("det_test_*.txt"))
    assert len(files) == 20 and not list(folder.glob(".*tmp*"))
    lines = (folder / "det_test_person.txt").read_text().splitlines()
    assert lines and len(lines[0].split()) == 6
    dataset = load_dataset(voc_dir, "test", int(LIMIT))
    results = evaluate(dataset, read_results(folder, "test"))
    assert round(mean_ap(results, {"person"}), 4) == person_ap(compared.stdout, 0)
    assert (folder / "pr_curves_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_results_are_reused_and_a_real_gap_fails_the_comparison(compared, workspace, voc_dir):
    again = run("onnxruntime", "-d", str(voc_dir), "--limit", LIMIT, workspace=workspace, check_code=0)
    assert "Using cached onnxruntime detections" in again.stderr
    assert person_ap(again.stdout) == person_ap(compared.stdout, 0)
    # Degrade the cached TensorFlow person results: a real AP gap that --compare must refuse.
    person = workspace / "results" / "ssdlite_mobilenet_v2_pedestrian" / "tensorflow" / "frozen" / "FP32" / "det_test_person.txt"
    lines = person.read_text().splitlines()
    person.write_text("".join(line + "\n" for line in lines[1::2]))
    gap = run("onnxruntime", "-d", str(voc_dir), "--limit", LIMIT, "--compare", "tensorflow",
              workspace=workspace, check_code=1)
    assert "OUTSIDE the tolerance" in gap.stdout
    # -f runs the detector again and repairs the results
    repaired = run("tensorflow", "-d", str(voc_dir), "--limit", LIMIT, "-f", workspace=workspace, check_code=0)
    assert "Using cached" not in repaired.stderr
    assert person_ap(repaired.stdout) == person_ap(compared.stdout, 1)


def test_bad_annotations_and_images_are_skipped_and_counted(workspace, voc_dir, tmp_path):
    copy = tmp_path / "VOC2007"
    ids = (voc_dir / "ImageSets" / "Main" / "test.txt").read_text().split()[:6]
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (copy / sub).mkdir(parents=True)
    for image_id in ids:
        shutil.copy(voc_dir / "Annotations" / f"{image_id}.xml", copy / "Annotations")
        shutil.copy(voc_dir / "JPEGImages" / f"{image_id}.jpg", copy / "JPEGImages")
    (copy / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    (copy / "Annotations" / f"{ids[0]}.xml").write_text("<annotation><object>")           # malformed
    (copy / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")                    # unreadable
    result = run("onnxruntime", "-d", str(copy), workspace=workspace, check_code=0)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and ids[0] in warnings[0] and ids[1] in warnings[1]
    assert "2 of 6 images skipped" in result.stderr
    assert "test: 4 images" in result.stdout


def test_missing_voc_folder_is_one_line_with_exit_code_2(workspace, tmp_path):
    result = run("onnxruntime", "-d", str(tmp_path / "nowhere"), workspace=workspace, check_code=2)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and "VOC_DIR" in errors[0]
    assert str(tmp_path / "nowhere") in errors[0]
