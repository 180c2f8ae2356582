"""TensorRT runner: a built engine (+ its sidecar) -> one execution context with fixed CUDA buffers.

Buffers (device + pinned host staging) are allocated once for the maximum batch; each ``detect``
copies in, runs ``execute_async_v3`` and copies out on one stream. For the ``core`` flavour the NMS
runs on the host (utils.postprocess.batched_multiclass_nms), as TensorRT-RTX cannot build NonMaxSuppression.
With TensorRT-RTX the JIT kernels are kept in a runtime cache beside the engine, saved on ``close``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.artifact import INPUT, Artifact, flavour_info
from utils.errors import UserError
from utils.files import write_bytes_atomic
from utils.postprocess import batched_multiclass_nms
from utils.runtime.base import Runner, RuntimeOptions
from utils.trt import TrtModule, collecting_logger, cuda_call, gpu_count, gpu_name, import_cudart, import_trt


def runtime_cache_path(engine_path: Path) -> Path:
    """TensorRT-RTX's runtime cache of an engine: ``<engine>.runtime.cache`` beside it."""
    return Path(engine_path).with_suffix(".runtime.cache")


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


class TensorRTRunner(Runner):
    name = "TensorRT"

    def __init__(self, artifact: Artifact, max_batch_size: int, options: RuntimeOptions = RuntimeOptions()):
        """Deserialize ``artifact``'s engine with the module that built it and get it ready to run."""
        self.buffers: dict[str, _Buffer] = {}
        self.stream = 0
        self.runtime_cache = None
        module_name = artifact.trt_module.split()[0] if artifact.trt_module else options.trt_module
        self.trt = import_trt(module_name)
        self.module = TrtModule.of(self.trt)
        if artifact.trt_module and artifact.trt_module != self.module.label:
            raise UserError(f"the engine {artifact.path} was built by {artifact.trt_module}, this is "
                            f"{self.module.label}; build it again with build_engine.py")
        self.cudart = import_cudart()
        if gpu_count(self.cudart) == 0:
            raise UserError("no CUDA GPU is available for TensorRT; use --backend onnxruntime")
        if artifact.max_batch_size and max_batch_size > artifact.max_batch_size:
            raise UserError(f"batch size {max_batch_size} exceeds the engine's maximum {artifact.max_batch_size}; "
                            f"use -b {artifact.max_batch_size} or build with build_engine.py -b {max_batch_size}")
        super().__init__(artifact, max_batch_size, gpu_name(self.cudart) or "CUDA")
        self.flavour = artifact.flavour
        engine = self.trt.Runtime(collecting_logger(self.trt)).deserialize_cuda_engine(Path(artifact.path).read_bytes())
        if engine is None:
            raise UserError(f"{self.module.label} cannot deserialize {artifact.path} (built for another GPU or "
                            f"version?); build it again with build_engine.py")
        self._prepare(engine)

    def _prepare(self, engine) -> None:
        """Execution context, stream and buffers for the max batch."""
        if self.module.runtime_cache:
            config = engine.create_runtime_config()
            cache = config.create_runtime_cache()
            path = runtime_cache_path(self.artifact.path)
            if path.is_file():
                cache.deserialize(path.read_bytes())
            config.set_runtime_cache(cache)
            self.runtime_cache = (cache, path)
            self.context = engine.create_execution_context(config)
        else:
            self.context = engine.create_execution_context()
        width, height = self.spec.input_size
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
        outputs = [self.buffers[n] for n in flavour_info(self.flavour).outputs]
        for buffer in outputs:
            self._copy(buffer, count, to_device=False)
        cuda_call(self.cudart.cudaStreamSynchronize(self.stream))
        first, second = (buffer.host[:count].copy() for buffer in outputs)
        if not flavour_info(self.flavour).nms_inside:
            return batched_multiclass_nms(first, second, self.spec.nms)
        return first, second

    def close(self) -> None:
        """Save the runtime cache and free the CUDA buffers and stream."""
        if self.runtime_cache:
            cache, path = self.runtime_cache
            self.runtime_cache = None
            write_bytes_atomic(path, memoryview(cache.serialize()).tobytes())
        for buffer in self.buffers.values():
            cuda_call(self.cudart.cudaFree(buffer.device))
            cuda_call(self.cudart.cudaFreeHost(buffer.host_ptr))
        self.buffers.clear()
        if self.stream:
            cuda_call(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = 0

