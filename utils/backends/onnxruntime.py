"""ONNX Runtime backend: the converted portable ONNX, on CUDA when available, else on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from utils.backends.base import Backend
from utils.converter import NmsOverrides, convert
from utils.models import ResolvedModel
from utils.onnx_export import DETECTIONS, INPUT, NUM_DETECTIONS


@dataclass
class OnnxRuntimeBackend(Backend):
    session: ort.InferenceSession = None

    @classmethod
    def for_model(cls, model: ResolvedModel, precision: str, max_batch_size: int, nms: NmsOverrides,
                  log: Callable[[str], None]) -> "OnnxRuntimeBackend":
        converted = convert(model, "portable", precision, nms)
        if converted.built:
            log(f"Converted {model.graph_path} to {converted.onnx_path} in {converted.seconds:.1f} s")
        else:
            log(f"Loading cached ONNX model from {converted.onnx_path}")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(converted.onnx_path), options, providers=providers)
        device = "CUDA" if session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        return cls(name="ONNX Runtime", precision=precision, max_batch_size=max_batch_size,
                   spec=converted.spec, device=device, session=session)

    def detect(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        detections, num_detections = self.session.run([DETECTIONS, NUM_DETECTIONS],
                                                      {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})
        return detections, num_detections
