"""Runners behind one interface: ``open_runner`` opens a file (utils.artifact.Artifact) with the
runner of its backend. Runner modules are imported only when used."""

from __future__ import annotations

import importlib
import importlib.util

from utils.artifact import Artifact
from utils.errors import UserError
from utils.runtime.base import Runner, RuntimeOptions, valid_rows

__all__ = ["BACKENDS", "Runner", "RuntimeOptions", "backend_of", "installed", "open_runner", "valid_rows"]

BACKENDS = ("tensorrt", "onnxruntime", "openvino", "tensorflow")
KIND_OF = {"tensorrt": "engine", "onnxruntime": "onnx", "openvino": "onnx", "tensorflow": "frozen"}
_RUNNERS = {"tensorrt": ("utils.runtime.tensorrt", "TensorRTRunner"),
            "onnxruntime": ("utils.runtime.onnxruntime", "OnnxRuntimeRunner"),
            "openvino": ("utils.runtime.openvino", "OpenVinoRunner"),
            "tensorflow": ("utils.runtime.tensorflow", "TensorFlowRunner")}
_INSTALL = {"tensorrt": "pip install -r requirements-trt.txt", "onnxruntime": "pip install -r requirements.txt",
            "openvino": "pip install -r requirements.txt", "tensorflow": "pip install -r requirements.txt"}


def tensorrt_usable(module: str | None = None) -> bool:
    """A TensorRT module and cuda-python are installed and a CUDA GPU is present."""
    names = (module,) if module else ("tensorrt", "tensorrt_rtx")
    if not any(importlib.util.find_spec(name) for name in names) or importlib.util.find_spec("cuda") is None:
        return False
    from utils.trt import gpu_count  # noqa: PLC0415

    return gpu_count() > 0


def installed(backend: str) -> bool:
    """The backend's runtime can be imported here (TensorRT: and a GPU is present)."""
    if backend == "tensorrt":
        return tensorrt_usable()
    return importlib.util.find_spec(backend) is not None


def backend_of(kind: str) -> str:
    """The default backend of a file of ``kind`` (an ONNX: onnxruntime; openvino runs it too)."""
    return next(name for name, of in KIND_OF.items() if of == kind)


def open_runner(artifact: Artifact, max_batch_size: int, options: RuntimeOptions = RuntimeOptions(),
                backend: str | None = None) -> Runner:
    """The runner of ``backend`` (default: that of ``artifact``'s kind), ready to detect; use it as a context
    manager."""
    backend = backend or backend_of(artifact.kind)
    if KIND_OF[backend] != artifact.kind:
        raise UserError(f"the {backend} backend does not run a file of kind {artifact.kind} ({artifact.path})")
    module_name, class_name = _RUNNERS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"the {backend} backend needs {exc.name}; run: {_INSTALL[backend]}") from None
    return getattr(module, class_name)(artifact, max_batch_size, options)
