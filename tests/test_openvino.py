"""The openvino backend: FP32 equal to ONNX Runtime, BF16 and INT8 keeping FP32's detections, the plan's choices."""

import numpy as np
import pytest

from conftest import IMAGES_DIR, WORKSPACE, model_location, open_model
from parity import assert_same_detections
from utils.errors import UserError
from utils.preprocess import load_image, preprocess
from utils.runtime import valid_rows

pytest.importorskip("openvino", reason="openvino is not installed (pip install -r requirements.txt)")

pytestmark = pytest.mark.tensorflow     # converts the real model with TensorFlow


@pytest.fixture(scope="module")
def photos(shared_dir):
    """The real photos of ../shared/images and images/, preprocessed (PNGs too: other modes than JPEG's)."""
    paths = sorted({p.name: p for p in [*(shared_dir / "images").iterdir(), *IMAGES_DIR.iterdir()]
                    if p.suffix in (".jpg", ".png")}.values())
    return np.stack([preprocess(load_image(path)) for path in paths])


def _detect(model, backend, photos, **options):
    with open_model(model, backend=backend, batch_size=len(photos), **options) as runner:
        return runner.detect(photos), runner


def _iou(a, b):
    low, high = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(high - low, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


def _keeps_detections(reference, ours, threshold, min_iou=0.9, slack=0.1):
    """Every reference detection above ``threshold`` has one of ``ours`` of its class above threshold - slack at
    IoU >= min_iou; returns the failures."""
    failures = []
    for index in range(len(reference[0])):
        wanted = valid_rows(reference[0][index], reference[1][index], threshold)
        found = valid_rows(ours[0][index], ours[1][index], threshold - slack)
        for row in wanted:
            matches = [_iou(row[3:], other[3:]) for other in found if other[1] == row[1]]
            if not matches or max(matches) < min_iou:
                failures.append((index, row.tolist(), max(matches, default=0.0)))
    return failures


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["portable", "core"])
def test_fp32_equals_onnxruntime(pedestrian_model, photos, flavour):
    (ours, counts), runner = _detect(pedestrian_model, "openvino", photos, precision="FP32", flavour=flavour)
    assert runner.name == "OpenVINO" and runner.precision == "FP32"
    (reference, reference_counts), _ = _detect(pedestrian_model, "onnxruntime", photos, precision="FP32",
                                               flavour=flavour)
    assert_same_detections(ours, counts, reference, reference_counts, 0.0, what=f"OpenVINO vs ONNX Runtime ({flavour})",
                           box_tol=1e-4, iou=1.0)
    assert sum(len(valid_rows(d, n, 0.5)) for d, n in zip(ours, counts)) >= 2        # something was found


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["BF16", "INT8"])
def test_bf16_and_int8_keep_the_fp32_detections(pedestrian_model, photos, precision):
    from utils.runtime.openvino import supports_bf16

    if precision == "BF16" and not supports_bf16():
        pytest.skip("this CPU has no BF16 arithmetic")
    reference, _ = _detect(pedestrian_model, "openvino", photos, precision="FP32")
    ours, runner = _detect(pedestrian_model, "openvino", photos, precision=precision,
                           calib_dir=IMAGES_DIR)
    assert runner.precision == precision
    assert sum(len(valid_rows(d, n, 0.5)) for d, n in zip(*reference)) >= 2      # something to keep
    assert _keeps_detections(reference, ours, 0.5) == []
    if precision == "INT8":
        assert runner.artifact.quantization == "openvino-nncf"
        assert runner.artifact.path.name.endswith("_INT8-openvino-nncf.onnx")


@pytest.mark.slow
def test_int8_variant_is_cached_and_keyed_by_calibration(pedestrian_model, shared_dir):
    import onnx

    from utils.converter import convert
    from utils.quantize import calibration_images, int8_key, int8_variant

    fp32 = convert(pedestrian_model, "portable", "FP32").artifact
    few = calibration_images(IMAGES_DIR)[:2]
    first = int8_variant(fp32, "openvino-nncf", few)
    stamp = first.path.stat().st_mtime_ns
    assert int8_variant(fp32, "openvino-nncf", few).path.stat().st_mtime_ns == stamp      # cached
    assert int8_key(fp32, "openvino-nncf", few) != int8_key(fp32, "openvino-nncf", few[:1])
    assert int8_key(fp32, "openvino-nncf", few) != int8_key(fp32, "onnxruntime-qoperator", few)
    graph = onnx.load(str(first.path)).graph
    kept = [node for node in graph.node if node.name.endswith("ClassPredictor/BiasAdd")]
    assert kept and all(node.op_type == "Conv" for node in kept)          # heads in float
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)


def test_bf16_is_refused_where_the_backend_lacks_it(pedestrian_onnx):
    from utils.plan import Plan

    for backend in ("onnxruntime", "tensorflow"):
        source = {"onnx": pedestrian_onnx.onnx_path} if backend != "tensorflow" else {"model": "x"}
        with pytest.raises(UserError, match="BF16") as error:
            Plan.resolve(backend=backend, precision="BF16", workspace=WORKSPACE, **source)
        assert "\n" not in str(error.value) and "openvino" in str(error.value)


def test_openvino_refuses_the_plugin_flavour_and_fp16(pedestrian_model):
    from utils.plan import Plan

    with pytest.raises(UserError, match="trt-plugins") as error:
        Plan.resolve(model=model_location(pedestrian_model), workspace=WORKSPACE, backend="openvino",
                     flavour="trt-plugins")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="FP16"):
        Plan.resolve(model=model_location(pedestrian_model), workspace=WORKSPACE, backend="openvino",
                     precision="FP16")


def test_bf16_plan_runs_the_fp32_file(pedestrian_onnx):
    from utils.plan import Plan
    from utils.runtime.openvino import supports_bf16

    if not supports_bf16():
        pytest.skip("this CPU has no BF16 arithmetic")
    plan = Plan.resolve(onnx=pedestrian_onnx.onnx_path, backend="openvino", precision="BF16", workspace=WORKSPACE)
    artifact = plan.prepare()
    assert artifact.path == pedestrian_onnx.onnx_path and plan.runnable(artifact).precision == "BF16"
    fp32 = Plan.resolve(onnx=pedestrian_onnx.onnx_path, backend="openvino", precision="FP32", workspace=WORKSPACE)
    assert plan.key(artifact)["precision"] == "BF16" != fp32.key(artifact)["precision"]
    with plan.open(artifact) as runner:
        assert runner.precision == "BF16" and any("bf16" in line.lower() for line in runner.settings())
