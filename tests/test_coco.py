"""utils.coco and eval_coco.py: integer image ids, results pycocotools accepts, the VOC -> COCO converter,
COCO AP side by side, and the gate."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from utils.coco import (SUMMARY_NAMES, VOC_TO_COCO_ID, ImageIds, digit_id, evaluate, load_ground_truth,
                        read_annotation_ids, result_entries, stable_id, voc_to_coco)
from utils.errors import UserError
from utils.labels import COCO_LABELS, VOC_CLASSES
from utils.run import coco_results
from utils.voc import detections_to_voc, load_dataset

pycocotools = pytest.importorskip("pycocotools")

EVAL_COCO = str(REPO_ROOT / "eval_coco.py")
DETECT = str(REPO_ROOT / "detect_objects.py")


# --- image ids ------------------------------------------------------------------------------------------

def test_all_digit_stems_are_the_ids():
    ids = ImageIds(["voc/000004.jpg", "coco/val2017/000000397133.jpg", "0.png"])
    assert [ids[p].id for p in ("voc/000004.jpg", "coco/val2017/000000397133.jpg", "0.png")] == [4, 397133, 0]
    assert all(ids[p].file_name is None for p in ("voc/000004.jpg", "0.png"))
    assert digit_id("a/12a.jpg") is None and digit_id("a/١٢.jpg") is None   # ASCII digits only


def test_other_names_get_a_stable_integer_with_the_file_name():
    first = ImageIds(["images/person.jpg", "images/dog.jpg"])["images/person.jpg"]
    assert isinstance(first.id, int) and 10**9 <= first.id < 2 * 10**9 and first.file_name == "images/person.jpg"
    again = ImageIds(["./images//person.jpg"])["images/person.jpg"]       # another run, the same path
    assert again == first and first.id == stable_id("images/person.jpg")
    assert ImageIds()[Path("images/person.jpg")] == first                  # by the path alone


def test_inputs_with_the_same_name_in_different_folders_never_share_an_id(caplog):
    paths = ["a/000004.jpg", "b/000004.jpg", "a/x.jpg", "b/x.jpg", "1.jpg", "01.jpg", "c/000004.jpg"]
    with caplog.at_level(logging.WARNING, logger="utils.coco"):
        ids = ImageIds(paths)
    assert [r.getMessage() for r in caplog.records] == [
        "3 inputs have the id of an earlier one by name (e.g. b/000004.jpg): they get ids of their own, with file_name"]
    got = [ids[p] for p in paths]
    assert len({g.id for g in got}) == len(paths)
    assert got[0].id == 4 and got[0].file_name is None                     # the first keeps its number
    assert got[1].file_name == "b/000004.jpg" and got[6].file_name == "c/000004.jpg"
    assert got[4].id == 1 and got[5].file_name == "01.jpg"
    assert ids["d/000004.jpg"].id not in {g.id for g in got}               # asked for later: still its own
    # Stable ids that hash alike are moved to the next free one.
    assert stable_id("a/x.jpg", {stable_id("a/x.jpg")}) == stable_id("a/x.jpg") + 1


def annotation_file(folder: Path, images: list[dict]) -> Path:
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    return path


def test_the_annotation_files_id_of_the_file_name(tmp_path, caplog):
    path = annotation_file(tmp_path, [{"id": 7, "file_name": "val/000004.jpg"}, {"id": 4, "file_name": "other.jpg"},
                                      {"id": 9, "file_name": "x.jpg"}])
    inputs = ["data/val/000004.jpg", "000005.jpg", "y/000004.jpg", "a/x.jpg", "b/x.jpg"]
    with caplog.at_level(logging.WARNING, logger="utils.coco"):
        ids = ImageIds(inputs, path)
    got = {p: ids[p] for p in inputs}
    assert got["data/val/000004.jpg"].id == 7                              # file_name with its folder
    assert got["a/x.jpg"].id == 9 and got["000005.jpg"].id == 5
    assert got["y/000004.jpg"].id not in (4, 7, 9) and got["y/000004.jpg"].file_name   # 4 is other.jpg's
    assert got["b/x.jpg"].id not in (4, 7, 9) and got["b/x.jpg"].file_name == "b/x.jpg"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("1 inputs have the id of an earlier one by name (e.g. b/x.jpg)")
    assert messages[1].startswith(f"2 of 5 inputs are not in {path} (e.g. 000005.jpg)")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ("[]", "no 'images' list"),
    ('{"images": [{"id": "7", "file_name": "a.jpg"}]}', "images[0] needs an integer 'id'"),
])
def test_a_bad_annotation_file_is_a_one_line_user_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as error:
        ImageIds(["a.jpg"], path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(UserError, match="cannot read COCO annotation file"):
        read_annotation_ids(tmp_path / "missing.json")


def test_results_entries():
    rows = np.array([[0, 1, 0.9, 0.1, 0.2, 0.5, 0.6], [0, 18, 0.4, -0.1, 0.0, 1.2, 1.0]])
    assert coco_results(Path("x/000004.jpg"), rows, (200, 100), 0.5) == [
        {"image_id": 4, "category_id": 1, "bbox": [20.0, 20.0, 80.0, 40.0], "score": 0.9}]
    ids = ImageIds(["x/person.jpg"])
    (low, high) = sorted(coco_results(Path("x/person.jpg"), rows, (200, 100), 0.0, ids), key=lambda e: e["score"])
    assert high["image_id"] == low["image_id"] == ids["x/person.jpg"].id and high["file_name"] == "x/person.jpg"
    assert low["category_id"] == 18 and low["bbox"] == [0.0, 0.0, 200.0, 100.0]       # clipped to the image
    assert all(type(v) is float for v in low["bbox"]) and type(low["score"]) is float
    assert result_entries(5, np.zeros((0, 7)), (10, 10)) == []


# --- VOC2007 -> COCO, and the convention both sides share ----------------------------------------------------

@pytest.fixture(scope="module")
def voc_dir(shared_dir) -> Path:
    return shared_dir / "data" / "VOCdevkit" / "VOC2007"


@pytest.fixture(scope="module")
def voc_json(voc_dir, tmp_path_factory) -> Path:
    """The 300 shared VOC images as a COCO annotation file, by the command-line entry."""
    path = tmp_path_factory.mktemp("coco") / "voc2007_test.json"
    result = subprocess.run([sys.executable, "-m", "utils.coco", "voc2coco", str(voc_dir), str(path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert f"Saved 300 images and 875 objects (174 difficult, as iscrowd) to: {path}" in result.stdout
    return path


def test_voc_to_coco(voc_json):
    data = json.loads(voc_json.read_text())
    assert [image["id"] for image in data["images"][:3]] == [1, 2, 3]
    assert data["images"][0] == {"id": 1, "file_name": "000001.jpg", "width": 353, "height": 500}
    names = {category["id"]: category["name"] for category in data["categories"]}
    assert len(names) == 20 and names[1] == "person" and names[5] == "airplane" and names[72] == "tv"
    assert {VOC_TO_COCO_ID[voc] for voc in VOC_CLASSES} == set(names)
    assert all(COCO_LABELS[i] == name for i, name in names.items())
    dog = data["annotations"][0]     # 000001's dog: (48, 240, 195, 371) in the XML
    assert dog["image_id"] == 1 and dog["category_id"] == 18 and dog["iscrowd"] == 0
    assert dog["bbox"] == [47.0, 239.0, 147.0, 131.0] and dog["area"] == 147.0 * 131.0
    persons = [a for a in data["annotations"] if a["category_id"] == 1]
    assert sum(not a["iscrowd"] for a in persons) == 258
    assert len({a["id"] for a in data["annotations"]}) == 875


def test_ground_truth_as_results_gives_ap_1(voc_json):
    ground_truth = load_ground_truth(voc_json)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in ground_truth.dataset["annotations"] if not a["iscrowd"]]
    summary = evaluate(ground_truth, results, ground_truth.getImgIds(), ground_truth.getCatIds())
    assert summary.value("AP") == pytest.approx(1.0) and summary.value("AP50") == pytest.approx(1.0)
    assert len(summary.lines) == 12 and summary.lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95")
    nothing = evaluate(ground_truth, [], ground_truth.getImgIds(), [1])
    assert nothing.value("AP") == 0.0
    assert np.isnan(evaluate(ground_truth, [], [2], [1]).value("AP"))   # 000002 has no person: undefined


def test_one_detection_is_the_same_box_in_both_conventions(voc_dir):
    """Continuous coordinates: COCO x = xml - 1; the VOC result file x * W + 1 = xml."""
    dataset = load_dataset(voc_dir, limit=1)
    coco = voc_to_coco(dataset)
    x, y, w, h = coco["annotations"][0]["bbox"]
    image = dataset.images[0]
    row = np.array([[0, 18, 0.9, x / image.width, y / image.height, (x + w) / image.width, (y + h) / image.height]])
    assert result_entries(1, row, (image.width, image.height))[0]["bbox"] == [x, y, w, h]
    np.testing.assert_allclose(detections_to_voc(row, image.width, image.height, COCO_LABELS)["dog"][0, 1:],
                               image.objects[0].box)


# --- detect_objects.py --json against the converted ground truth ---------------------------------------------

def test_detect_objects_json_loads_with_pycocotools(pedestrian_onnx, voc_dir, voc_json, tmp_path):
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

    folder = tmp_path / "JPEGImages"
    folder.mkdir()
    for path in sorted((voc_dir / "JPEGImages").glob("*.jpg"))[:30]:
        (folder / path.name).symlink_to(path)
    result = subprocess.run([sys.executable, DETECT, str(folder), "--onnx", str(pedestrian_onnx.onnx_path), "-b", "8",
                             "-t", "0.05", "-o", str(tmp_path / "out"), "-w", str(tmp_path / "ws"),
                             "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = json.loads((tmp_path / "out.json").read_text())
    assert entries and all(type(e["image_id"]) is int and "file_name" not in e for e in entries)
    ground_truth = load_ground_truth(voc_json)
    loaded = ground_truth.loadRes(str(tmp_path / "out.json"))             # the standard tool accepts them
    assert len(loaded.getAnnIds()) == len(entries)
    assert {e["image_id"] for e in entries} <= {int(p.stem) for p in folder.iterdir()}
    evaluation = COCOeval(ground_truth, loaded, "bbox")
    evaluation.params.imgIds, evaluation.params.catIds = [int(p.stem) for p in folder.iterdir()], [1]
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert 0.3 < evaluation.stats[1] <= 1.0       # AP50 of person on these images


def test_detect_objects_takes_the_ids_of_a_coco_annotation_file(pedestrian_onnx, voc_dir, voc_json, tmp_path):
    if "--coco-annotations" not in Path(DETECT).read_text():
        pytest.skip("detect_objects.py has no --coco-annotations option yet")
    data = json.loads(voc_json.read_text())          # the same images under other ids
    data["images"] = [{**image, "id": image["id"] + 5000} for image in data["images"]]
    data["annotations"] = [{**a, "image_id": a["image_id"] + 5000} for a in data["annotations"]]
    annotations = tmp_path / "shifted.json"
    annotations.write_text(json.dumps(data))
    images = [voc_dir / "JPEGImages" / name for name in ("000001.jpg", "000010.jpg")]
    result = subprocess.run([sys.executable, DETECT, *map(str, images), "--onnx", str(pedestrian_onnx.onnx_path),
                             "-o", str(tmp_path / "out"), "-w", str(tmp_path / "ws"),
                             "--json", str(tmp_path / "o.json"), "--coco-annotations", str(annotations)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = json.loads((tmp_path / "o.json").read_text())
    assert {e["image_id"] for e in entries} == {5001, 5010}
    assert len(load_ground_truth(annotations).loadRes(entries).getAnnIds()) == len(entries)


# --- eval_coco.py ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pedestrian_model):
    folder = tmp_path_factory.mktemp("coco_ws")
    target = folder / "models" / pedestrian_model.name
    target.mkdir(parents=True)
    shutil.copy(pedestrian_model.graph_path, target / "frozen_inference_graph.pb")
    return folder


def eval_coco(*args, workspace, check_code=None):
    completed = subprocess.run([sys.executable, EVAL_COCO, *map(str, args), "-m", "ssdlite_mobilenet_v2_pedestrian",
                                "-w", str(workspace)], capture_output=True, text=True, timeout=600)
    if check_code is not None:
        assert completed.returncode == check_code, completed.stderr[-2000:]
    return completed


def summary_values(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"^ Average (?:Precision|Recall) .* = (-?\d\.\d{3})$", stdout, re.MULTILINE)]


def subset(voc_json: Path, folder: Path, ids: list[int]) -> Path:
    data = json.loads(voc_json.read_text())
    data["images"] = [image for image in data["images"] if image["id"] in ids]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = folder / "subset.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.tensorflow
def test_eval_coco_compares_two_backends(workspace, voc_dir, voc_json):
    result = eval_coco("onnxruntime", "-i", voc_dir / "JPEGImages", "-a", voc_json, "--limit", 60,
                       "--compare", "tensorflow", workspace=workspace, check_code=0)
    values = summary_values(result.stdout)
    assert len(values) == 24                                   # the standard 12-line summary, twice
    assert "COCO bbox on voc2007_test.json: 60 images, categories person; model ssdlite" in result.stdout
    table = result.stdout.split("onnxruntime vs tensorflow:\n")[1].splitlines()
    assert table[0].split() == ["metric", "onnxruntime", "tensorflow", "delta", "(pts)"]
    ap, ap50 = table[1].split(), table[2].split()
    assert ap[0] == "AP" and ap50[0] == "AP50" and [t.split()[0] for t in table[1:13]] == list(SUMMARY_NAMES)
    assert float(ap[1]) == pytest.approx(values[0], abs=6e-4) and float(ap[2]) == pytest.approx(values[12], abs=6e-4)
    assert abs(float(ap[3])) <= 0.3 and abs(float(ap50[3])) <= 0.3
    assert 0.2 < float(ap[1]) < float(ap50[1]) < 1.0
    assert re.search(r"^AP \d\.\d{4} vs \d\.\d{4}: delta [+-]\d\.\d\d points, within the tolerance", result.stdout,
                     re.MULTILINE)
    # The saved results are what pycocotools scores by itself.
    saved = Path(re.findall(r"^Saved \d+ detections \(COCO results\) to: (.*)$", result.stdout, re.MULTILINE)[0])
    ground_truth = load_ground_truth(voc_json)
    ids = [image["id"] for image in ground_truth.dataset["images"][:60]]
    again = evaluate(ground_truth, json.loads(saved.read_text()), ids, [1])
    assert again.lines == result.stdout.split("categories person; model")[1].splitlines()[1:13]


def test_eval_coco_leaves_unreadable_images_out_of_the_ground_truth(workspace, voc_dir, voc_json, tmp_path):
    ids = [1, 10, 14, 22, 25, 27]                                # 000014 holds three people
    images = tmp_path / "images"
    images.mkdir()
    for image_id in ids:
        shutil.copy(voc_dir / "JPEGImages" / f"{image_id:06d}.jpg", images)
    (images / "000014.jpg").write_bytes(b"not a jpeg")
    result = eval_coco("onnxruntime", "-i", images, "-a", subset(voc_json, tmp_path, ids), workspace=workspace,
                       check_code=0)
    assert "warning: skipped cannot read image" in result.stderr and "000014.jpg" in result.stderr
    assert "1 of 6 images skipped (see warnings); their ground truth is left out of the AP" in result.stderr
    assert ": 5 images, categories person" in result.stdout
    saved = Path(re.findall(r"^Saved \d+ detections \(COCO results\) to: (.*)$", result.stdout, re.MULTILINE)[0])
    ground_truth = load_ground_truth(voc_json)
    detections = json.loads(saved.read_text())
    without = evaluate(ground_truth, detections, [i for i in ids if i != 14], [1])
    with_it = evaluate(ground_truth, detections, ids, [1])
    assert summary_values(result.stdout)[0] == float(f"{without.value('AP'):.3f}")
    assert with_it.value("AR100") < without.value("AR100")


def test_eval_coco_with_no_readable_image_is_exit_1(workspace, voc_dir, voc_json, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (1, 10):
        (images / f"{image_id:06d}.jpg").write_bytes(b"")
    result = eval_coco("onnxruntime", "-i", images, "-a", subset(voc_json, tmp_path, [1, 10]), workspace=workspace,
                       check_code=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: no image could be evaluated: all 2 images were skipped (see warnings)"]


@pytest.mark.tensorflow
def test_eval_coco_nan_ap_fails_and_so_does_comparing_it(workspace, voc_dir, voc_json, tmp_path):
    annotations = subset(voc_json, tmp_path, [2, 3, 6, 8])     # no person on these
    result = eval_coco("onnxruntime", "-i", voc_dir / "JPEGImages", "-a", annotations, "--compare", "tensorflow",
                       workspace=workspace, check_code=1)
    assert "AP nan vs nan: cannot compare a NaN AP, FAILED" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: onnxruntime: AP is NaN: none of the 4 evaluated images")
    assert "tensorflow: AP is NaN" in errors[0]


@pytest.mark.slow
def test_eval_coco_on_the_300_images(workspace, voc_dir, voc_json):
    result = eval_coco("onnxruntime", "-i", voc_dir / "JPEGImages", "-a", voc_json, workspace=workspace, check_code=0)
    values = summary_values(result.stdout)
    assert values[0] == pytest.approx(0.305, abs=0.002) and values[1] == pytest.approx(0.616, abs=0.002)
