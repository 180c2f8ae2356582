"""Plan: every choice of a run, resolved once from the command line; the one cache key; prepare and open.

A Plan is frozen and picklable (Ray actors get it). ``Plan.resolve`` turns the scripts' "auto"
values into what will really run — backend, flavour, precision, TensorRT module, decode path, NMS
overrides, runtime options — or refuses with a one-line UserError before anything is downloaded or
built. Then:

    plan.prepare()        -> Artifact: the file to run (convert with TensorFlow and / or build a
                             TensorRT engine only when the source is a model; nothing when it is a file)
    plan.open(artifact)   -> Runner (a context manager)
    plan.key(artifact)    -> the cache key of results made by this plan from this file (VOC result
                             files, Ray shards); converted files and engines are keyed by
                             utils.converter / utils.engine from the same resolved values.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping

from utils.artifact import FLAVOURS, RUN_PRECISIONS, Artifact, flavour_info, read_artifact
from utils.errors import UserError
from utils.runtime import BACKENDS, RuntimeOptions, installed, open_runner
from utils.ssd_spec import NmsOverrides

log = logging.getLogger(__name__)
_WARNED_UNNAMED: set[str] = set()   # models whose "no names" warning was given (once per process)


@dataclass(frozen=True)
class Plan:
    source: str                  # "model" | "onnx" | "engine"
    location: str | None         # the model (registry name, folder, .pb; None = the default) or the file
    workspace: Path
    backend: str                 # tensorrt | onnxruntime | openvino | tensorflow
    flavour: str | None          # the ONNX flavour that runs (None: the frozen graph)
    precision: str               # FP32 | FP16 | INT8 | BF16 (openvino: FP32 file, bf16 inference precision hint)
    batch_size: int
    decode: str                  # cpu | gpu
    nms: NmsOverrides = field(default_factory=NmsOverrides)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    calib_dir: Path | None = None
    labels: tuple[tuple[int, str], ...] | None = None   # --labels: the label map that names the classes (None: the
                                                        # file's own, or utils.labels.resolve_labels's at conversion)

    @classmethod
    def resolve(cls, *, model: str | None = None, onnx: Path | None = None, engine: Path | None = None,
                workspace: Path = Path("workspace"), backend: str = "auto", flavour: str | None = "auto",
                precision: str | None = None, batch_size: int = 1, decode: str = "auto",
                nms: NmsOverrides = NmsOverrides(), cuda_graph: bool = False, nhwc: bool = False,
                trt_module: str | None = None, compute_capability: str | None = None,
                calib_dir: Path | None = None, labels: Mapping[int, str] | None = None) -> "Plan":
        """Resolve every "auto" once; a one-line UserError for a combination that cannot run."""
        given = [(kind, value) for kind, value in (("onnx", onnx), ("engine", engine)) if value is not None]
        if len(given) > 1 or (given and model is not None):
            raise UserError("give one of -m/--model, --onnx FILE or --engine FILE")
        source, location = given[0] if given else ("model", model)
        artifact = read_artifact(source, Path(location)) if source != "model" else None
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if nms.problem():
            raise UserError(f"NMS option {nms.problem()}")

        backend = _backend(backend, source)
        if backend == "tensorrt" and artifact is not None and artifact.quantization not in (None, "tensorrt-qdq"):
            raise UserError(f"{artifact.path} is INT8 in the {artifact.quantization} form, which TensorRT does not "
                            f"read; give the FP32 file, or convert with model.py -p INT8 (TensorRT's Q/DQ form)")
        module = _trt_module(backend, trt_module, artifact, compute_capability)
        flavour = _flavour(flavour, backend, module, artifact)
        precision = _precision(precision, backend, module, artifact)
        if artifact is not None and artifact.max_batch_size and batch_size > artifact.max_batch_size:
            raise UserError(f"batch size {batch_size} exceeds the engine's maximum {artifact.max_batch_size}; use -b "
                            f"{artifact.max_batch_size} or build the engine with build_engine.py -b {batch_size}")
        if nms.any() and (backend == "tensorflow" or (artifact is not None and flavour_info(artifact.flavour).nms_inside)):
            where = "the frozen graph" if backend == "tensorflow" else f"the converted file {artifact.path}"
            raise UserError(f"NMS options cannot change {where} (its NMS is inside); convert with model.py and the "
                            f"NMS options, or run the core flavour")
        if (cuda_graph or nhwc) and backend != "onnxruntime":
            raise UserError(f"--cuda-graph and --nhwc are ONNX Runtime CUDA options; the {backend} backend does not "
                            f"take them")
        options = RuntimeOptions(cuda_graph=cuda_graph, nhwc=nhwc, trt_module=module.module if module else None,
                                 compute_capability=_compute_capability(module, compute_capability))
        decode = _decode(decode, backend)
        return cls(source, str(location) if location is not None else None, Path(workspace), backend, flavour,
                   precision, batch_size, decode, nms, options, Path(calib_dir) if calib_dir else None,
                   tuple(sorted((int(k), str(v)) for k, v in labels.items())) if labels is not None else None)

    # --- the steps ---------------------------------------------------------------------------

    def prepare(self, warn: bool = True) -> Artifact:
        """The file this plan runs: the given one, or converted (and built) from the model; --labels applied, and
        (``warn``) one warning line when its classes have no names."""
        artifact = self.runnable(self._prepare())
        from utils.labels import warn_unnamed  # noqa: PLC0415

        if warn and artifact.model not in _WARNED_UNNAMED and not artifact.labels:
            _WARNED_UNNAMED.add(artifact.model)
            warn_unnamed(artifact.labels, artifact.spec.num_classes, artifact.model)
        return artifact

    def _prepare(self) -> Artifact:
        if self.source == "engine":
            return read_artifact("engine", Path(self.location))
        if self.source == "onnx":
            onnx = read_artifact("onnx", Path(self.location))
        else:
            from utils.models import resolve_model  # noqa: PLC0415  (conversion side: never on a file)

            model = resolve_model(self.location, self.workspace)
            if self.backend == "tensorflow":
                return _frozen_artifact(model, self.label_map)
            from utils.converter import convert  # noqa: PLC0415

            calibration = None
            if self.onnx_precision == "INT8" or self.cpu_int8:
                from utils.quantize import calibration_images  # noqa: PLC0415

                calibration = calibration_images(self.calib_dir)
            onnx = convert(model, self.flavour, self.onnx_precision, self.nms,
                           calibration_images=calibration, labels=self.label_map).artifact
            if self.cpu_int8:
                from utils.quantize import INT8_FORM_OF, int8_variant  # noqa: PLC0415

                return int8_variant(onnx, INT8_FORM_OF[self.backend], calibration)
        if self.backend != "tensorrt":
            return onnx
        return self._build(onnx)

    def _build(self, onnx: Artifact) -> Artifact:
        from utils.engine import EngineSettings, build_from_onnx, default_engine_path  # noqa: PLC0415
        from utils.trt import TrtModule, import_trt  # noqa: PLC0415

        trt = import_trt(self.options.trt_module)
        module = TrtModule.of(trt)
        settings = EngineSettings(self.precision, self.batch_size, flavour=onnx.flavour,
                                  compute_capability=self.options.compute_capability or "CURRENT",
                                  input_size=onnx.spec.input_size)
        path = default_engine_path(self.workspace, onnx, module, self.precision, self.batch_size)
        return build_from_onnx(trt, onnx, settings, path, self.calib_dir, self.workspace / "engines" / "timing.cache")

    @property
    def cpu_int8(self) -> bool:
        """INT8 on onnxruntime / openvino: the FP32 graph converted, then quantised in that runtime's form
        (utils.quantize.int8_variant); the converter's INT8 is TensorRT's Q/DQ form."""
        return self.precision == "INT8" and self.backend in ("onnxruntime", "openvino")

    @property
    def onnx_precision(self) -> str:
        """The precision of the ONNX to convert: TensorRT 10 builds FP16 / INT8 from the FP32 graph, OpenVINO runs
        BF16 from it, and the CPU runtimes' INT8 is quantised from it (``cpu_int8``)."""
        if self.precision == "BF16" or self.cpu_int8:
            return "FP32"
        if self.backend == "tensorrt":
            from utils.trt import TrtModule, import_trt  # noqa: PLC0415

            if not TrtModule.of(import_trt(self.options.trt_module)).strongly_typed:
                return "FP32"
        return self.precision

    def runnable(self, artifact: Artifact) -> Artifact:
        """``artifact`` with the NMS overrides applied where NMS runs outside the file (the core flavour), and the
        --labels label map in place of its own."""
        if self.nms.any() and artifact.flavour and not flavour_info(artifact.flavour).nms_inside:
            artifact = replace(artifact, spec=artifact.spec.with_nms(**asdict(self.nms)))
        if self.labels is not None and artifact.labels != self.label_map:
            artifact = replace(artifact, labels=self.label_map)
        if {self.precision, artifact.precision} == {"FP32", "BF16"}:
            artifact = replace(artifact, precision=self.precision)   # BF16: the FP32 file run with the bf16 hint
        return artifact

    @property
    def label_map(self) -> dict[int, str] | None:
        """--labels as {id: name}, or None."""
        return dict(self.labels) if self.labels is not None else None

    def open(self, artifact: Artifact):
        """The runner of ``artifact`` (utils.runtime): use it as a context manager."""
        return open_runner(self.runnable(artifact), self.batch_size, self.options, self.backend)

    def key(self, artifact: Artifact) -> dict:
        """What results of this plan on ``artifact`` depend on: the file's content, the backend, flavour,
        precision and TensorRT module really used, the effective NMS, the decode path and runtime options."""
        runnable = self.runnable(artifact)
        return {"artifact": artifact.identity(), "backend": self.backend, "flavour": artifact.flavour,
                "precision": runnable.precision, "quantization": artifact.quantization,
                "trt_module": artifact.trt_module or (self.options.trt_module if self.backend == "tensorrt" else None),
                "nms": asdict(runnable.spec.nms), "decode": self.decode, "options": asdict(self.options),
                "labels": {str(k): v for k, v in sorted(runnable.labels.items())}}


# --- resolution, one value at a time --------------------------------------------------------------

def _backend(choice: str, source: str) -> str:
    if choice not in (*BACKENDS, "auto"):
        raise UserError(f"unknown backend '{choice}'; choose one of auto, {', '.join(BACKENDS)}")
    if source == "engine":
        if choice not in ("auto", "tensorrt"):
            raise UserError(f"an engine runs on the tensorrt backend, not {choice}; give --onnx FILE to use {choice}")
        return "tensorrt"
    if choice == "tensorflow" and source != "model":
        raise UserError("the tensorflow backend runs the frozen graph; give -m MODEL instead of a converted file")
    if choice != "auto":
        return choice
    if installed("tensorrt"):
        return "tensorrt"
    if installed("onnxruntime"):
        from utils.runtime.onnxruntime import cuda_available  # noqa: PLC0415

        if cuda_available():
            return "onnxruntime"
    # No GPU: OpenVINO measured fastest on the CPU at the same accuracy (benchmarks/bench_eval.py)
    candidates = ["openvino", "onnxruntime"] + (["tensorflow"] if source == "model" else [])
    for candidate in candidates:
        if installed(candidate):
            return candidate
    raise UserError("no inference runtime is installed; run: pip install -r requirements.txt")


def _trt_module(backend: str, name: str | None, artifact: Artifact | None, compute_capability: str | None):
    if backend != "tensorrt":
        if name or compute_capability:
            raise UserError(f"--trt-module and --compute-capability are TensorRT options; the {backend} backend does "
                            f"not take them (add --backend tensorrt)")
        return None
    from utils.trt import TrtModule, import_trt  # noqa: PLC0415

    built_by = artifact.trt_module.split()[0] if artifact is not None and artifact.trt_module else None
    if name and built_by and name != built_by:
        raise UserError(f"the engine {artifact.path} was built by {artifact.trt_module}, not {name}; drop --trt-module "
                        f"or build the engine again with build_engine.py --trt-module {name}")
    module = TrtModule.of(import_trt(name or built_by))
    if compute_capability and not module.compute_capability_target:
        raise UserError(f"--compute-capability targets TensorRT-RTX builds; {module.label} builds for the GPU present")
    return module


def _compute_capability(module, value: str | None) -> str | None:
    from utils.trt import compute_capability_name  # noqa: PLC0415

    return compute_capability_name(value) if module is not None and module.compute_capability_target else None


def _flavour(choice: str | None, backend: str, module, artifact: Artifact | None) -> str | None:
    choice = None if choice == "auto" else choice
    if choice is not None and choice not in FLAVOURS:
        raise UserError(f"unknown flavour '{choice}'; choose one of auto, {', '.join(FLAVOURS)}")
    if artifact is not None:
        if choice and choice != artifact.flavour:
            raise UserError(f"{artifact.path} holds the {artifact.flavour} flavour, not {choice}; drop --flavour or "
                            f"convert again with model.py --flavour {choice}")
        return artifact.flavour
    if backend == "tensorflow":
        return None
    if choice == "trt-plugins" and backend == "openvino":
        raise UserError("the openvino backend cannot run the trt-plugins flavour's TensorRT plugin nodes; use "
                        "--flavour core or portable")
    return choice or {"onnxruntime": "portable", "openvino": "portable"}.get(backend) or module.default_flavour


# What -p takes on each backend (a converted file runs its own precision; BF16 needs an FP32 file).
BACKEND_PRECISIONS = {"tensorrt": ("FP32", "FP16", "INT8"), "onnxruntime": ("FP32", "FP16", "INT8"),
                      "openvino": ("FP32", "BF16", "INT8"), "tensorflow": ("FP32",)}


def _precision(choice: str | None, backend: str, module, artifact: Artifact | None) -> str:
    if choice is not None and choice not in RUN_PRECISIONS:
        raise UserError(f"unknown precision {choice}; choose one of {', '.join(RUN_PRECISIONS)}")
    if choice is not None and choice not in BACKEND_PRECISIONS[backend]:
        what = "the frozen graph " if backend == "tensorflow" else ""
        bf16 = "; BF16 runs on the openvino backend (--backend openvino)" if choice == "BF16" else ""
        raise UserError(f"the {backend} backend runs {what}{' / '.join(BACKEND_PRECISIONS[backend])}, not {choice}; "
                        f"use -p {BACKEND_PRECISIONS[backend][0]}{bf16}")
    if backend == "openvino":
        return _openvino_precision(choice, artifact)
    if artifact is None:
        return choice or "FP32"
    fixed = artifact.kind == "engine" or backend == "onnxruntime" or module.strongly_typed
    if choice and choice != artifact.precision and fixed:
        raise UserError(f"{artifact.path} is {artifact.precision}; drop -p or convert again with model.py -p {choice}")
    return choice or artifact.precision


def _openvino_precision(choice: str | None, artifact: Artifact | None) -> str:
    """-p on openvino: a file runs its own precision (BF16 also from an FP32 file); without -p a model or an FP32
    file runs BF16 where the CPU has BF16 arithmetic (faster, detections within the accuracy bounds:
    benchmarks/bench_eval.py), else FP32."""
    if artifact is not None and artifact.precision not in BACKEND_PRECISIONS["openvino"]:
        raise UserError(f"{artifact.path} is {artifact.precision}; the openvino backend runs FP32 or INT8 files "
                        f"(convert with model.py -p FP32)")
    if artifact is not None and choice and choice != artifact.precision and not (
            choice == "BF16" and artifact.precision == "FP32"):
        raise UserError(f"{artifact.path} is {artifact.precision}; drop -p or convert again with model.py -p FP32")
    if choice:
        from utils.runtime.openvino import supports_bf16  # noqa: PLC0415

        if choice == "BF16" and not supports_bf16():
            raise UserError("-p BF16 needs a CPU with BF16 arithmetic (AVX512-BF16 or AMX), which this one lacks; "
                            "use -p FP32 or INT8")
        return choice
    if artifact is not None and artifact.precision != "FP32":
        return artifact.precision
    from utils.runtime.openvino import supports_bf16  # noqa: PLC0415

    return "BF16" if supports_bf16() else "FP32"


def _decode(choice: str, backend: str) -> str:
    from utils.pipeline import resolve_decode  # noqa: PLC0415

    takes_cuda = False
    if choice != "cpu":
        if backend == "onnxruntime":
            from utils.runtime.onnxruntime import cuda_available  # noqa: PLC0415

            takes_cuda = cuda_available()
        elif backend == "tensorrt":
            takes_cuda = True          # TensorRT runs on CUDA and takes device input (set_tensor_address)
    return resolve_decode(choice, takes_cuda, backend)


def _frozen_artifact(model, labels: Mapping[int, str] | None) -> Artifact:
    """The TensorFlow reference: the frozen graph itself, its spec read with TensorFlow."""
    from utils.converter import read_spec  # noqa: PLC0415
    from utils.labels import label_map_for, model_labels  # noqa: PLC0415

    log.info("Loading TensorFlow frozen graph from %s", model.graph_path)
    if labels is None:
        labels = model_labels(None, model.graph_path, model.config_path, model.labels)
    spec = read_spec(model)[3]
    return Artifact("frozen", model.graph_path, spec, None, "FP32", model.name,
                    dict(labels) if labels is not None else label_map_for(None, spec.num_classes))
