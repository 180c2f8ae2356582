"""Frozen graph -> ONNX file, cached beside the model with a key of everything that shaped it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import onnx

from utils import onnx_export, quantize, tf_graph
from utils.artifact import FLAVOURS, PRECISIONS, Artifact, file_fingerprint, flavour_info, read_onnx, set_onnx_metadata
from utils.errors import UserError
from utils.files import atomic_path, write_text_atomic
from utils.labels import label_map_for, model_labels
from utils.models import ResolvedModel
from utils.spec_reader import input_size, read_ssd_spec
from utils.ssd_spec import NmsOverrides, SsdSpec  # noqa: F401  (NmsOverrides: re-exported)

CONVERTER_VERSION = 3   # 3: the clip order (before / after NMS) read from the graph
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertedModel:
    """An ONNX file and what it is."""

    onnx_path: Path
    artifact: Artifact
    built: bool          # False when it came from the cache
    seconds: float       # conversion time (0 for a cache hit)

    @property
    def spec(self) -> SsdSpec:
        return self.artifact.spec


_NMS_NAMES = {"score_threshold": "score", "iou_threshold": "iou", "top_k": "top", "keep_top_k": "keep"}


def default_onnx_path(model: ResolvedModel, flavour: str, precision: str, nms: NmsOverrides = NmsOverrides()) -> Path:
    """``<output_dir>/<model>_<flavour>_<precision>[_score0.3_iou0.5_top100_keep50].onnx``: each set of NMS
    overrides has its own file, so alternating them does not convert again every time."""
    overrides = "".join(f"_{_NMS_NAMES[name]}{value:g}" for name, value in asdict(nms).items() if value is not None)
    return model.output_dir / f"{model.name}_{flavour}_{precision}{overrides}.onnx"


def cache_key(model: ResolvedModel, flavour: str, precision: str, nms: NmsOverrides = NmsOverrides(),
              calibration: str | None = None, labels: Mapping[int, str] | None = None) -> dict:
    """Everything a converted graph depends on (compared with the key saved beside it); ``labels`` is --labels,
    else the label map found for the model (utils.labels.model_labels)."""
    if labels is None:
        labels = model_labels(None, model.graph_path, model.config_path, model.labels)
    stat = model.graph_path.stat()
    config_stat = model.config_path.stat() if model.config_path else None
    return {
        "converter_version": CONVERTER_VERSION,
        "graph": str(model.graph_path.resolve()), "graph_size": stat.st_size, "graph_mtime_ns": stat.st_mtime_ns,
        "config_mtime_ns": config_stat.st_mtime_ns if config_stat else None,
        "flavour": flavour, "precision": precision, "nms_overrides": asdict(nms), "calibration": calibration,
        "labels": {str(k): v for k, v in sorted(labels.items())} if labels is not None else None,
    }


def read_spec(model: ResolvedModel) -> tuple[object, object, tf_graph.SsdGraphNodes, SsdSpec]:
    """Load, validate and cut the graph; returns (graph_def, core_graph_def, nodes, spec)."""
    graph_def = tf_graph.load_graph_def(model.graph_path)
    nodes = tf_graph.find_ssd_nodes(graph_def, model.graph_path)
    # Feature-map sizes depend on the input size (and an FPN only fits together at it): read it before cutting.
    core = tf_graph.extract_core(graph_def, nodes, input_size(graph_def, nodes, model.config_path, model.graph_path))
    spec = read_ssd_spec(graph_def, core, nodes, model.config_path, model.graph_path)
    return graph_def, core, nodes, spec


def check_options(flavour: str, precision: str) -> None:
    """Refuse a flavour or precision this release cannot build (before anything is downloaded)."""
    if flavour not in FLAVOURS:
        raise UserError(f"unknown flavour '{flavour}'; choose one of {', '.join(FLAVOURS)}")
    if precision == "BF16":
        raise UserError("BF16 is a runtime precision, not a file's: convert FP32 and run it with --backend openvino "
                        "-p BF16")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision}; use -p {' or '.join(PRECISIONS)}")


def _cached(onnx_path: Path, key_path: Path, key: dict) -> tuple[Artifact | None, str | None]:
    """The cached ONNX when its key matches and the file is the one the key recorded; else (None, why)."""
    if not onnx_path.exists() or not key_path.exists():
        return None, None
    try:
        record = json.loads(key_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
            return None, "its key file is not a conversion record"
        if record["key"] != key:
            changed = sorted(name for name in key if record["key"].get(name) != key[name])
            return None, f"{', '.join(changed) or 'the model or the options'} changed"
        if record.get("file") != file_fingerprint(onnx_path):
            return None, "the ONNX file differs from the one converted (truncated or replaced)"
        return read_onnx(onnx_path), None
    except (OSError, ValueError):
        return None, "its key file is unreadable"
    except UserError as exc:
        return None, str(exc)


def convert(model: ResolvedModel, flavour: str = "portable", precision: str = "FP32",
            nms: NmsOverrides = NmsOverrides(), output: Path | None = None, force: bool = False,
            calibration_images: Sequence[Path] | None = None,
            labels: Mapping[int, str] | None = None) -> ConvertedModel:
    """Build the ONNX of ``model`` (or reuse the cached one whose key matches).

    ``labels`` (--labels) names the classes; without it they come from utils.labels.resolve_labels's other
    sources. The label map is stored in the ONNX and is part of the cache key.

    FP16 and INT8 are variants of the FP32 graph (utils.quantize); INT8 is calibrated on
    ``calibration_images`` (default: utils.quantize.calibration_images()).
    """
    check_options(flavour, precision)
    problem = nms.problem()
    if problem:
        raise UserError(f"NMS option {problem}")
    labels = dict(labels) if labels is not None else model_labels(None, model.graph_path, model.config_path,
                                                                  model.labels)
    if precision == "INT8" and calibration_images is None:
        calibration_images = quantize.calibration_images()
    onnx_path = Path(output) if output else default_onnx_path(model, flavour, precision, nms)
    key_path = onnx_path.with_suffix(".convert.json")   # not .json: an engine sidecar of the same stem may sit there
    calibration = quantize.calibration_fingerprint(calibration_images) if precision == "INT8" else None
    key = cache_key(model, flavour, precision, nms, calibration, labels)
    cached, reason = (None, None) if force else _cached(onnx_path, key_path, key)
    if cached:
        log.info("Using the converted %s (cached, up to date; -f converts again)", onnx_path)
        return ConvertedModel(onnx_path, cached, built=False, seconds=0.0)
    log.info("Converting %s (%s, %s) to %s%s...", model.graph_path, flavour, precision, onnx_path,
             f": {reason}" if reason else "")

    start = time.perf_counter()
    key_path.unlink(missing_ok=True)
    if precision == "FP32":
        _, core, nodes, spec = read_spec(model)
        spec = spec.with_nms(**asdict(nms))
        artifact = Artifact("onnx", onnx_path, spec, flavour, precision, model.name,
                            labels if labels is not None else label_map_for(None, spec.num_classes))
        extra = onnx_export.predictor_outputs(nodes.predictor_heads) if flavour_info(flavour).plugin_ops else []
        model_proto = onnx_export.POSTPROCESSING[flavour](onnx_export.convert_core(core, spec, extra), spec, extra)
        model_proto.producer_name = "uff_ssd successor (tf2onnx + onnx-graphsurgeon)"
        set_onnx_metadata(model_proto, artifact)
        with atomic_path(onnx_path) as tmp:
            onnx.save(model_proto, str(tmp))
    else:
        base = convert(model, flavour, "FP32", nms, force=force, labels=labels).artifact
        artifact = replace(base, path=onnx_path, precision=precision)
        if precision == "FP16":
            variant = quantize.to_fp16(onnx.load(str(base.path)))
            set_onnx_metadata(variant, artifact)
            with atomic_path(onnx_path) as tmp:
                onnx.save(variant, str(tmp))
        else:
            quantize.quantize_int8(base.path, onnx_path, calibration_images, artifact)
    write_text_atomic(key_path, json.dumps({"key": key, "file": file_fingerprint(onnx_path)}, indent=1))
    seconds = time.perf_counter() - start
    log.info("Converted in %.1f s", seconds)
    return ConvertedModel(onnx_path, artifact, built=True, seconds=seconds)

