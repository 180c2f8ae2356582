"""FP16 and INT8 (Q/DQ) variants: structure, and what they cost in accuracy (ONNX Runtime, CPU)."""

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
