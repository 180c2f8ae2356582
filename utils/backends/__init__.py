"""Inference backends behind one small interface; ``create_backend`` picks and builds one."""

from __future__ import annotations

import importlib.util
from typing import Callable

from utils.backends.base import Backend
from utils.converter import NmsOverrides
from utils.errors import UserError
from utils.models import ResolvedModel

BACKENDS = ("auto", "tensorrt", "onnxruntime", "tensorflow")


def _tensorrt_usable() -> bool:
    """A TensorRT module and cuda-python are installed and a CUDA GPU is present."""
    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        return False
    if importlib.util.find_spec("cuda") is None:
        return False
    from utils.backends.tensorrt import gpu_count  # noqa: PLC0415

    return gpu_count() > 0


def available_backends() -> list[str]:
    """Backends whose runtime is installed here, best first (TensorRT only with a GPU)."""
    installed = [name for name, module in (("onnxruntime", "onnxruntime"), ("tensorflow", "tensorflow"))
                 if importlib.util.find_spec(module) is not None]
    return (["tensorrt"] if _tensorrt_usable() else []) + installed


def create_backend(kind: str, model: ResolvedModel, precision: str = "FP32", max_batch_size: int = 1,
                   nms: NmsOverrides = NmsOverrides(), log: Callable[[str], None] = print,
                   flavour: str | None = None) -> Backend:
    """Build the backend ``kind`` (or the best installed one for "auto") for ``model``.

    ``flavour`` picks the ONNX flavour of the converted backends (None: the backend's default).
    """
    if kind == "auto":
        installed = available_backends()
        if not installed:
            raise UserError("no inference runtime is installed; run: pip install -r requirements.txt")
        kind = installed[0]
    if kind == "tensorrt":
        from utils.backends.tensorrt import TensorRTBackend  # noqa: PLC0415

        return TensorRTBackend.for_model(model, precision, max_batch_size, nms, log, flavour)
    if kind == "onnxruntime":
        from utils.backends.onnxruntime import OnnxRuntimeBackend  # noqa: PLC0415

        return OnnxRuntimeBackend.for_model(model, precision, max_batch_size, nms, log, flavour or "portable")
    if kind == "tensorflow":
        from utils.backends.tensorflow import TensorFlowBackend  # noqa: PLC0415

        if any(value is not None for value in vars(nms).values()):
            raise UserError("NMS options apply to the converted graph; the tensorflow backend runs the "
                            "frozen graph as exported (drop --score-threshold/--iou-threshold/--top-k/--keep-top-k)")
        return TensorFlowBackend.for_model(model, precision, max_batch_size, log)
    raise UserError(f"unknown backend '{kind}'; choose one of {', '.join(BACKENDS)}")
