"""Which TensorRT: the module (TensorRT 10, 11 or TensorRT-RTX), what it can do, and the CUDA helpers.

Every difference between those modules lives in ``TrtModule``; building (utils.engine) and running
(utils.runtime.tensorrt) both read it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

from utils.errors import UserError

MODULES = ("tensorrt", "tensorrt_rtx")
PIP_NAMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx-cu13"}


def import_trt(name: str | None = None) -> ModuleType:
    """The TensorRT module ``name``, else the first importable of MODULES."""
    names = (name,) if name else MODULES
    for candidate in names:
        try:
            return importlib.import_module(candidate)
        except ImportError:
            continue
    wanted = " or ".join(PIP_NAMES.get(n, n) for n in names)
    raise UserError(f"TensorRT is not installed (no module {', '.join(names)}); run: pip install {wanted} "
                    f"(or pip install -r requirements-trt.txt)")


@dataclass(frozen=True)
class TrtModule:
    """What one TensorRT module can do; the only place where TRT 10, TRT 11 and RTX differ."""

    module: str
    version: str
    is_rtx: bool
    major: int

    @classmethod
    def of(cls, trt: ModuleType) -> "TrtModule":
        name = trt.__name__.split(".")[0]
        version = str(trt.__version__)
        return cls(name, version, is_rtx="rtx" in name, major=int(version.split(".")[0]))

    @property
    def strongly_typed(self) -> bool:
        """Precision comes from the ONNX (FP16 / Q/DQ variants), not from builder flags."""
        return self.is_rtx or self.major >= 11

    @property
    def precision_flags(self) -> bool:
        """BuilderFlag.FP16/INT8 and the INT8 calibrator (TensorRT 10 only)."""
        return not self.strongly_typed

    @property
    def compute_capability_target(self) -> bool:
        """Engines are built for a named compute capability, with or without a GPU (RTX only)."""
        return self.is_rtx

    @property
    def runtime_cache(self) -> bool:
        """JIT kernels are kept in an IRuntimeCache (RTX only)."""
        return self.is_rtx

    @property
    def timing_cache(self) -> bool:
        """Builder timing cache (a no-op, deprecated, in RTX)."""
        return not self.is_rtx

    @property
    def default_flavour(self) -> str:
        """The ONNX flavour this TensorRT builds best: the original's plugins up to TRT 10, standard
        ops in TRT 11 (NMS_TRT is gone there), no NMS inside for TensorRT-RTX (it cannot build NMS)."""
        if self.is_rtx:
            return "core"
        return "trt-plugins" if self.major <= 10 else "portable"

    @property
    def label(self) -> str:
        return f"{self.module} {self.version}"


def import_cudart():
    """cuda-python's runtime bindings, or a one-line UserError saying what to install."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError as exc:
        raise UserError("cuda-python is not installed; run: pip install -r requirements-trt.txt") from exc
    return cudart


def gpu_count(cudart=None) -> int:
    """Number of CUDA GPUs (0 when there is no driver or no cuda-python)."""
    try:
        cudart = cudart or import_cudart()
        return int(cuda_call(cudart.cudaGetDeviceCount()))
    except (UserError, RuntimeError):
        return 0


def collecting_logger(trt: ModuleType):
    """An ILogger of ``trt`` that keeps ERROR messages (in ``.errors``) and drops the rest."""
    return _logger_class(trt)()


@functools.cache
def _logger_class(trt: ModuleType) -> type:
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))

    return _Logger


def cuda_call(result):
    """Unwrap a cuda-python (error, *values) tuple; RuntimeError on failure."""
    error, *values = result
    if int(error) != 0:
        raise RuntimeError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else tuple(values) or None


def gpu_name(cudart=None) -> str | None:
    """The name of CUDA device 0, or None without a driver, a GPU or cuda-python."""
    try:
        if cudart is None:
            from cuda.bindings import runtime as cudart  # noqa: PLC0415
        name = cuda_call(cudart.cudaGetDeviceProperties(0)).name
    except Exception:  # noqa: BLE001
        return None
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")


def compute_capability_name(value: str | None) -> str | None:
    """"86", "8.6", "sm86" or "SM86" -> "SM86" (TensorRT-RTX's ComputeCapability member); "current" -> "CURRENT"."""
    if value is None:
        return None
    text = str(value).strip().upper().replace(".", "").removeprefix("SM_").removeprefix("SM")
    return "CURRENT" if text == "CURRENT" else f"SM{text}"
