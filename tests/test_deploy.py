"""Convert once, deploy the file: model.py -> build_engine.py -> detect / evaluate from the ONNX or engine,
in processes where TensorFlow cannot be imported, with the detections and AP of the -m MODEL path."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import IMAGES_DIR, REPO_ROOT, WORKSPACE

PEDESTRIAN = "ssdlite_mobilenet_v2_pedestrian"
LIMIT = "60"

# Runs a script with every import of TensorFlow (and tf2onnx, which needs it) failing.
NO_TENSORFLOW = """
import os, runpy, sys

class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf2onnx", "tf_keras", "keras"):
            raise ImportError(f"{name} cannot be imported in this test")
        return None

sys.meta_path.insert(0, _NoTensorFlow())
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    assert not any(name.split(".")[0] == "tensorflow" for name in sys.modules), "tensorflow was imported"
"""


def run(script: str, *args, cwd: Path, without_tensorflow: bool = False) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", NO_TENSORFLOW] if without_tensorflow else [sys.executable]
    return subprocess.run([*prefix, str(REPO_ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, pedestrian_model) -> Path:
    """model.py's core ONNX of the pedestrian model, alone in a folder (no graph, no cache key beside it)."""
    folder = tmp_path_factory.mktemp("converted")
    result = run("model.py", "-m", PEDESTRIAN, "-w", WORKSPACE, "--flavour", "core", "-o", folder / "pedestrian.onnx",
                 cwd=folder)
    assert result.returncode == 0, describe(result)
    assert Path(result.stdout.strip().splitlines()[-1]) == folder / "pedestrian.onnx"
    box = tmp_path_factory.mktemp("deploy")
    shutil.copy(folder / "pedestrian.onnx", box / "pedestrian.onnx")
    return box / "pedestrian.onnx"


def coco(path: Path) -> dict:
    return {(e["image_id"], e["category_id"]): e for e in json.loads(path.read_text())}


def test_detect_from_the_onnx_without_tensorflow(deployed, tmp_path):
    from_file = run("detect_objects.py", IMAGES_DIR, "--onnx", deployed, "-b", "2", "-t", "0.3", "-o", "drawn",
                    "--json", "file.json", cwd=tmp_path, without_tensorflow=True)
    assert from_file.returncode == 0, describe(from_file)
    assert "ONNX flavour - core" in from_file.stdout and "Detected person with confidence" in from_file.stdout
    from_model = run("detect_objects.py", IMAGES_DIR, "-m", PEDESTRIAN, "-w", WORKSPACE, "--flavour", "core", "-b", "2",
                     "-t", "0.3", "-o", "drawn_m", "--json", "model.json", cwd=tmp_path)
    assert from_model.returncode == 0, describe(from_model)
    ours, theirs = coco(tmp_path / "file.json"), coco(tmp_path / "model.json")
    assert ours.keys() == theirs.keys() and ours
    for key, entry in ours.items():
        assert entry["score"] == theirs[key]["score"] and entry["bbox"] == theirs[key]["bbox"], key
    assert len(list((tmp_path / "drawn").glob("*_inferred.jpg"))) == len(list(IMAGES_DIR.glob("*.jpg")))


def test_evaluate_from_the_onnx_without_tensorflow(deployed, tmp_path, shared_dir):
    voc = shared_dir / "data" / "VOCdevkit" / "VOC2007"
    from_file = run("voc_evaluation.py", "onnxruntime", "--onnx", deployed, "-d", voc, "--limit", LIMIT,
                    "-w", tmp_path / "ws_file", cwd=tmp_path, without_tensorflow=True)
    assert from_file.returncode == 0, describe(from_file)
    from_model = run("voc_evaluation.py", "onnxruntime", "-m", PEDESTRIAN, "-w", WORKSPACE, "--flavour", "core",
                     "-d", voc, "--limit", LIMIT, "-f", cwd=tmp_path)
    assert from_model.returncode == 0, describe(from_model)
    aps = [re.findall(r"^person\s*: (\d\.\d{4})$", r.stdout, re.MULTILINE) for r in (from_file, from_model)]
    assert aps[0] == aps[1] and len(aps[0]) == 1 and 0.3 < float(aps[0][0]) < 1, aps
    results = tmp_path / "ws_file" / "results" / PEDESTRIAN / "onnxruntime" / "core" / "FP32"
    assert (results / "det_test_person.txt").stat().st_size > 0


def test_build_engine_ahead_of_time_without_tensorflow(deployed, tmp_path):
    """build_engine.py with TensorRT-RTX for compute capability 8.6 on this GPU-less machine: the engine and a
    sidecar that describes it; detect_objects.py --engine then says in one line that it needs a GPU."""
    pytest.importorskip("tensorrt_rtx")
    engine = tmp_path / "pedestrian.engine"
    built = run("build_engine.py", "--onnx", deployed, "--engine", engine, "--trt-module", "tensorrt_rtx",
                "--compute-capability", "86", "-b", "4", "-w", tmp_path / "ws", cwd=tmp_path, without_tensorflow=True)
    assert built.returncode == 0, describe(built)
    assert Path(built.stdout.strip().splitlines()[-1]) == engine and engine.stat().st_size > 1_000_000
    sidecar = json.loads(engine.with_suffix(".json").read_text())
    artifact = sidecar["artifact"]
    assert artifact["flavour"] == "core" and artifact["precision"] == "FP32" and artifact["max_batch_size"] == 4
    assert artifact["trt_module"].startswith("tensorrt_rtx ") and artifact["labels"] == {"1": "person"}
    assert sidecar["key"]["target"] == "compute capability SM86"
    again = run("build_engine.py", "--onnx", deployed, "--engine", engine, "--trt-module", "tensorrt_rtx",
                "--compute-capability", "8.6", "-b", "4", cwd=tmp_path, without_tensorflow=True)
    assert again.returncode == 0 and "cached, up to date" in again.stderr, describe(again)
    detect = run("detect_objects.py", IMAGES_DIR / "person.jpg", "--engine", engine, cwd=tmp_path,
                 without_tensorflow=True)
    errors = [line for line in detect.stderr.splitlines() if line.startswith("error:")]
    assert detect.returncode == 2 and errors == [detect.stderr.strip().splitlines()[-1]], describe(detect)
    assert "GPU" in errors[0] and "Traceback" not in detect.stderr


@pytest.mark.parametrize("case", ["no metadata", "not onnx", "missing", "flavour", "precision", "engine no sidecar",
                                  "tensorflow on a file", "both sources"])
def test_bad_files_are_one_line(case, deployed, tmp_path):
    import onnx

    args = {"missing": ["--onnx", tmp_path / "nope.onnx"],
            "flavour": ["--onnx", deployed, "--flavour", "portable"],
            "precision": ["--onnx", deployed, "-p", "FP16"],
            "tensorflow on a file": ["--onnx", deployed, "--backend", "tensorflow"],
            "both sources": ["--onnx", deployed, "-m", PEDESTRIAN]}.get(case)
    if case == "no metadata":
        plain = onnx.load(str(deployed))
        del plain.metadata_props[:]
        onnx.save(plain, str(tmp_path / "plain.onnx"))
        args = ["--onnx", tmp_path / "plain.onnx"]
    elif case == "not onnx":
        (tmp_path / "text.onnx").write_text("not a model\n")
        args = ["--onnx", tmp_path / "text.onnx"]
    elif case == "engine no sidecar":
        (tmp_path / "x.engine").write_bytes(b"\0" * 64)
        args = ["--engine", tmp_path / "x.engine"]
    result = run("detect_objects.py", IMAGES_DIR / "person.jpg", *args, "-o", "out.jpg", cwd=tmp_path,
                 without_tensorflow=True)
    errors = [line for line in result.stderr.splitlines() if "error: " in line]   # ours, or argparse's usage error
    assert result.returncode == 2 and len(errors) == 1, describe(result)
    assert "Traceback" not in result.stderr and not (tmp_path / "out.jpg").exists()


def test_cuda_options_reach_the_runner_and_are_refused_elsewhere(deployed):
    """--cuda-graph / --nhwc go into the plan's runtime options (ONNX Runtime's CUDA provider); another backend
    refuses them in one line."""
    from utils.errors import UserError
    from utils.plan import Plan
    from utils.runtime.onnxruntime import cuda_provider_options

    plan = Plan.resolve(onnx=deployed, backend="onnxruntime", cuda_graph=True, nhwc=True, batch_size=8)
    assert plan.options.cuda_graph and plan.options.nhwc
    assert cuda_provider_options(plan.options.cuda_graph, plan.options.nhwc)["enable_cuda_graph"] == "1"
    assert (plan.flavour, plan.precision, plan.decode) == ("core", "FP32", "cpu")
    with plan.open(plan.prepare()) as runner:     # on this CPU machine: the CPU provider, graphs off
        assert runner.device == "CPU" and not runner.cuda_graph
        detections, counts = runner.detect(np.zeros((3, 3, 300, 300), np.float32))
        assert detections.shape == (3, 100, 7) and counts.shape == (3,)
    with pytest.raises(UserError, match="ONNX Runtime CUDA options"):
        Plan.resolve(model=PEDESTRIAN, backend="tensorflow", cuda_graph=True)


def test_the_plan_is_picklable_and_resolves_once(deployed):
    import pickle

    from utils.plan import Plan

    plan = Plan.resolve(onnx=deployed, batch_size=4)
    from utils.runtime import installed

    # auto without a GPU or TensorRT: OpenVINO where installed (requirements.txt), else ONNX Runtime's CPU build
    assert plan.backend == ("openvino" if installed("openvino") else "onnxruntime") and plan.flavour == "core"
    assert pickle.loads(pickle.dumps(plan)) == plan
    artifact = plan.prepare()
    copy = pickle.loads(pickle.dumps(plan))        # what a Ray actor gets: the same key for the same file
    assert copy.key(copy.prepare()) == plan.key(artifact) and plan.key(artifact)["artifact"]["sha256"]
    # the core flavour's NMS runs outside the file: an override applies at run time and changes the key
    from utils.ssd_spec import NmsOverrides

    stricter = Plan.resolve(onnx=deployed, batch_size=4, nms=NmsOverrides(iou_threshold=0.3))
    assert stricter.key(artifact)["nms"]["iou_threshold"] == 0.3 != plan.key(artifact)["nms"]["iou_threshold"]
    with stricter.open(artifact) as runner:
        assert runner.spec.nms.iou_threshold == 0.3
