"""GridAnchor_TRT, FlattenConcat_TRT and NMS_TRT as ONNX Runtime custom ops (onnxruntime-extensions PyOps).

Importing the module registers the ops in the domain ``ai.onnx.contrib`` (the only one whose Python
ops ONNX Runtime runs). PyOps have a fixed arity and read only scalar attributes, so:

- GridAnchor_TRT has 6 outputs and FlattenConcat_TRT 6 inputs (the 6 feature maps of the SSDs that
  GridAnchor_TRT serves); a FlattenConcat_TRT of another input count (an FPN's 5 feature maps) runs as the
  same op registered under ``FlattenConcat_TRT_<count>``, the name ``for_onnxruntime`` gives it;
- list fields (aspectRatios, featureMapShapes, variance, inputOrder) must reach the ops as
  comma-separated strings: ``for_onnxruntime`` rewrites them in a copy of the model, and
  ``inference_session`` does that and registers the library. The ONNX file keeps TensorRT's types.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from plugin import reference

DOMAIN = "ai.onnx.contrib"
NUM_LAYERS = 6
LIST_FIELDS = {"GridAnchor_TRT": ("aspectRatios", "featureMapShapes", "variance"), "NMS_TRT": ("inputOrder",)}
_FLOAT, _INT, _TEXT = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string


def _numbers(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def _fields(op_type: str, attrs: dict) -> dict:
    """A node's fields as TensorRT reads them: lists parsed, floats rounded to float32 (PyOps pass them as decimals)."""
    fields = {name: float(np.float32(value)) if isinstance(value, float) else value for name, value in attrs.items()}
    return fields | {name: _numbers(attrs[name]) for name in LIST_FIELDS.get(op_type, ())}


@onnx_op(op_type="GridAnchor_TRT", domain=DOMAIN, inputs=[_FLOAT], outputs=[_FLOAT] * NUM_LAYERS,
         attrs={"minSize": _FLOAT, "maxSize": _FLOAT, "aspectRatios": _TEXT, "featureMapShapes": _TEXT,
                "variance": _TEXT, "numLayers": _INT})
def grid_anchor(_image: np.ndarray, **attrs) -> tuple[np.ndarray, ...]:
    layers = reference.grid_anchor(_fields("GridAnchor_TRT", attrs))
    if len(layers) != NUM_LAYERS:
        raise ValueError(f"the GridAnchor_TRT custom op has {NUM_LAYERS} outputs, the node asks for {len(layers)}")
    return tuple(layers)


@onnx_op(op_type="FlattenConcat_TRT", domain=DOMAIN, inputs=[_FLOAT] * NUM_LAYERS, outputs=[_FLOAT],
         attrs={"axis": _INT, "ignoreBatch": _INT})
def flatten_concat(*inputs: np.ndarray, axis: int, ignoreBatch: int) -> np.ndarray:  # noqa: N803
    return reference.flatten_concat(inputs, axis, ignoreBatch)


MAX_INPUTS = 8
for _count in set(range(1, MAX_INPUTS + 1)) - {NUM_LAYERS}:
    onnx_op(op_type=f"FlattenConcat_TRT_{_count}", domain=DOMAIN, inputs=[_FLOAT] * _count, outputs=[_FLOAT],
            attrs={"axis": _INT, "ignoreBatch": _INT})(flatten_concat)


@onnx_op(op_type="NMS_TRT", domain=DOMAIN, inputs=[_FLOAT] * 3, outputs=[_FLOAT, PyCustomOpDef.dt_int32],
         attrs={"shareLocation": _INT, "varianceEncodedInTarget": _INT, "backgroundLabelId": _INT,
                "numClasses": _INT, "topK": _INT, "keepTopK": _INT, "confidenceThreshold": _FLOAT,
                "nmsThreshold": _FLOAT, "inputOrder": _TEXT, "confSigmoid": _INT, "isNormalized": _INT,
                "codeType": _INT})
def nms(*inputs: np.ndarray, **attrs) -> tuple[np.ndarray, np.ndarray]:
    fields = _fields("NMS_TRT", attrs)
    loc, conf, priors = (inputs[int(i)] for i in fields["inputOrder"])   # TensorRT's order {loc, conf, prior}
    return reference.nms_trt(loc, priors, conf, fields)


def session_options() -> ort.SessionOptions:
    """Session options with the onnxruntime-extensions library (and so these ops) registered."""
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


def for_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose plugin nodes carry their list fields as comma-separated strings (and whose
    FlattenConcat_TRT nodes of other than 6 inputs name the op of their arity)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type == "FlattenConcat_TRT" and len(node.input) != NUM_LAYERS:
            if len(node.input) > MAX_INPUTS:
                raise ValueError(f"the FlattenConcat_TRT custom op takes at most {MAX_INPUTS} inputs, "
                                 f"{node.name} has {len(node.input)}")
            node.op_type = f"FlattenConcat_TRT_{len(node.input)}"
        for attr in node.attribute if node.domain == DOMAIN else ():
            if attr.name in LIST_FIELDS.get(node.op_type, ()) and attr.type in (onnx.AttributeProto.FLOATS,
                                                                               onnx.AttributeProto.INTS):
                text = ",".join(repr(value) for value in (attr.floats or attr.ints))
                attr.CopyFrom(onnx.helper.make_attribute(attr.name, text))
    return model


def inference_session(model: str | Path | onnx.ModelProto, providers: list[str] | None = None,
                      options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session of a trt-plugins model (``options`` must come from ``session_options``)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return ort.InferenceSession(for_onnxruntime(proto).SerializeToString(), options or session_options(),
                                providers=providers or ["CPUExecutionProvider"])
