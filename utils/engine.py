"""ONNX -> serialized TensorRT engine, cached in workspace/engines/ with a sidecar of what shaped it.

Works with TensorRT 10 (precision builder flags, INT8 entropy calibrator), TensorRT 11 (strongly
typed) and TensorRT-RTX (strongly typed, builds for a compute-capability target without a GPU).
Every difference between those modules lives in ``TrtFlavor``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Sequence

import numpy as np

from utils.errors import UserError
from utils.files import write_bytes_atomic, write_text_atomic

INPUT = "Input"
PRECISIONS = ("FP32", "FP16", "INT8")
ENGINE_DIRS = {"FP32": "FLOAT", "FP16": "HALF", "INT8": "INT8"}
MODULES = ("tensorrt", "tensorrt_rtx")
PIP_NAMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx-cu13"}
ENGINE_FORMAT = 1


def import_trt(name: str | None = None) -> ModuleType:
    """The TensorRT module: ``name``, else $SSD_TRT_MODULE, else the first importable of MODULES."""
    chosen = name or os.environ.get("SSD_TRT_MODULE")
    names = (chosen,) if chosen else MODULES
    for candidate in names:
        try:
            return importlib.import_module(candidate)
        except ImportError:
            continue
    wanted = " or ".join(PIP_NAMES.get(n, n) for n in names)
    raise UserError(f"TensorRT is not installed (no module {', '.join(names)}); run: pip install {wanted} "
                    f"(or pip install -r requirements-trt.txt)")


@dataclass(frozen=True)
class TrtFlavor:
    """What one TensorRT module can do; the only place where TRT 10, TRT 11 and RTX differ."""

    module: str
    version: str
    is_rtx: bool
    major: int

    @classmethod
    def of(cls, trt: ModuleType) -> "TrtFlavor":
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


@dataclass(frozen=True)
class EngineSettings:
    """Everything the builder is told besides the ONNX file."""

    precision: str = "FP32"
    max_batch_size: int = 1
    workspace_mb: int = 1024
    compute_capability: str = "SM86"   # RTX only; "CURRENT" = the GPU present
    flavour: str = "core"

    def onnx_precision(self, flavor: TrtFlavor) -> str:
        """The precision variant of the ONNX to build from: the real one when strongly typed."""
        return self.precision if flavor.strongly_typed else "FP32"


def check_settings(trt: ModuleType, settings: EngineSettings) -> None:
    """Refuse settings this module cannot build, with a one-line reason."""
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown precision {settings.precision}; choose one of {', '.join(PRECISIONS)}")
    if settings.max_batch_size < 1:
        raise UserError(f"max batch size must be at least 1, got {settings.max_batch_size}")
    if TrtFlavor.of(trt).compute_capability_target:
        choices = [n for n in trt.ComputeCapability.__members__ if n != "NONE"]
        if settings.compute_capability not in choices:
            raise UserError(f"unknown compute capability {settings.compute_capability}; choose one of "
                            f"{', '.join(choices)}")


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


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hint(settings: EngineSettings) -> str:
    if settings.flavour == "core":
        return "the core flavour holds only the network, so report this with the TensorRT version"
    return "use --flavour core (the network only; NMS runs outside TensorRT)"


def parse_onnx(trt: ModuleType, onnx_path: Path, settings: EngineSettings, logger=None):
    """Parse ``onnx_path`` into a new network; returns (builder, network, parser, logger)."""
    logger = logger or collecting_logger(trt)
    builder = trt.Builder(logger)
    flavor = TrtFlavor.of(trt)
    flags = 0
    if flavor.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(_parser_message(parser, onnx_path, flavor, settings))
    return builder, network, parser, logger


def _parser_message(parser, onnx_path: Path, flavor: TrtFlavor, settings: EngineSettings) -> str:
    if parser.num_errors == 0:
        return f"{flavor.label} cannot parse {onnx_path.name}; {_hint(settings)}"
    error = parser.get_error(0)
    node = error.node_name() or f"#{error.node()}"
    return (f"{flavor.label} cannot parse {onnx_path.name}: ONNX {error.node_operator()} node '{node}': "
            f"{_one_line(error.desc(), 160)}; {_hint(settings)}")


def _configure(trt: ModuleType, builder, settings: EngineSettings, calibrator):
    """The builder config: workspace, one batch profile, precision (flags or target)."""
    flavor = TrtFlavor.of(trt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    n = settings.max_batch_size
    profile.set_shape(INPUT, (1, 3, 300, 300), (n, 3, 300, 300), (n, 3, 300, 300))
    config.add_optimization_profile(profile)
    if flavor.precision_flags and settings.precision in ("FP16", "INT8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if flavor.precision_flags and settings.precision == "INT8":
        if calibrator is None:
            raise UserError("INT8 with TensorRT 10 needs calibration images; pass a VOC folder or JPEG files")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if flavor.compute_capability_target:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, settings.compute_capability), 0)
    return config


def _load_timing_cache(config, path: Path | None) -> None:
    data = path.read_bytes() if path and path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(data), True)


def _save_timing_cache(config, path: Path) -> None:
    write_bytes_atomic(path, memoryview(config.get_timing_cache().serialize()).tobytes())


def build_engine(trt: ModuleType, onnx_path: Path, settings: EngineSettings, calibrator=None,
                 timing_cache_path: Path | None = None) -> bytes:
    """Parse and build ``onnx_path``; a one-line UserError naming the failing op when it cannot."""
    check_settings(trt, settings)
    onnx_path = Path(onnx_path)
    flavor = TrtFlavor.of(trt)
    builder, network, _parser, logger = parse_onnx(trt, onnx_path, settings)
    config = _configure(trt, builder, settings, calibrator)
    if flavor.timing_cache:
        _load_timing_cache(config, timing_cache_path)
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # noqa: BLE001  (the bindings raise bare RuntimeError/TypeError)
        logger.errors.append(str(exc))
        serialized = None
    if serialized is None:
        raise UserError(build_failure_message(flavor, onnx_path, logger.errors, settings))
    if flavor.timing_cache and timing_cache_path:
        _save_timing_cache(config, timing_cache_path)
    return memoryview(serialized).tobytes()


_LAYER_PATTERNS = (re.compile(r"([^\s(]+) has no runners"), re.compile(r"[Ll]ayer:? '?([\w/.:-]+)'?"),
                   re.compile(r"node:? '?([\w/.:-]+)'?"))


def failing_layer(errors: Sequence[str]) -> str | None:
    """The layer a builder error names, if any."""
    for message in errors:
        for pattern in _LAYER_PATTERNS:
            match = pattern.search(message)
            if match:
                return match.group(1).rstrip(".,;:)")
    return None


def onnx_node_for_layer(onnx_path: Path, layer: str) -> tuple[str, str] | None:
    """(op_type, node name) of the ONNX node TensorRT named ``layer`` after (the longest name prefix)."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    matches = [(len(n.name), n.op_type, n.name) for n in graph.node if n.name and layer.startswith(n.name)]
    return max(matches)[1:] if matches else None


def build_failure_message(flavor: TrtFlavor, onnx_path: Path, errors: Sequence[str],
                          settings: EngineSettings) -> str:
    """One line: which layer/op the builder could not build, and what to do."""
    layer = failing_layer(errors)
    node = onnx_node_for_layer(onnx_path, layer) if layer else None
    where = f"ONNX {node[0]} node '{node[1]}'" if node else (f"layer '{layer}'" if layer else "the network")
    detail = " (no implementation)" if any("has no runners" in e for e in errors) else (
        f": {_one_line(errors[0], 160)}" if errors else "")
    return (f"{flavor.label} cannot build {where} of {onnx_path.name} for {settings.precision}{detail}; "
            f"{_hint(settings)}")


# --- engine cache -------------------------------------------------------------------------------


def engine_path(engines_dir: Path, precision: str, max_batch_size: int) -> Path:
    """``engines_dir/{FLOAT,HALF,INT8}/engine_bs_{N}.buf``, as the original sample named them."""
    return Path(engines_dir) / ENGINE_DIRS[precision] / f"engine_bs_{max_batch_size}.buf"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def build_target(flavor: TrtFlavor, settings: EngineSettings, cudart=None) -> str:
    """What the engine is built for: a compute capability (RTX) or the present GPU's name."""
    if flavor.compute_capability_target and settings.compute_capability != "CURRENT":
        return f"compute capability {settings.compute_capability}"
    return gpu_name(cudart) or "no GPU"


def engine_key(trt: ModuleType, onnx_path: Path, settings: EngineSettings, cudart=None) -> dict:
    """Everything an engine depends on (compared with the sidecar saved beside it)."""
    flavor = TrtFlavor.of(trt)
    return {"format": ENGINE_FORMAT, "onnx_sha256": sha256_file(onnx_path), "flavour": settings.flavour,
            "trt_module": flavor.module, "trt_version": flavor.version,
            "target": build_target(flavor, settings, cudart), "options": asdict(settings)}


@dataclass
class EngineFile:
    """A cached or freshly built engine."""

    path: Path
    data: bytes
    built: bool
    seconds: float
    engine: object = None   # the deserialized ICudaEngine when a runtime was given


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _cached(path: Path, key: dict, runtime) -> tuple[EngineFile | None, str | None]:
    """The cached engine when valid, else (None, why not) — why is None when there is nothing."""
    side = sidecar_path(path)
    if not path.exists() or not side.exists():
        return None, None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "its sidecar is unreadable"
    if record.get("key") != key:
        changed = sorted(k for k in key if record.get("key", {}).get(k) != key[k])
        return None, f"{', '.join(changed) or 'settings'} changed"
    data = path.read_bytes()
    if len(data) != record.get("size") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return None, "the engine file is truncated or corrupt"
    engine = runtime.deserialize_cuda_engine(data) if runtime is not None else None
    if runtime is not None and engine is None:
        return None, "the engine does not deserialize"
    return EngineFile(path, data, built=False, seconds=0.0, engine=engine), None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``.lock, shared by every process asking for this engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_build_engine(trt: ModuleType, onnx_path: Path, settings: EngineSettings, path: Path, *,
                         calibrator_factory: Callable[[], object] | None = None, runtime=None,
                         timing_cache_path: Path | None = None, log: Callable[[str], None] = print,
                         cudart=None) -> EngineFile:
    """Reuse the engine at ``path`` when its sidecar matches, else build it (atomically, under a lock)."""
    check_settings(trt, settings)
    path = Path(path)
    key = engine_key(trt, Path(onnx_path), settings, cudart)
    cached, _ = _cached(path, key, runtime)
    if cached:
        log(f"Loading cached TensorRT engine from {path}")
        return cached
    with _locked(path):
        cached, reason = _cached(path, key, runtime)  # another process may have built it meanwhile
        if cached:
            log(f"Loading cached TensorRT engine from {path}")
            return cached
        log(f"Rebuilding TensorRT engine {path}: {reason}" if reason else
            f"Building TensorRT engine {path}. This may take a few minutes.")
        return _build_and_store(trt, Path(onnx_path), settings, path, key, calibrator_factory, runtime,
                                timing_cache_path)


def _build_and_store(trt, onnx_path, settings, path, key, calibrator_factory, runtime,
                     timing_cache_path) -> EngineFile:
    start = time.perf_counter()
    calibrator = calibrator_factory() if calibrator_factory and settings.precision == "INT8" else None
    data = build_engine(trt, onnx_path, settings, calibrator, timing_cache_path)
    seconds = time.perf_counter() - start
    sidecar_path(path).unlink(missing_ok=True)
    write_bytes_atomic(path, data)
    record = {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "build_seconds": round(seconds, 3)}
    write_text_atomic(sidecar_path(path), json.dumps(record, indent=1))
    engine = runtime.deserialize_cuda_engine(data) if runtime is not None else None
    return EngineFile(path, data, built=True, seconds=seconds, engine=engine)


# --- TensorRT 10 INT8 calibration ---------------------------------------------------------------


def entropy_calibrator(trt: ModuleType, paths: Sequence[Path], batch_size: int, input_size: tuple[int, int],
                       cache_path: Path, cudart=None):
    """An IInt8EntropyCalibrator2 fed with preprocessed image files (TensorRT 10 only)."""
    if not TrtFlavor.of(trt).precision_flags:
        raise UserError(f"{TrtFlavor.of(trt).label} is strongly typed: INT8 comes from a Q/DQ ONNX, not a calibrator")
    if cudart is None:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    return _calibrator_class(trt)(list(paths), batch_size, input_size, Path(cache_path), cudart)


@functools.cache
def _calibrator_class(trt: ModuleType) -> type:
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds calibration batches from image files; keeps the calibration cache in a file."""

        def __init__(self, paths, batch_size, input_size, cache_path, cudart):
            trt.IInt8EntropyCalibrator2.__init__(self)
            from utils.pipeline import load_batches  # noqa: PLC0415

            self.batch_size, self.cache_path, self.cudart = batch_size, cache_path, cudart
            self.nbytes = batch_size * 3 * input_size[0] * input_size[1] * 4
            self.batches = load_batches(paths, batch_size, input_size)
            self.device = None

        def get_batch_size(self):
            return self.batch_size

        def get_batch(self, names):
            tensors = [item.tensor for item in next(self.batches, []) if item.tensor is not None]
            if not tensors:
                return None
            host = np.zeros((self.batch_size, *tensors[0].shape), np.float32)
            host[: len(tensors)] = tensors
            if self.device is None:
                self.device = cuda_call(self.cudart.cudaMalloc(self.nbytes))
            cuda_call(self.cudart.cudaMemcpy(self.device, host.ctypes.data, self.nbytes,
                                             self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [int(self.device)]

        def read_calibration_cache(self):
            return self.cache_path.read_bytes() if self.cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            write_bytes_atomic(self.cache_path, memoryview(cache).tobytes())

    return EntropyCalibrator
