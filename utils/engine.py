"""ONNX -> serialized TensorRT engine, cached in workspace/engines/ with a sidecar of what shaped it.

Works with TensorRT 10 (precision builder flags, INT8 entropy calibrator), TensorRT 11 (strongly
typed) and TensorRT-RTX (strongly typed, builds for a compute-capability target without a GPU).
Every difference between those modules lives in ``TrtModule``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Sequence

import numpy as np

from utils.artifact import INPUT, PRECISIONS, Artifact, engine_sidecar, flavour_info, read_engine
from utils.errors import UserError
from utils.files import write_bytes_atomic, write_text_atomic
from utils.trt import TrtModule, collecting_logger, cuda_call, gpu_name

log = logging.getLogger(__name__)

ENGINE_DIRS = {"FP32": "FLOAT", "FP16": "HALF", "INT8": "INT8"}
ENGINE_FORMAT = 2


@dataclass(frozen=True)
class EngineSettings:
    """Everything the builder is told besides the ONNX file."""

    precision: str = "FP32"
    max_batch_size: int = 1
    workspace_mb: int = 1024
    compute_capability: str = "SM86"   # RTX only; "CURRENT" = the GPU present
    flavour: str = "core"
    input_size: tuple[int, int] = (300, 300)   # (width, height) of the network input

    def onnx_precision(self, module: TrtModule) -> str:
        """The precision variant of the ONNX to build from: the real one when strongly typed."""
        return self.precision if module.strongly_typed else "FP32"


def check_settings(trt: ModuleType, settings: EngineSettings) -> None:
    """Refuse settings this module cannot build, with a one-line reason."""
    if settings.precision not in PRECISIONS:
        raise UserError(f"unknown precision {settings.precision}; choose one of {', '.join(PRECISIONS)}")
    if settings.max_batch_size < 1:
        raise UserError(f"max batch size must be at least 1, got {settings.max_batch_size}")
    if TrtModule.of(trt).compute_capability_target:
        choices = [n for n in trt.ComputeCapability.__members__ if n != "NONE"]
        if settings.compute_capability not in choices:
            raise UserError(f"unknown compute capability {settings.compute_capability}; choose one of "
                            f"{', '.join(choices)}")


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hint(settings: EngineSettings) -> str:
    if not flavour_info(settings.flavour).nms_inside:
        return "the core flavour holds only the network, so report this with the TensorRT version"
    return "use --flavour core (the network only; NMS runs outside TensorRT)"


def parse_onnx(trt: ModuleType, onnx_path: Path, settings: EngineSettings, logger=None):
    """Parse ``onnx_path`` into a new network; returns (builder, network, parser, logger)."""
    logger = logger or collecting_logger(trt)
    builder = trt.Builder(logger)
    module = TrtModule.of(trt)
    flags = 0
    if module.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(_parser_message(parser, onnx_path, module, settings))
    return builder, network, parser, logger


def _parser_message(parser, onnx_path: Path, module: TrtModule, settings: EngineSettings) -> str:
    if parser.num_errors == 0:
        return f"{module.label} cannot parse {onnx_path.name}; {_hint(settings)}"
    error = parser.get_error(0)
    node = error.node_name() or f"#{error.node()}"
    return (f"{module.label} cannot parse {onnx_path.name}: ONNX {error.node_operator()} node '{node}': "
            f"{_one_line(error.desc(), 160)}; {_hint(settings)}")


def _configure(trt: ModuleType, builder, settings: EngineSettings, calibrator):
    """The builder config: workspace, one batch profile, precision (flags or target)."""
    module = TrtModule.of(trt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    n, (width, height) = settings.max_batch_size, settings.input_size
    profile.set_shape(INPUT, (1, 3, height, width), (n, 3, height, width), (n, 3, height, width))
    config.add_optimization_profile(profile)
    if module.precision_flags and settings.precision in ("FP16", "INT8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if module.precision_flags and settings.precision == "INT8":
        if calibrator is None:
            raise UserError("INT8 with TensorRT 10 needs calibration images; pass a VOC folder or JPEG files")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if module.compute_capability_target:
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
    module = TrtModule.of(trt)
    builder, network, _parser, logger = parse_onnx(trt, onnx_path, settings)
    config = _configure(trt, builder, settings, calibrator)
    if module.timing_cache:
        _load_timing_cache(config, timing_cache_path)
    try:
        serialized = builder.build_serialized_network(network, config)
    except Exception as exc:  # noqa: BLE001  (the bindings raise bare RuntimeError/TypeError)
        logger.errors.append(str(exc))
        serialized = None
    if serialized is None:
        raise UserError(build_failure_message(module, onnx_path, logger.errors, settings))
    if module.timing_cache and timing_cache_path:
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


def build_failure_message(module: TrtModule, onnx_path: Path, errors: Sequence[str],
                          settings: EngineSettings) -> str:
    """One line: which layer/op the builder could not build, and what to do."""
    layer = failing_layer(errors)
    node = onnx_node_for_layer(onnx_path, layer) if layer else None
    where = f"ONNX {node[0]} node '{node[1]}'" if node else (f"layer '{layer}'" if layer else "the network")
    detail = " (no implementation)" if any("has no runners" in e for e in errors) else (
        f": {_one_line(errors[0], 160)}" if errors else "")
    return (f"{module.label} cannot build {where} of {onnx_path.name} for {settings.precision}{detail}; "
            f"{_hint(settings)}")


# --- engine cache -------------------------------------------------------------------------------


def engine_path(engines_dir: Path, precision: str, max_batch_size: int) -> Path:
    """``engines_dir/{FLOAT,HALF,INT8}/engine_bs_{N}.buf``, as the original sample named them."""
    return Path(engines_dir) / ENGINE_DIRS[precision] / f"engine_bs_{max_batch_size}.buf"


def default_engine_path(workspace: Path, artifact: Artifact, module: TrtModule, precision: str,
                        max_batch_size: int) -> Path:
    """The engine cache: ``workspace/engines/<model>/<module>/<flavour>/{FLOAT,HALF,INT8}/engine_bs_{N}.buf``."""
    return engine_path(Path(workspace) / "engines" / artifact.model / module.module / artifact.flavour, precision,
                       max_batch_size)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_target(module: TrtModule, settings: EngineSettings, cudart=None) -> str:
    """What the engine is built for: a compute capability (RTX) or the present GPU's name."""
    if module.compute_capability_target and settings.compute_capability != "CURRENT":
        return f"compute capability {settings.compute_capability}"
    return gpu_name(cudart) or "no GPU"


def engine_key(trt: ModuleType, onnx_path: Path, settings: EngineSettings, cudart=None) -> dict:
    """Everything an engine depends on (compared with the sidecar saved beside it)."""
    module = TrtModule.of(trt)
    key = {"format": ENGINE_FORMAT, "onnx_sha256": sha256_file(onnx_path), "flavour": settings.flavour,
           "trt_module": module.module, "trt_version": module.version,
           "target": build_target(module, settings, cudart), "options": asdict(settings)}
    return json.loads(json.dumps(key))     # as the sidecar stores it (tuples become lists)


@dataclass
class EngineFile:
    """A cached or freshly built engine."""

    path: Path
    data: bytes
    built: bool
    seconds: float
    engine: object = None   # the deserialized ICudaEngine when a runtime was given


sidecar_path = engine_sidecar


def _cached(path: Path, key: dict, runtime) -> tuple[EngineFile | None, str | None]:
    """The cached engine when valid, else (None, why not) — why is None when there is nothing."""
    side = sidecar_path(path)
    if not path.exists() or not side.exists():
        return None, None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "its sidecar is unreadable"
    if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
        return None, "its sidecar is not an engine record"
    if record.get("key") != key:
        changed = sorted(k for k in key if record.get("key", {}).get(k) != key[k])
        return None, f"{', '.join(changed) or 'settings'} changed"
    data = path.read_bytes()
    if len(data) != record.get("size") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return None, "the engine file is truncated or corrupt"
    try:
        read_engine(path)
    except UserError as exc:
        return None, str(exc)
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


def load_or_build_engine(trt: ModuleType, onnx: Artifact, settings: EngineSettings, path: Path, *,
                         calibrator_factory: Callable[[], object] | None = None, runtime=None,
                         timing_cache_path: Path | None = None, cudart=None) -> EngineFile:
    """Reuse the engine at ``path`` when its sidecar matches, else build it from the converted ``onnx``
    (atomically, under a lock). The sidecar carries the ONNX's description, so the engine runs alone."""
    check_settings(trt, settings)
    path = Path(path)
    key = engine_key(trt, Path(onnx.path), settings, cudart)
    cached, _ = _cached(path, key, runtime)
    if cached:
        log.info("Using the TensorRT engine %s (cached, up to date)", path)
        return cached
    with _locked(path):
        cached, reason = _cached(path, key, runtime)  # another process may have built it meanwhile
        if cached:
            log.info("Using the TensorRT engine %s (cached, up to date)", path)
            return cached
        log.info(f"Rebuilding TensorRT engine {path}: {reason}" if reason else
                 f"Building TensorRT engine {path}. This may take a few minutes.")
        return _build_and_store(trt, onnx, settings, path, key, calibrator_factory, runtime, timing_cache_path)


def engine_artifact(trt: ModuleType, onnx: Artifact, settings: EngineSettings, path: Path) -> Artifact:
    """What an engine built from ``onnx`` with ``settings`` is (stored in its sidecar)."""
    return replace(onnx, kind="engine", path=Path(path), precision=settings.precision,
                   trt_module=TrtModule.of(trt).label, max_batch_size=settings.max_batch_size)


def _build_and_store(trt, onnx: Artifact, settings, path, key, calibrator_factory, runtime,
                     timing_cache_path) -> EngineFile:
    start = time.perf_counter()
    calibrator = calibrator_factory() if calibrator_factory and settings.precision == "INT8" else None
    data = build_engine(trt, Path(onnx.path), settings, calibrator, timing_cache_path)
    seconds = time.perf_counter() - start
    sidecar_path(path).unlink(missing_ok=True)
    write_bytes_atomic(path, data)
    record = {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "build_seconds": round(seconds, 3), "artifact": engine_artifact(trt, onnx, settings, path).metadata()}
    write_text_atomic(sidecar_path(path), json.dumps(record, indent=1))
    engine = runtime.deserialize_cuda_engine(data) if runtime is not None else None
    log.info("Built in %.1f s", seconds)
    return EngineFile(path, data, built=True, seconds=seconds, engine=engine)


def build_from_onnx(trt: ModuleType, onnx: Artifact, settings: EngineSettings, path: Path,
                    calib_dir: Path | None = None, timing_cache_path: Path | None = None) -> Artifact:
    """The engine of the converted ``onnx`` at ``path`` (cached or built), as an Artifact: the one loader
    behind build_engine.py and the scripts' ``--backend tensorrt``. TensorRT 10 INT8 is calibrated on
    ``calib_dir`` (default: utils.quantize.calibration_images)."""
    module = TrtModule.of(trt)

    def calibrator():
        from utils.quantize import CALIBRATION_BATCH, calibration_images  # noqa: PLC0415

        return entropy_calibrator(trt, calibration_images(calib_dir), CALIBRATION_BATCH, onnx.spec.input_size,
                                  Path(path).with_name("calibration.cache"))

    load_or_build_engine(trt, onnx, settings, path, calibrator_factory=calibrator if module.precision_flags else None,
                         timing_cache_path=timing_cache_path)
    return read_engine(path)


# --- TensorRT 10 INT8 calibration ---------------------------------------------------------------


def entropy_calibrator(trt: ModuleType, paths: Sequence[Path], batch_size: int, input_size: tuple[int, int],
                       cache_path: Path, cudart=None):
    """An IInt8EntropyCalibrator2 fed with preprocessed image files (TensorRT 10 only)."""
    if not TrtModule.of(trt).precision_flags:
        raise UserError(f"{TrtModule.of(trt).label} is strongly typed: INT8 comes from a Q/DQ ONNX, not a calibrator")
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
