"""A test double of the ``tensorrt`` module: only the names utils/engine.py and the backend call.

``make_trt(10)`` is TensorRT 10 (BuilderFlag.FP16/INT8, IBuilderConfig.int8_calibrator,
IInt8EntropyCalibrator2); ``make_trt(11)`` is strongly typed and has none of them. Parameter names
follow the TensorRT Python API (tests/test_trt_api_contract.py checks them against tensorrt_rtx).
Objects use __slots__ and the module is a plain ModuleType, so any other name raises AttributeError.
Every call is appended to ``state.calls`` as (qualified name, args).

``make_cudart(state)`` is the matching double of cuda-python's runtime (``cuda.bindings.runtime``), only the
calls the TensorRT runner makes, returning (error, value) tuples as cuda-python does. Its "device" memory is
host memory (so copies and the engine's reads and writes are real), its streams and events are numbers, and
every call is recorded in the same ``state.calls`` (the order of work on the streams is the order of calls).
``state.on_execute(addresses, shapes)``, when set, is the network: it reads the input and writes the outputs
at the addresses bound with set_tensor_address.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

MAGIC = b"TRTDOUBLE"


@dataclass
class DoubleState:
    """What the double was asked and how it should misbehave."""

    calls: list = field(default_factory=list)
    parse_errors: list = field(default_factory=list)   # (node_name, node_operator, desc)
    build_errors: list = field(default_factory=list)   # logged at ERROR, then the build returns None
    build_raises: str | None = None
    onnx_inputs: dict = field(default_factory=lambda: {"Input": (-1, 3, 300, 300)})
    onnx_outputs: dict = field(default_factory=lambda: {"boxes": (-1, 1917, 4), "scores": (-1, 1917, 3)})
    on_execute: Callable | None = None                 # (addresses, shapes) -> None: the network

    def record(self, name: str, *args) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = _Severity
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = _Severity

    def __init__(self):
        pass

    def log(self, severity, msg):
        raise NotImplementedError


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class DataType(enum.IntEnum):
    FLOAT = 0
    INT32 = 3


def nptype(trt_type):
    return {DataType.FLOAT: np.float32, DataType.INT32: np.int32}[trt_type]


class IHostMemory(bytes):
    __slots__ = ()

    @property
    def nbytes(self):
        return len(self)


def make_trt(major: int = 10, state: DoubleState | None = None) -> tuple[types.ModuleType, DoubleState]:
    """A fresh double of TensorRT ``major`` (10 or 11) and the state it records into."""
    state = state or DoubleState()
    classes = _classes(major, state)
    module = types.ModuleType("tensorrt")
    module.__version__ = f"{major}.0.1.6"
    for name, value in classes.items():
        setattr(module, name, value)
    for value in (ILogger, NetworkDefinitionCreationFlag, MemoryPoolType, DataType, IHostMemory,
                  nptype):
        setattr(module, value.__name__, value)
    return module, state


def _classes(major: int, state: DoubleState) -> dict:  # noqa: C901  (one closure per TensorRT class)
    """The TensorRT classes of one variant, bound to ``state``."""

    class ParserError:
        __slots__ = ("_error",)

        def __init__(self, error):
            self._error = error

        def node_name(self):
            return self._error[0]

        def node_operator(self):
            return self._error[1]

        def desc(self):
            return self._error[2]

        def node(self):
            return 0

    class INetworkDefinition:
        __slots__ = ("_flags", "_parsed")

        def __init__(self, flags):
            self._flags = flags
            self._parsed = None

    class OnnxParser:
        __slots__ = ("_network", "_errors")

        def __init__(self, network, logger):
            state.record("OnnxParser", network._flags)
            self._network, self._errors = network, []

        def parse_from_file(self, model):
            state.record("OnnxParser.parse_from_file", model)
            self._errors = [ParserError(e) for e in state.parse_errors]
            self._network._parsed = model
            return not self._errors

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

    class IOptimizationProfile:
        __slots__ = ("_shapes",)

        def __init__(self):
            self._shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002  (TensorRT's parameter names)
            state.record("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
            self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache:
        __slots__ = ("_data",)

        def __init__(self, data):
            self._data = data

        def serialize(self):
            return IHostMemory(b"timing:" + self._data.removeprefix(b"timing:") + b"+")

    class IBuilderConfig:
        __slots__ = ("_flags", "_profiles", "_pool", "_timing_cache") + (("int8_calibrator",) if major < 11 else ())

        def __init__(self):
            self._flags, self._profiles, self._pool, self._timing_cache = set(), [], {}, None
            if major < 11:
                self.int8_calibrator = None

        def set_flag(self, flag):
            state.record("IBuilderConfig.set_flag", flag)
            self._flags.add(flag)

        def set_memory_pool_limit(self, pool, pool_size):
            state.record("IBuilderConfig.set_memory_pool_limit", pool, pool_size)
            self._pool[pool] = pool_size

        def add_optimization_profile(self, profile):
            state.record("IBuilderConfig.add_optimization_profile", profile._shapes)
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            state.record("IBuilderConfig.create_timing_cache", bytes(serialized_timing_cache))
            return ITimingCache(bytes(serialized_timing_cache))

        def set_timing_cache(self, cache, ignore_mismatch):
            state.record("IBuilderConfig.set_timing_cache", cache._data, ignore_mismatch)
            self._timing_cache = cache
            return True

        def get_timing_cache(self):
            return self._timing_cache

    class Builder:
        __slots__ = ("_logger",)

        def __init__(self, logger):
            self._logger = logger

        def create_network(self, flags=0):
            state.record("Builder.create_network", flags)
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            calibrator = getattr(config, "int8_calibrator", None)
            state.record("Builder.build_serialized_network", sorted(config._flags), calibrator)
            if state.build_raises:
                raise RuntimeError(state.build_raises)
            for message in state.build_errors:
                self._logger.log(ILogger.Severity.ERROR, message)
            if state.build_errors:
                return None
            if calibrator is not None:
                calibrator.get_batch(["Input"])
            record = {"onnx": network._parsed, "flags": sorted(int(f) for f in config._flags),
                      "network_flags": network._flags}
            return IHostMemory(MAGIC + json.dumps(record).encode())

    class IExecutionContext:
        __slots__ = ("_engine", "_shapes", "_addresses")

        def __init__(self, engine):
            self._engine, self._shapes, self._addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            state.record("IExecutionContext.set_input_shape", name, tuple(shape))
            self._shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            batch = self._shapes["Input"][0]
            shape = {**state.onnx_inputs, **state.onnx_outputs}[name]
            return tuple(batch if d == -1 else d for d in shape)

        def set_tensor_address(self, name, memory):
            state.record("IExecutionContext.set_tensor_address", name, memory)
            self._addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            state.record("IExecutionContext.execute_async_v3", stream_handle)
            if state.on_execute is not None:
                shapes = {name: self.get_tensor_shape(name) for name in self._addresses}
                state.on_execute(dict(self._addresses), shapes)
            return True

    class ICudaEngine:
        __slots__ = ("_names",)

        def __init__(self):
            self._names = [*state.onnx_inputs, *state.onnx_outputs]

        @property
        def num_io_tensors(self):
            return len(self._names)

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_dtype(self, name):
            return DataType.INT32 if name == "num_detections" else DataType.FLOAT

        def create_execution_context(self):
            return IExecutionContext(self)

    class Runtime:
        __slots__ = ()

        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, serialized_engine):
            state.record("Runtime.deserialize_cuda_engine", len(serialized_engine))
            ok = bytes(serialized_engine).startswith(MAGIC)
            try:
                json.loads(bytes(serialized_engine)[len(MAGIC):])
            except ValueError:
                ok = False
            return ICudaEngine() if ok else None

    classes = {cls.__name__: cls for cls in (ParserError, INetworkDefinition, OnnxParser, IOptimizationProfile,
                                               ITimingCache, IBuilderConfig, Builder, IExecutionContext,
                                               ICudaEngine, Runtime)}
    if major < 11:
        classes.update(_trt10_only(state))
    return classes


def _trt10_only(state: DoubleState) -> dict:
    """BuilderFlag with FP16/INT8 and the INT8 calibrator base (gone in TensorRT 11 and RTX)."""

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 1

    class IInt8EntropyCalibrator2:
        def __init__(self):
            state.record("IInt8EntropyCalibrator2")

        def get_batch_size(self):
            raise NotImplementedError

        def get_batch(self, names):
            raise NotImplementedError

        def read_calibration_cache(self):
            raise NotImplementedError

        def write_calibration_cache(self, cache):
            raise NotImplementedError

    return {"BuilderFlag": BuilderFlag, "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2}


def make_cudart(state: DoubleState) -> types.ModuleType:
    """A double of ``cuda.bindings.runtime`` for one GPU named "Double GPU" (see the module docstring)."""
    memory: dict[int, ctypes.Array] = {}
    handles = iter(range(0x5000, 1 << 30))

    def allocate(name: str, size: int):
        buffer = (ctypes.c_byte * max(1, size))()
        address = ctypes.addressof(buffer)
        memory[address] = buffer
        state.record(name, size)
        return 0, address

    def free(name: str):
        def release(address):
            state.record(name, address)
            return (0 if memory.pop(int(address), None) is not None else 1,)
        return release

    def call(name: str, result=None):
        def record(*args):
            state.record(name, *args)
            return (0,) if result is None else (0, result())
        return record

    def memcpy_async(dst, src, count, kind, stream):
        state.record("cudaMemcpyAsync", int(dst), int(src), count, kind, stream)
        ctypes.memmove(int(dst), int(src), count)
        return (0,)

    module = types.ModuleType("cuda.bindings.runtime")
    module.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
    module.cudaEventDisableTiming = 2
    module.cudaGetDeviceCount = lambda: (0, 1)
    module.cudaGetDeviceProperties = lambda device: (0, types.SimpleNamespace(name=b"Double GPU"))
    module.cudaMalloc = lambda size: allocate("cudaMalloc", size)
    module.cudaMallocHost = lambda size: allocate("cudaMallocHost", size)
    module.cudaFree, module.cudaFreeHost = free("cudaFree"), free("cudaFreeHost")
    module.cudaMemcpyAsync = memcpy_async
    module.cudaStreamCreate = call("cudaStreamCreate", lambda: next(handles))
    module.cudaEventCreateWithFlags = call("cudaEventCreateWithFlags", lambda: next(handles))
    for name in ("cudaStreamSynchronize", "cudaStreamDestroy", "cudaEventRecord", "cudaStreamWaitEvent",
                 "cudaEventDestroy"):
        setattr(module, name, call(name))
    module.memory = memory
    return module
