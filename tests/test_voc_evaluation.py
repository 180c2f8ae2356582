"""voc_evaluation.py end to end on the shared VOC images with the real pedestrian model."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from utils.labels import VOC_CLASSES
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


def results_folder(workspace, backend: str) -> Path:
    flavour = "portable" if backend == "onnxruntime" else "frozen"
    return workspace / "results" / "ssdlite_mobilenet_v2_pedestrian" / backend / flavour / "FP32"


def test_cached_results_are_reused_and_a_real_gap_fails_the_comparison(compared, workspace, voc_dir):
    again = run("onnxruntime", "-d", str(voc_dir), "--limit", LIMIT, workspace=workspace, check_code=0)
    assert "Using cached onnxruntime detections" in again.stderr
    assert person_ap(again.stdout) == person_ap(compared.stdout, 0)
    # A backend that really loses AP: TensorFlow's cached person results degraded, and run.json recording
    # the degraded file (as if the detector had written it), so that the cache is taken and --compare refuses.
    folder = results_folder(workspace, "tensorflow")
    person = folder / "det_test_person.txt"
    lines = person.read_text().splitlines()
    person.write_text("".join(line + "\n" for line in lines[1::2]))
    record = json.loads((folder / "run.json").read_text())
    data = person.read_bytes()
    record["files"][person.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "run.json").write_text(json.dumps(record))
    gap = run("onnxruntime", "-d", str(voc_dir), "--limit", LIMIT, "--compare", "tensorflow",
              workspace=workspace, check_code=1)
    assert "Using cached tensorflow detections" in gap.stderr
    assert "OUTSIDE the tolerance" in gap.stdout
    # -f runs the detector again and repairs the results
    repaired = run("tensorflow", "-d", str(voc_dir), "--limit", LIMIT, "-f", workspace=workspace, check_code=0)
    assert "Using cached" not in repaired.stderr
    assert person_ap(repaired.stdout) == person_ap(compared.stdout, 1)


def test_a_result_file_cut_at_a_line_boundary_is_run_again(compared, workspace, voc_dir):
    person = results_folder(workspace, "onnxruntime") / "det_test_person.txt"
    whole = person.read_text()
    lines = whole.splitlines(keepends=True)
    person.write_text("".join(lines[:len(lines) // 2]))   # a valid devkit file, half the detections
    again = run("onnxruntime", "-d", str(voc_dir), "--limit", LIMIT, workspace=workspace, check_code=0)
    (line,) = [line for line in again.stderr.splitlines() if "do not match run.json" in line]
    assert line.startswith("warning: cached detections in ") and "det_test_person.txt has " in line
    assert line.endswith("running again")
    assert "Using cached" not in again.stderr
    assert person_ap(again.stdout) == person_ap(compared.stdout, 0)
    assert person.read_text() == whole


def py_faster_rcnn_voc_eval(result_lines: list[str], annotations: Path, image_ids: list[str], name: str) -> float:
    """An independent VOC07 ``voc_eval`` (as in py-faster-rcnn: the XML read as it is, 1-based, +1 widths,
    11-point AP), on devkit result lines; written here so that nothing of utils.voc is used."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415

    truth, positives = {}, 0
    for image_id in image_ids:
        objects = [obj for obj in ET.parse(annotations / f"{image_id}.xml").findall("object")
                   if obj.find("name").text == name]
        boxes = np.array([[float(obj.find("bndbox").find(key).text) for key in ("xmin", "ymin", "xmax", "ymax")]
                          for obj in objects]).reshape(-1, 4)
        difficult = np.array([int(obj.find("difficult").text) for obj in objects]).astype(bool)
        truth[image_id] = {"bbox": boxes, "difficult": difficult, "det": [False] * len(objects)}
        positives += int(np.sum(~difficult))
    fields = [line.split() for line in result_lines]
    ids = [f[0] for f in fields]
    confidence = np.array([float(f[1]) for f in fields])
    boxes = np.array([[float(v) for v in f[2:]] for f in fields]).reshape(-1, 4)
    order = np.argsort(-confidence)
    boxes, ids = boxes[order], [ids[i] for i in order]
    tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
    for d, image_id in enumerate(ids):
        record, bb = truth[image_id], boxes[d]
        overlap, best = -np.inf, 0
        gt = record["bbox"]
        if gt.size:
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                     + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inter)
            overlaps = inter / union
            overlap, best = np.max(overlaps), int(np.argmax(overlaps))
        if overlap > 0.5:
            if not record["difficult"][best]:
                if not record["det"][best]:
                    tp[d], record["det"][best] = 1.0, True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    recall, precision = tp / float(positives), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        ap += (np.max(precision[recall >= t]) if np.sum(recall >= t) else 0.0) / 11.0
    return ap


def test_person_ap_is_the_one_based_figure_of_an_independent_writer_and_voc_eval(compared, workspace, pedestrian_model,
                                                                                   voc_dir):
    """The detector's own rows written as py-faster-rcnn writes them (x * W + 1 on every coordinate) and
    scored by an independent voc_eval give the script's person AP; the 0-based file (x * W) does not."""
    from conftest import open_model  # noqa: PLC0415
    from utils.run import detect_batches  # noqa: PLC0415

    ids = (voc_dir / "ImageSets" / "Main" / "test.txt").read_text().split()[:int(LIMIT)]
    written = {0: [], 1: []}
    with open_model(pedestrian_model, batch_size=8) as runner:
        for batch in detect_batches(runner, [voc_dir / "JPEGImages" / f"{i}.jpg" for i in ids], 8, keys=ids):
            for result in batch.results:
                width, height = result.size
                for row in result.rows[result.rows[:, 1] == 1]:
                    x1, y1, x2, y2 = row[3] * width, row[4] * height, row[5] * width, row[6] * height
                    for offset, lines in written.items():
                        lines.append(f"{result.key} {row[2]:.6f} {x1 + offset:.1f} {y1 + offset:.1f} "
                                     f"{x2 + offset:.1f} {y2 + offset:.1f}")
    one_based = py_faster_rcnn_voc_eval(written[1], voc_dir / "Annotations", ids, "person")
    zero_based = py_faster_rcnn_voc_eval(written[0], voc_dir / "Annotations", ids, "person")
    ours = person_ap(compared.stdout, 0)
    assert ours == pytest.approx(one_based, abs=1e-4)
    assert abs(ours - zero_based) > 5e-4, (ours, zero_based)
    # The script's own file holds the same lines (up to float noise of another batch size).
    mine = (results_folder(workspace, "onnxruntime") / "det_test_person.txt").read_text().splitlines()
    assert len(mine) == len(written[1])
    assert py_faster_rcnn_voc_eval(mine, voc_dir / "Annotations", ids, "person") == pytest.approx(one_based, abs=1e-4)


@pytest.fixture(scope="module")
def gate_workspace(tmp_path_factory, pedestrian_model):
    """A workspace of its own for the runs on small VOC copies (they leave the 120-image results alone)."""
    folder = tmp_path_factory.mktemp("gate_ws")
    target = folder / "models" / pedestrian_model.name
    target.mkdir(parents=True)
    shutil.copy(pedestrian_model.graph_path, target / "frozen_inference_graph.pb")
    return folder


def voc_copy(voc_dir: Path, folder: Path, ids: list[str]) -> Path:
    """A VOC2007 folder holding copies of the given images and annotations."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True)
    for image_id in ids:
        shutil.copy(voc_dir / "Annotations" / f"{image_id}.xml", folder / "Annotations")
        shutil.copy(voc_dir / "JPEGImages" / f"{image_id}.jpg", folder / "JPEGImages")
    (folder / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return folder


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_annotations_and_images_are_skipped_and_counted(gate_workspace, voc_dir, tmp_path):
    ids = (voc_dir / "ImageSets" / "Main" / "test.txt").read_text().split()[:6]
    copy = voc_copy(voc_dir, tmp_path / "VOC2007", ids)
    (copy / "Annotations" / f"{ids[0]}.xml").write_text("<annotation><object>")           # malformed
    (copy / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg")                    # unreadable
    result = run("onnxruntime", "-d", str(copy), workspace=gate_workspace, check_code=0)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and ids[0] in warnings[0] and ids[1] in warnings[1]
    assert "2 of 6 images skipped (see warnings); their ground truth is left out of the AP" in result.stderr
    assert "test: 4 images" in result.stdout


def test_an_unreadable_image_leaves_the_ground_truth_too(gate_workspace, voc_dir, tmp_path):
    ids = ["000001", "000010", "000014", "000022", "000025", "000027"]   # 000014 holds three people
    copy = voc_copy(voc_dir, tmp_path / "VOC2007", ids)
    (copy / "JPEGImages" / "000014.jpg").write_bytes(b"not a jpeg")
    result = run("onnxruntime", "-d", str(copy), workspace=gate_workspace, check_code=0)
    assert "test: 5 images" in result.stdout
    assert "1 of 6 images skipped (see warnings); their ground truth is left out of the AP" in result.stderr
    detections = read_results(results_folder(gate_workspace, "onnxruntime"), "test")
    dataset = load_dataset(copy)
    assert not [d for d in detections["person"] if d[0] == "000014"]
    without = evaluate(dataset.without(["000014"]), detections)[VOC_CLASSES.index("person")]
    with_it = evaluate(dataset, detections)[VOC_CLASSES.index("person")]
    assert person_ap(result.stdout) == round(without.ap, 4)
    assert without.num_positives == with_it.num_positives - 3 and with_it.ap < without.ap


def test_no_readable_image_is_exit_1_with_one_line(gate_workspace, voc_dir, tmp_path):
    ids = ["000001", "000010", "000014"]
    copy = voc_copy(voc_dir, tmp_path / "VOC2007", ids)
    for image_id in ids:
        (copy / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")
    result = run("onnxruntime", "-d", str(copy), workspace=gate_workspace, check_code=1)
    assert error_lines(result.stderr) == ["error: no image could be evaluated: 3 of 3 images were skipped "
                                          "(see warnings)"]
    # Nothing usable before any detector runs (every annotation broken): the same exit code.
    for image_id in ids:
        (copy / "Annotations" / f"{image_id}.xml").write_text("<annotation>")
    result = run("onnxruntime", "-d", str(copy), workspace=gate_workspace, check_code=1)
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: no image to evaluate: all 3 images of ") and "were skipped" in line


@pytest.mark.tensorflow
def test_a_nan_map_fails_and_so_does_comparing_it(gate_workspace, voc_dir, tmp_path):
    copy = voc_copy(voc_dir, tmp_path / "VOC2007", ["000002", "000003", "000006", "000008"])   # no person
    result = run("onnxruntime", "-d", str(copy), "--compare", "tensorflow", workspace=gate_workspace, check_code=1)
    assert re.findall(r"^mAP: (.*)$", result.stdout, re.MULTILINE) == ["nan", "nan"]
    assert "mAP nan vs nan: cannot compare a NaN mAP, FAILED" in result.stdout
    (line,) = error_lines(result.stderr)
    assert line.startswith("error: onnxruntime: mAP is NaN: none of the 4 evaluated images has non-difficult "
                           "ground truth of the classes the model detects (person); tensorflow: mAP is NaN")
    alone = run("onnxruntime", "-d", str(copy), workspace=gate_workspace, check_code=1)   # cached detections
    assert "Using cached onnxruntime detections" in alone.stderr
    assert len(error_lines(alone.stderr)) == 1 and "mAP is NaN" in alone.stderr


@pytest.mark.slow
@pytest.mark.tensorflow
def test_person_ap_on_the_300_images_is_the_devkit_convention_figure(gate_workspace, voc_dir):
    """0.6090 with the devkit's 1-based boxes (0.6060 with 0-based ones), on onnxruntime and tensorflow."""
    result = run("onnxruntime", "-d", str(voc_dir), "--compare", "tensorflow", "-f", workspace=gate_workspace,
                 check_code=0)
    assert "VOC2007 test: 300 images" in result.stdout
    for occurrence in (0, 1):
        assert person_ap(result.stdout, occurrence) == pytest.approx(0.6090, abs=1e-3)


def test_missing_voc_folder_is_one_line_with_exit_code_2(workspace, tmp_path):
    result = run("onnxruntime", "-d", str(tmp_path / "nowhere"), workspace=workspace, check_code=2)
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and "VOC_DIR" in errors[0]
    assert str(tmp_path / "nowhere") in errors[0]
