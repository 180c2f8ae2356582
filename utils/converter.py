"""Frozen graph -> ONNX file, cached beside the model with a key of everything that shaped it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import onnx

from utils import onnx_export, tf_graph
from utils import precision as precision_module
from utils.errors import UserError
from utils.files import atomic_path, write_text_atomic
from utils.models import ResolvedModel
from utils.ssd_spec import SsdSpec, read_ssd_spec

CONVERTER_VERSION = 1
PRECISIONS = ("FP32", "FP16", "INT8")


@dataclass(frozen=True)
class NmsOverrides:
    """Command-line overrides of the graph's NMS parameters (None keeps the graph's value)."""

    score_threshold: float | None = None
    iou_threshold: float | None = None
    top_k: int | None = None
    keep_top_k: int | None = None


@dataclass(frozen=True)
class ConvertedModel:
    """An ONNX file and the spec it was built from."""

    onnx_path: Path
    spec: SsdSpec
    built: bool          # False when it came from the cache
    seconds: float       # conversion time (0 for a cache hit)


def default_onnx_path(model: ResolvedModel, flavour: str, precision: str) -> Path:
    return model.output_dir / f"{model.name}_{flavour}_{precision}.onnx"


def cache_key(model: ResolvedModel, flavour: str, precision: str, nms: NmsOverrides = NmsOverrides(),
              calibration: str | None = None) -> dict:
    """Everything a converted graph depends on (compared with the key saved beside it)."""
    stat = model.graph_path.stat()
    config_stat = model.config_path.stat() if model.config_path else None
    return {
        "converter_version": CONVERTER_VERSION,
        "graph": str(model.graph_path.resolve()), "graph_size": stat.st_size, "graph_mtime_ns": stat.st_mtime_ns,
        "config_mtime_ns": config_stat.st_mtime_ns if config_stat else None,
        "flavour": flavour, "precision": precision, "nms_overrides": asdict(nms), "calibration": calibration,
    }


def spec_from_dict(data: dict) -> SsdSpec:
    """The SsdSpec saved in a converted graph's sidecar JSON."""
    from utils.ssd_spec import AnchorSpec, NmsSpec  # noqa: PLC0415

    anchors = data["anchors"]
    anchors = AnchorSpec(**{**anchors, "aspect_ratios": tuple(anchors["aspect_ratios"]),
                            "feature_map_shapes": tuple(tuple(s) for s in anchors["feature_map_shapes"])})
    return SsdSpec(num_classes=data["num_classes"], input_size=tuple(data["input_size"]), anchors=anchors,
                   box_coder_scales=tuple(data["box_coder_scales"]), nms=NmsSpec(**data["nms"]))


def read_spec(model: ResolvedModel) -> tuple[object, object, tf_graph.SsdGraphNodes, SsdSpec]:
    """Load, validate and cut the graph; returns (graph_def, core_graph_def, nodes, spec)."""
    graph_def = tf_graph.load_graph_def(model.graph_path)
    nodes = tf_graph.find_ssd_nodes(graph_def, model.graph_path)
    # Feature-map sizes depend on the input size; read it from config/graph before cutting.
    probe = tf_graph.extract_core(graph_def, nodes, (300, 300))
    spec = read_ssd_spec(graph_def, probe, nodes, model.config_path, model.graph_path)
    if spec.input_size != (300, 300):
        probe = tf_graph.extract_core(graph_def, nodes, spec.input_size)
        spec = read_ssd_spec(graph_def, probe, nodes, model.config_path, model.graph_path)
    return graph_def, probe, nodes, spec


def check_options(flavour: str, precision: str) -> None:
    """Refuse a flavour or precision this release cannot build (before anything is downloaded)."""
    if flavour not in onnx_export.FLAVOURS:
        raise UserError(f"flavour '{flavour}' is not available yet; choose one of {', '.join(onnx_export.FLAVOURS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision}; use -p {' or '.join(PRECISIONS)}")


def convert(model: ResolvedModel, flavour: str = "portable", precision: str = "FP32",
            nms: NmsOverrides = NmsOverrides(), output: Path | None = None, force: bool = False,
            calibration_images: Sequence[Path] | None = None) -> ConvertedModel:
    """Build the ONNX of ``model`` (or reuse the cached one whose key matches).

    FP16 and INT8 are variants of the FP32 graph (utils.precision); INT8 is calibrated on
    ``calibration_images`` (default: utils.precision.calibration_images()).
    """
    check_options(flavour, precision)
    if precision == "INT8" and calibration_images is None:
        calibration_images = precision_module.calibration_images()
    onnx_path = Path(output) if output else default_onnx_path(model, flavour, precision)
    key_path = onnx_path.with_suffix(".json")
    calibration = precision_module.calibration_fingerprint(calibration_images) if precision == "INT8" else None
    key = cache_key(model, flavour, precision, nms, calibration)
    if not force and onnx_path.exists() and key_path.exists():
        cached = json.loads(key_path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return ConvertedModel(onnx_path, spec_from_dict(cached["spec"]), built=False, seconds=0.0)

    start = time.perf_counter()
    key_path.unlink(missing_ok=True)
    if precision == "FP32":
        _, core, nodes, spec = read_spec(model)
        spec = spec.with_nms(**asdict(nms))
        extra = onnx_export.predictor_outputs(nodes.box_predictors) if flavour == "trt-plugins" else []
        model_proto = onnx_export.POSTPROCESSING[flavour](onnx_export.convert_core(core, spec, extra), spec, extra)
        model_proto.producer_name = "uff_ssd successor (tf2onnx + onnx-graphsurgeon)"
        onnx.helper.set_model_props(model_proto, {"source_graph": str(model.graph_path), "flavour": flavour,
                                                  "spec": json.dumps(asdict(spec))})
        with atomic_path(onnx_path) as tmp:
            onnx.save(model_proto, str(tmp))
    else:
        base = convert(model, flavour, "FP32", nms, force=force)
        spec = base.spec
        if precision == "FP16":
            with atomic_path(onnx_path) as tmp:
                onnx.save(precision_module.to_fp16(onnx.load(str(base.onnx_path))), str(tmp))
        else:
            precision_module.quantize_int8(base.onnx_path, onnx_path, calibration_images, spec.input_size)
    write_text_atomic(key_path, json.dumps({"key": key, "spec": asdict(spec)}, indent=1))
    return ConvertedModel(onnx_path, spec, built=True, seconds=time.perf_counter() - start)

