"""TensorRT backend: converted ONNX -> cached engine -> one execution context with fixed CUDA buffers.

Buffers (device + pinned host staging) are allocated once for the maximum batch; each ``detect``
copies in, runs ``execute_async_v3`` and copies out on one stream. For the ``core`` flavour the NMS
runs on the host (utils.postprocess.batched_multiclass_nms), as TensorRT-RTX cannot build NonMaxSuppression.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np

from utils.backends.base import Backend
from utils.converter import NmsOverrides, convert
from utils.engine import (INPUT, EngineSettings, TrtFlavor, collecting_logger, cuda_call, engine_path,
                          entropy_calibrator, gpu_name, import_trt, load_or_build_engine)
from utils.errors import UserError
from utils.files import write_bytes_atomic
from utils.models import ResolvedModel
from utils.onnx_export import BOXES, DETECTIONS, NUM_DETECTIONS, SCORES
from utils.precision import CALIBRATION_BATCH, calibration_images

CORE_OUTPUTS = (BOXES, SCORES)
PORTABLE_OUTPUTS = (DETECTIONS, NUM_DETECTIONS)


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


@dataclass
class _Buffer:
    """One engine tensor: device memory and its pinned host mirror, sized for the max batch."""

    name: str
    device: int
    host: np.ndarray
    host_ptr: int


def _allocate(cudart, name: str, shape: tuple[int, ...], dtype: np.dtype) -> _Buffer:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    device = int(cuda_call(cudart.cudaMalloc(nbytes)))
    host_ptr = int(cuda_call(cudart.cudaMallocHost(nbytes)))
    host = np.frombuffer((ctypes.c_byte * nbytes).from_address(host_ptr), dtype=dtype).reshape(shape)
    return _Buffer(name, device, host, host_ptr)


@dataclass
class TensorRTBackend(Backend):
    trt: ModuleType = None
    cudart: object = None
    context: object = None
    stream: int = 0
    flavour: str = "core"
    buffers: dict = field(default_factory=dict)
    runtime_cache: tuple | None = None   # (IRuntimeCache, file) for RTX

    @classmethod
    def for_model(cls, model: ResolvedModel, precision: str, max_batch_size: int, nms: NmsOverrides,
                  log: Callable[[str], None], flavour: str | None = None, compute_capability: str | None = None,
                  trt_module: str | None = None) -> "TensorRTBackend":
        """Convert ``model``, load or build its engine and get it ready to run."""
        trt = import_trt(trt_module)
        cudart = import_cudart()
        if gpu_count(cudart) == 0:
            raise UserError("no CUDA GPU is available for TensorRT; use --backend onnxruntime")
        flavor = TrtFlavor.of(trt)
        flavour = flavour or flavor.default_flavour
        settings = EngineSettings(precision, max_batch_size, compute_capability=compute_capability or "CURRENT",
                                  flavour=flavour)
        converted = convert(model, flavour, settings.onnx_precision(flavor), nms)
        log(f"Loading cached ONNX model from {converted.onnx_path}" if not converted.built else
            f"Converted {model.graph_path} to {converted.onnx_path} in {converted.seconds:.1f} s")
        workspace = model.output_dir.parents[1]
        engines = workspace / "engines"
        path = engine_path(engines / model.name / flavour, precision, max_batch_size)
        runtime = trt.Runtime(collecting_logger(trt))
        calibrate = (lambda: entropy_calibrator(trt, calibration_images(), CALIBRATION_BATCH, converted.spec.input_size,
                                                path.with_name("calibration.cache"), cudart))
        found = load_or_build_engine(trt, converted.onnx_path, settings, path, runtime=runtime, log=log,
                                     calibrator_factory=calibrate if flavor.precision_flags else None,
                                     timing_cache_path=engines / "timing.cache", cudart=cudart)
        backend = cls(name="TensorRT", precision=precision, max_batch_size=max_batch_size, spec=converted.spec,
                      device=gpu_name(cudart) or "CUDA", trt=trt, cudart=cudart, flavour=flavour)
        backend._prepare(found.engine, flavor, engines / model.name / "runtime.cache")
        return backend

    def _prepare(self, engine, flavor: TrtFlavor, runtime_cache_path: Path) -> None:
        """Execution context, stream and buffers for the max batch."""
        if flavor.runtime_cache:
            config = engine.create_runtime_config()
            cache = config.create_runtime_cache()
            if runtime_cache_path.is_file():
                cache.deserialize(runtime_cache_path.read_bytes())
            config.set_runtime_cache(cache)
            self.runtime_cache = (cache, runtime_cache_path)
            self.context = engine.create_execution_context(config)
        else:
            self.context = engine.create_execution_context()
        height, width = self.spec.input_size
        self.context.set_input_shape(INPUT, (self.max_batch_size, 3, height, width))
        self.stream = int(cuda_call(self.cudart.cudaStreamCreate()))
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self.trt.nptype(engine.get_tensor_dtype(name))
            self.buffers[name] = _allocate(self.cudart, name, shape, dtype)
            self.context.set_tensor_address(name, self.buffers[name].device)

    def _copy(self, buffer: _Buffer, count: int, to_device: bool) -> None:
        nbytes = buffer.host[:count].nbytes
        kind = self.cudart.cudaMemcpyKind
        if to_device:
            cuda_call(self.cudart.cudaMemcpyAsync(buffer.device, buffer.host_ptr, nbytes,
                                                  kind.cudaMemcpyHostToDevice, self.stream))
        else:
            cuda_call(self.cudart.cudaMemcpyAsync(buffer.host_ptr, buffer.device, nbytes,
                                                  kind.cudaMemcpyDeviceToHost, self.stream))

    def detect(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = batch.shape[0]
        if count > self.max_batch_size:
            raise UserError(f"batch of {count} exceeds the engine's max batch size {self.max_batch_size}")
        self.context.set_input_shape(INPUT, tuple(batch.shape))
        source = self.buffers[INPUT]
        source.host[:count] = batch
        self._copy(source, count, to_device=True)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        outputs = [self.buffers[n] for n in (CORE_OUTPUTS if self.flavour == "core" else PORTABLE_OUTPUTS)]
        for buffer in outputs:
            self._copy(buffer, count, to_device=False)
        cuda_call(self.cudart.cudaStreamSynchronize(self.stream))
        first, second = (buffer.host[:count].copy() for buffer in outputs)
        if self.flavour == "core":
            from utils.postprocess import batched_multiclass_nms  # noqa: PLC0415

            return batched_multiclass_nms(first, second, self.spec.nms)
        return first, second

    def close(self) -> None:
        """Save the runtime cache and free the CUDA buffers and stream."""
        if self.runtime_cache:
            cache, path = self.runtime_cache
            write_bytes_atomic(path, memoryview(cache.serialize()).tobytes())
        for buffer in self.buffers.values():
            cuda_call(self.cudart.cudaFree(buffer.device))
            cuda_call(self.cudart.cudaFreeHost(buffer.host_ptr))
        self.buffers.clear()
        if self.stream:
            cuda_call(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = 0

