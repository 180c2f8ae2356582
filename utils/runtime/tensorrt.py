"""TensorRT runner: a built engine (+ its sidecar) -> one execution context with fixed CUDA buffers.

Buffers (device + pinned host staging) are allocated once for the maximum batch; each ``detect``
copies in, runs ``execute_async_v3`` and copies out on one stream. A batch already on the GPU (a CUDA
torch tensor from utils.gpu_input, or any array with ``__cuda_array_interface__``) is not copied: its
device pointer goes to ``set_tensor_address`` and the engine's stream waits on an event recorded on the
producer's stream (the interface's ``stream``, or torch's current stream). For the ``core`` flavour the
NMS (utils.postprocess.batched_multiclass_nms; TensorRT-RTX cannot build NonMaxSuppression) runs in torch
on the GPU for such a batch, on the host otherwise; only the detections come back.
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


@dataclass(frozen=True)
class DeviceArray:
    """What the runner needs of a batch already on the GPU (the CUDA Array Interface's fields)."""

    pointer: int
    shape: tuple[int, ...]
    typestr: str
    strides: tuple[int, ...] | None
    stream: int | None             # the producer's stream to wait on; None: nothing to wait for

    @property
    def contiguous(self) -> bool:
        if self.strides is None:
            return True
        size, expected = int(np.dtype(self.typestr).itemsize), []
        for extent in reversed(self.shape):
            expected.insert(0, size)
            size *= extent
        return tuple(self.strides) == tuple(expected)


def device_array(batch) -> DeviceArray:
    """A device batch's pointer, shape and producer stream from its ``__cuda_array_interface__``: the
    interface's ``stream`` (version 3: None = no wait, 1 = the legacy default stream, 2 = per-thread default),
    else torch's current stream for a torch tensor, else the legacy default stream."""
    interface = batch.__cuda_array_interface__
    if "stream" in interface:
        stream = interface["stream"]
        stream = 0 if stream == 1 else stream
    elif type(batch).__module__.split(".")[0] == "torch":
        import torch  # noqa: PLC0415

        stream = int(torch.cuda.current_stream(batch.device).cuda_stream)
    else:
        stream = 0
    strides = interface.get("strides")
    return DeviceArray(int(interface["data"][0]), tuple(int(d) for d in interface["shape"]), interface["typestr"],
                       tuple(strides) if strides is not None else None, stream)


def torch_cuda():
    """torch, when it is installed with CUDA (the GPU NMS), else None."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("torch") is None:
        return None
    import torch  # noqa: PLC0415

    return torch if torch.cuda.is_available() else None


class _DeviceView:
    """The first ``count`` images of an engine output buffer, as a CUDA Array Interface (torch.as_tensor
    wraps it without a copy)."""

    def __init__(self, buffer: _Buffer, count: int):
        shape = (count, *buffer.host.shape[1:])
        self.__cuda_array_interface__ = {"shape": shape, "typestr": buffer.host.dtype.str, "strides": None,
                                         "data": (buffer.device, False), "version": 2}


class TensorRTRunner(Runner):
    name = "TensorRT"

    def __init__(self, artifact: Artifact, max_batch_size: int, options: RuntimeOptions = RuntimeOptions()):
        """Deserialize ``artifact``'s engine with the module that built it and get it ready to run."""
        self.buffers: dict[str, _Buffer] = {}
        self.stream = 0
        self.event = 0
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

    @property
    def takes_device_input(self) -> bool:
        return True

    def _event(self) -> int:
        if not self.event:
            flags = self.cudart.cudaEventDisableTiming
            self.event = int(cuda_call(self.cudart.cudaEventCreateWithFlags(flags)))
        return self.event

    def _bind_device_input(self, batch) -> tuple[int, ...]:
        """Point the engine's input at a device batch (no copy) after its producer's work: an event recorded
        on the producer's stream, waited on by the engine's stream. Returns the batch's shape."""
        array = device_array(batch)
        if array.typestr != "<f4" or not array.contiguous:
            raise ValueError(f"a device batch must be contiguous float32, got {array.typestr} strides {array.strides}")
        if array.stream is not None:
            cuda_call(self.cudart.cudaEventRecord(self._event(), array.stream))
            cuda_call(self.cudart.cudaStreamWaitEvent(self.stream, self._event(), 0))
        self.context.set_tensor_address(INPUT, array.pointer)
        return array.shape

    def detect(self, batch) -> tuple[np.ndarray, np.ndarray]:
        on_device = not isinstance(batch, np.ndarray)
        count = int(batch.shape[0])
        if count > self.max_batch_size:
            raise UserError(f"batch of {count} exceeds the engine's max batch size {self.max_batch_size}")
        if on_device:
            shape = self._bind_device_input(batch)
        else:
            shape = tuple(batch.shape)
            source = self.buffers[INPUT]
            self.context.set_tensor_address(INPUT, source.device)
            source.host[:count] = batch
            self._copy(source, count, to_device=True)
        self.context.set_input_shape(INPUT, shape)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        outputs = [self.buffers[n] for n in flavour_info(self.flavour).outputs]
        nms_inside = flavour_info(self.flavour).nms_inside
        if on_device and not nms_inside and torch_cuda() is not None:
            return self._nms_on_gpu(outputs, count)
        for buffer in outputs:
            self._copy(buffer, count, to_device=False)
        cuda_call(self.cudart.cudaStreamSynchronize(self.stream))
        first, second = (buffer.host[:count].copy() for buffer in outputs)
        if not nms_inside:
            return batched_multiclass_nms(first, second, self.spec.nms)
        return first, second

    def _nms_on_gpu(self, outputs: list[_Buffer], count: int) -> tuple[np.ndarray, np.ndarray]:
        """The core flavour's NMS in torch on the engine's outputs where they are (torch's stream waits on the
        engine's through an event); the [N, K, 7] detections copied back through pinned memory."""
        torch = torch_cuda()
        waiting = torch.cuda.current_stream()
        cuda_call(self.cudart.cudaEventRecord(self._event(), self.stream))
        cuda_call(self.cudart.cudaStreamWaitEvent(waiting.cuda_stream, self._event(), 0))
        boxes, scores = (torch.as_tensor(_DeviceView(buffer, count), device="cuda") for buffer in outputs)
        detections, found = batched_multiclass_nms(boxes, scores, self.spec.nms)
        host = [torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for value in (detections, found)]
        for target, value in zip(host, (detections, found)):
            target.copy_(value, non_blocking=True)
        waiting.synchronize()
        return host[0].numpy().copy(), host[1].numpy().copy()

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
        if self.event:
            cuda_call(self.cudart.cudaEventDestroy(self.event))
            self.event = 0
        if self.stream:
            cuda_call(self.cudart.cudaStreamDestroy(self.stream))
            self.stream = 0

