"""End-to-end runs of detect_objects.py and model.py as subprocesses (real models, no mocks)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES_DIR, REPO_ROOT, WORKSPACE

DETECT = REPO_ROOT / "detect_objects.py"
MODEL = REPO_ROOT / "model.py"
PEDESTRIAN = "ssdlite_mobilenet_v2_pedestrian"
PERSON_JPG = IMAGES_DIR / "person.jpg"
DOG_JPG = IMAGES_DIR / "dog.jpg"
# TF's own detection of the person in person.jpg (normalised ymin, xmin, ymax, xmax).
TF_PERSON_BOX = (0.239, 0.286, 0.899, 0.429)
BOX_TOLERANCE = 0.03  # normalised


def run(script: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def detect(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run(DETECT, *args, "-m", PEDESTRIAN, "-w", WORKSPACE, cwd=cwd)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def leftovers(folder: Path) -> list[Path]:
    """Temporary files (atomic writes use '.<stem>.<random>.tmp<suffix>') anywhere under ``folder``."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def normalised_box(entry: dict, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """COCO bbox [x, y, w, h] in pixels -> (ymin, xmin, ymax, xmax) normalised."""
    x, y, w, h = entry["bbox"]
    width, height = size
    return y / height, x / width, (y + h) / height, (x + w) / width


def assert_coco_entry(entry: dict, size: tuple[int, int]) -> None:
    assert set(entry) - {"file_name"} == {"image_id", "category_id", "bbox", "score"}, entry
    assert isinstance(entry["image_id"], int) and isinstance(entry["category_id"], int)
    x, y, w, h = entry["bbox"]
    width, height = size
    assert 0 <= x and 0 <= y and w > 0 and h > 0, entry
    assert x + w <= width + 0.01 and y + h <= height + 0.01, (entry, size)
    assert 0.0 <= entry["score"] <= 1.0


def assert_person_box(entry: dict, size: tuple[int, int]) -> None:
    got = normalised_box(entry, size)
    assert np.allclose(got, TF_PERSON_BOX, atol=BOX_TOLERANCE), (got, TF_PERSON_BOX)


@pytest.fixture(scope="module")
def pedestrian(pedestrian_onnx):
    """The pedestrian model converted and cached in REPO/workspace, so that runs only load it."""
    assert pedestrian_onnx.onnx_path.is_file()
    return pedestrian_onnx


# 1. One image -> one annotated image.

def auto_runner() -> tuple[str, str]:
    """The runner name and precision ``--backend auto`` gives here (no GPU): OpenVINO (BF16 where the CPU has it)
    when installed, else ONNX Runtime FP32."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        return "ONNX Runtime", "FP32"
    from utils.runtime.openvino import supports_bf16

    return "OpenVINO", "BF16" if supports_bf16() else "FP32"


def test_single_image(pedestrian, tmp_path):
    out_dir = tmp_path / "result"
    result = detect(PERSON_JPG, "-o", out_dir / "OUT.jpg", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    name, precision = auto_runner()
    for expected in (f"{name} inference engine settings:", f"Inference precision - {precision}", "Max batch size - 1",
                     "Detected person with confidence", f"{name} inference time:",
                     "Total time taken for one image:", f"Saved output image to: {out_dir / 'OUT.jpg'}"):
        assert expected in result.stdout, (expected, describe(result))
    assert not error_lines(result.stderr), describe(result)

    assert sorted(p.name for p in out_dir.iterdir()) == ["OUT.jpg"]  # no temp files beside it
    assert not (tmp_path / "image_inferred.jpg").exists()
    with Image.open(PERSON_JPG) as original, Image.open(out_dir / "OUT.jpg") as drawn:
        assert drawn.format == "JPEG" and drawn.size == original.size
        before = np.asarray(original.convert("RGB"), dtype=np.int16)
        after = np.asarray(drawn.convert("RGB"), dtype=np.int16)
    # JPEG re-encoding alone changes pixels a little; the drawn box changes them a lot, around the person.
    changed = np.abs(after - before).max(axis=2) > 100
    assert changed.sum() > 500, changed.sum()
    rows, cols = np.nonzero(changed)
    height, width = before.shape[:2]
    ymin, xmin, ymax, xmax = TF_PERSON_BOX
    assert abs(cols.min() / width - xmin) < 0.05 and abs(cols.max() / width - xmax) < 0.05
    assert abs(rows.max() / height - ymax) < 0.05 and ymin - 0.1 < rows.min() / height < ymin + 0.05


# 2. Several inputs and a folder, batched, with COCO JSON.

def _many_inputs(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "more"
    folder.mkdir()
    for name in ("kite.jpg", "horses.jpg"):
        shutil.copy(IMAGES_DIR / name, folder / name)
    (folder / "notes.txt").write_text("not an image; folders are filtered by suffix\n")
    return [PERSON_JPG, DOG_JPG, folder]


def test_many_inputs_json_and_batch_equivalence(pedestrian, tmp_path):
    inputs = _many_inputs(tmp_path)
    names = ["person.jpg", "dog.jpg", "horses.jpg", "kite.jpg"]  # folder contents sorted by name
    sizes = {name: Image.open(IMAGES_DIR / name).size for name in names}
    runs = {}
    for batch in (3, 1):
        out_dir = tmp_path / f"out_b{batch}"
        result = detect(*inputs, "-b", batch, "-o", out_dir, "--json", f"b{batch}.json", cwd=tmp_path)
        assert result.returncode == 0, describe(result)
        assert f"Max batch size - {batch}" in result.stdout
        assert ("(batch of 3)" in result.stdout) == (batch == 3), describe(result)
        for name in names:
            assert f"Saved output image to: {out_dir / (Path(name).stem + '_inferred.jpg')}" in result.stdout
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{Path(n).stem}_inferred.jpg" for n in names)
        for name in names:
            with Image.open(out_dir / f"{Path(name).stem}_inferred.jpg") as drawn:
                assert drawn.size == sizes[name]
        assert not leftovers(tmp_path)
        runs[batch] = json.loads((tmp_path / f"b{batch}.json").read_text())
        assert f"Saved {len(runs[batch])} detections to: b{batch}.json" in result.stdout

    coco = runs[3]
    assert isinstance(coco, list) and coco
    for entry in coco:
        assert Path(entry["file_name"]).name in names and entry["category_id"] == 1, entry
        assert entry["score"] >= 0.5
        assert_coco_entry(entry, sizes[Path(entry["file_name"]).name])
    people = [e for e in coco if Path(e["file_name"]).name == "person.jpg"]
    assert len(people) == 1, people
    assert people[0]["score"] > 0.9
    assert_person_box(people[0], sizes["person.jpg"])
    assert not [e for e in coco if Path(e["file_name"]).name == "dog.jpg"]

    # Batching must not change the results.
    assert len(runs[1]) == len(runs[3])
    key = lambda e: (e["image_id"], -e["score"])  # noqa: E731
    for one, three in zip(sorted(runs[1], key=key), sorted(runs[3], key=key)):
        assert (one["image_id"], one["category_id"]) == (three["image_id"], three["category_id"])
        assert abs(one["score"] - three["score"]) <= 1e-4, (one, three)
        assert np.allclose(one["bbox"], three["bbox"], atol=0.5), (one, three)


# 3. Unreadable images among good ones.

def test_bad_images_are_reported_and_skipped(pedestrian, tmp_path):
    (tmp_path / "bad.jpg").write_text("this is a text file, not a JPEG\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = PERSON_JPG.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    bad = ["bad.jpg", "empty.jpg", "missing.jpg", "truncated.jpg"]
    out_dir = tmp_path / "out"
    # -b 2: batches [person, bad], [empty, missing] (nothing to run), [truncated, dog].
    result = detect(PERSON_JPG, *bad, DOG_JPG, "-b", "2", "-o", out_dir, "--json", "r.json",
                    cwd=tmp_path)
    assert result.returncode == 1, describe(result)
    errors = error_lines(result.stderr)
    assert len(errors) == len(bad), describe(result)
    for name, line in zip(bad, errors):
        assert line.startswith(f"error: cannot read image '{name}'"), line
    assert "error: cannot read image 'empty.jpg': the file is empty" in errors[1]
    assert "no such file" in errors[2]
    assert "4 of 6 inputs failed" in result.stderr
    assert "Traceback" not in result.stderr

    assert "Detected person with confidence" in result.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["dog_inferred.jpg", "person_inferred.jpg"]
    coco = json.loads((tmp_path / "r.json").read_text())
    assert [Path(e["file_name"]).name for e in coco] == ["person.jpg"]
    assert not leftovers(tmp_path)


# 4. Model errors: exit 2, one error line, nothing left behind.

@pytest.fixture
def not_ssd_graph(tmp_path) -> Path:
    tf = pytest.importorskip("tensorflow")
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 4], name="x")
        tf.add(x, x, name="y")
    path = tmp_path / "not_ssd.pb"
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


def test_model_errors(pedestrian, not_ssd_graph, tmp_path):
    ws = tmp_path / "ws"
    (tmp_path / "random.pb").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (tmp_path / "text.pb").write_text("frozen_inference_graph, honestly\n" * 20)
    (tmp_path / "empty").mkdir()
    cases = [
        (["-m", "random.pb"], "is not a TensorFlow GraphDef"),
        (["-m", "text.pb"], "is not a TensorFlow GraphDef"),
        (["-m", not_ssd_graph.name], "is not a TF Object Detection API SSD graph: missing image_tensor"),
        (["-m", "no_such_model"], "unknown model 'no_such_model'"),
        # The real graph (as a .pb path, so that nothing is downloaded into ws), INT8 without calibration images.
        (["-m", pedestrian.onnx_path.parent / "frozen_inference_graph.pb", "-p", "INT8", "--calib-dir", "empty"],
         "no calibration images (*.jpg, *.png) in empty"),
    ]
    for args, message in cases:
        result = run(MODEL, *args, "-w", ws, cwd=tmp_path)
        assert result.returncode == 2, (args, describe(result))
        assert result.stdout == "", (args, describe(result))
        errors = error_lines(result.stderr)
        assert len(errors) == 1 and message in errors[0], (args, describe(result))
        assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0]
        assert "Traceback" not in result.stderr
    assert not list(ws.rglob("*.onnx")), list(ws.rglob("*"))
    assert not list(ws.rglob("*.json")), list(ws.rglob("*"))
    assert not leftovers(tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


# 5. model.py on the real model.

def test_model_convert(pedestrian, tmp_path):
    result = run(MODEL, "-m", PEDESTRIAN, "-w", WORKSPACE, cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    last = Path(result.stdout.strip().splitlines()[-1])
    assert last.suffix == ".onnx" and last.is_file(), describe(result)
    assert last.resolve() == pedestrian.onnx_path.resolve()
    assert "cached, up to date" in result.stderr

    target = tmp_path / "sub" / "x.onnx"
    result = run(MODEL, "-m", PEDESTRIAN, "-w", WORKSPACE, "-o", target, cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert Path(result.stdout.strip().splitlines()[-1]) == target
    assert target.is_file() and target.stat().st_size > 1_000_000
    import onnx

    onnx.checker.check_model(str(target))
    assert not leftovers(tmp_path)


# 6. The TensorFlow backend.

def test_tensorflow_backend(pedestrian, tmp_path):
    pytest.importorskip("tensorflow")
    result = detect(PERSON_JPG, "--backend", "tensorflow", "-o", "tf.jpg", "--json", "tf.json", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert "TensorFlow inference engine settings:" in result.stdout
    assert "TensorFlow inference time" in result.stdout
    assert "Detected person with confidence" in result.stdout
    assert (tmp_path / "tf.jpg").is_file()
    people = json.loads((tmp_path / "tf.json").read_text())
    assert len(people) == 1
    assert_person_box(people[0], Image.open(PERSON_JPG).size)


# 7. Unusual image modes and EXIF orientation.

def test_unusual_image_modes(pedestrian, tmp_path):
    with Image.open(PERSON_JPG) as original:
        original.load()
    size = original.size
    original.convert("L").save(tmp_path / "gray.jpg")
    original.convert("RGBA").save(tmp_path / "rgba.png")
    original.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    original.convert("CMYK").save(tmp_path / "cmyk.jpg")
    # Pixels stored rotated 90° counter-clockwise (the person lies on its side) with EXIF orientation 6
    # ("rotate 90° clockwise to display"): a viewer, and the detector, should see the person upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    original.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif6.jpg", exif=exif)
    files = ["gray.jpg", "rgba.png", "palette.png", "cmyk.jpg", "exif6.jpg"]
    for name, mode in zip(files, ("L", "RGBA", "P", "CMYK", "RGB")):
        with Image.open(tmp_path / name) as image:
            assert image.mode == mode

    result = detect(*files, "-o", "out", "--json", "modes.json", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    coco = json.loads((tmp_path / "modes.json").read_text())
    for name in files:
        people = [e for e in coco if e["file_name"] == name and e["category_id"] == 1 and e["score"] >= 0.5]
        assert len(people) == 1, (name, coco)
        assert_coco_entry(people[0], size)
        with Image.open(tmp_path / "out" / f"{Path(name).stem}_inferred.jpg") as drawn:
            assert drawn.size == size, name  # drawn on the upright image

    # EXIF honoured: the box is in the upright frame (tall, where person.jpg's box is) ...
    (box,) = [e["bbox"] for e in coco if e["file_name"] == "exif6.jpg"]
    assert box[3] > 2 * box[2], box
    assert_person_box({"bbox": box}, size)
    # ... which, in the frame of the stored (rotated) pixels, is wider than tall.
    with Image.open(tmp_path / "exif6.jpg") as stored:
        assert stored.size == (size[1], size[0])
    x, y, w, h = box
    stored_box = (y, size[0] - (x + w), h, w)  # upright -> stored: (x, y) -> (y, W - x)
    assert stored_box[2] > stored_box[3], stored_box
