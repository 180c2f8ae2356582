"""ONNX Runtime backend: a converted ONNX flavour, on CUDA when available, else on the CPU.

``portable`` runs as is; ``trt-plugins`` runs with plugin/'s reference ops registered;
``core`` is followed by the numpy NMS of utils.postprocess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from utils.backends.base import Backend
from utils.converter import NmsOverrides, convert
from utils.models import ResolvedModel
from utils.onnx_export import BOXES, DETECTIONS, INPUT, NUM_DETECTIONS, SCORES
from utils.postprocess import multiclass_nms


def session_options(flavour: str) -> ort.SessionOptions:
    """Session options for a flavour (custom ops registered for trt-plugins)."""
    if flavour == "trt-plugins":
        from plugin.ort_ops import session_options as plugin_session_options  # noqa: PLC0415

        options = plugin_session_options()
    else:
        options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


@dataclass
class OnnxRuntimeBackend(Backend):
    session: ort.InferenceSession = None
    flavour: str = "portable"

    @classmethod
    def for_model(cls, model: ResolvedModel, precision: str, max_batch_size: int, nms: NmsOverrides,
                  log: Callable[[str], None], flavour: str = "portable") -> "OnnxRuntimeBackend":
        converted = convert(model, flavour, precision, nms)
        if converted.built:
            log(f"Converted {model.graph_path} to {converted.onnx_path} in {converted.seconds:.1f} s")
        else:
            log(f"Loading cached ONNX model from {converted.onnx_path}")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        session = ort.InferenceSession(str(converted.onnx_path), session_options(flavour), providers=providers)
        device = "CUDA" if session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        return cls(name="ONNX Runtime", precision=precision, max_batch_size=max_batch_size,
                   spec=converted.spec, device=device, session=session, flavour=flavour)

    def detect(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = {INPUT: np.ascontiguousarray(batch, dtype=np.float32)}
        if self.flavour == "core":
            boxes, scores = self.session.run([BOXES, SCORES], feed)
            return multiclass_nms(boxes, scores, self.spec.nms)
        detections, num_detections = self.session.run([DETECTIONS, NUM_DETECTIONS], feed)
        return detections, num_detections

    def settings(self) -> list[str]:
        return super().settings() + [f"  * ONNX flavour - {self.flavour}"]
