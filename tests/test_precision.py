"""FP16 and INT8 variants: structure, and what they cost in accuracy (ONNX Runtime, CPU).

INT8 comes in TensorRT's Q/DQ form (utils.converter) and ONNX Runtime's QOperator form (utils.quantize.int8_variant,
what ``--backend onnxruntime -p INT8`` runs); OpenVINO's NNCF form is tested in test_openvino.py."""

import numpy as np
import onnx
import pytest

from conftest import IMAGES_DIR, open_model
from utils.converter import convert
from utils.errors import UserError
from utils.preprocess import load_image, preprocess
from utils.runtime import valid_rows

pytestmark = pytest.mark.tensorflow

PHOTOS = [IMAGES_DIR / name for name in ("person.jpg", "kite.jpg", "dog.jpg", "horses.jpg")]


def _detect(model, precision, flavour="portable"):
    with open_model(model, precision=precision, batch_size=4, flavour=flavour) as runner:
        return runner.detect(np.stack([preprocess(load_image(path)) for path in PHOTOS]))


def test_fp16_variant_keeps_the_fp32_detections(pedestrian_model):
    converted = convert(pedestrian_model, "portable", "FP16")
    graph = onnx.load(str(converted.onnx_path)).graph
    conv_weights = {init.name: init.data_type for init in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in conv_weights.values()
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stay FP32
    fp32, fp32_counts = _detect(pedestrian_model, "FP32")
    fp16, fp16_counts = _detect(pedestrian_model, "FP16")
    for index in range(len(PHOTOS)):
        ours, reference = valid_rows(fp16[index], fp16_counts[index], 0.3), valid_rows(fp32[index], fp32_counts[index], 0.3)
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours[:, 2:], reference[:, 2:], atol=1e-2)


def test_int8_variant_is_qdq_and_still_finds_the_person(pedestrian_model, tmp_path):
    calibration = sorted(IMAGES_DIR.glob("*.jpg"))
    converted = convert(pedestrian_model, "portable", "INT8", output=tmp_path / "int8.onnx",
                        calibration_images=calibration)
    ops = {node.op_type for node in onnx.load(str(converted.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "NonMaxSuppression"} <= ops
    import onnxruntime as ort

    session = ort.InferenceSession(str(converted.onnx_path), providers=["CPUExecutionProvider"])
    detections, counts = session.run(None, {"Input": preprocess(load_image(PHOTOS[0]))[None]})
    best = valid_rows(detections[0], counts[0], 0.5)
    assert len(best) >= 1 and best[0, 1] == 1
    np.testing.assert_allclose(best[0, 3:], [0.286, 0.239, 0.429, 0.899], atol=0.05)


def test_int8_of_the_plugin_flavour_is_refused_in_one_line(pedestrian_model, tmp_path):
    with pytest.raises(UserError, match="trt-plugins") as error:
        convert(pedestrian_model, "trt-plugins", "INT8", output=tmp_path / "x.onnx",
                calibration_images=sorted(IMAGES_DIR.glob("*.jpg")))
    assert "\n" not in str(error.value)
    assert not list(tmp_path.glob("x*"))


@pytest.mark.slow
def test_onnxruntime_int8_is_qoperator_with_float_heads_and_keeps_the_person(pedestrian_model):
    """The onnxruntime backend's INT8: QLinearConv (integer kernels on the CPU), the heads' last convolutions FP32,
    cached beside the FP32 file under its own name; the person of person.jpg still found where FP32 finds it."""
    with open_model(pedestrian_model, precision="INT8", batch_size=4, calib_dir=IMAGES_DIR) as runner:
        assert runner.artifact.quantization == "onnxruntime-qoperator"
        assert runner.artifact.path.name.endswith("_INT8-onnxruntime-qoperator.onnx")
        graph = onnx.load(str(runner.artifact.path)).graph
        ours, counts = runner.detect(np.stack([preprocess(load_image(path)) for path in PHOTOS]))
    ops = {node.op_type for node in graph.node}
    assert "QLinearConv" in ops and "DequantizeLinear" in ops
    heads = [node for node in graph.node if node.name.endswith("ClassPredictor/BiasAdd")]
    assert heads and all(node.op_type == "Conv" for node in heads)
    fp32, fp32_counts = _detect(pedestrian_model, "FP32")
    reference, found = valid_rows(fp32[0], fp32_counts[0], 0.5), valid_rows(ours[0], counts[0], 0.4)
    assert len(reference) >= 1 and len(found) >= 1 and found[0, 1] == reference[0, 1] == 1
    np.testing.assert_allclose(found[0, 3:], reference[0, 3:], atol=0.03)


def test_calibration_never_defaults_to_the_evaluation_set(monkeypatch, tmp_path):
    from utils.quantize import REPO_IMAGES, calibration_images

    voc = tmp_path / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "JPEGImages" / "000001.jpg").write_bytes((IMAGES_DIR / "dog.jpg").read_bytes())
    monkeypatch.setenv("VOC_DIR", str(voc))
    assert all(path.parent == REPO_IMAGES for path in calibration_images())
    with pytest.raises(UserError, match="calibration images") as error:
        calibration_images(tmp_path / "empty")
    assert "\n" not in str(error.value)
