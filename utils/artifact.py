"""The files handed from step to step, and what they carry about themselves.

A converted ONNX holds, in one ``metadata_props`` entry (``ssd_detector``, JSON), everything a
runtime needs: the SsdSpec (classes, input size, anchors, box coder, NMS), the flavour, the
precision, the model's name and its label map. A TensorRT engine carries the same in the sidecar
JSON beside it (``model.engine`` -> ``model.json``), with the TensorRT module that built it. So a
file alone is enough to run a model: no frozen graph, no TensorFlow.

This module also names the choices every step shares (flavours, precisions) and the network's
tensor names; it imports neither TensorFlow nor TensorRT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError
from utils.ssd_spec import SsdSpec

PRECISIONS = ("FP32", "FP16", "INT8")          # what a converted file holds
RUN_PRECISIONS = (*PRECISIONS, "BF16")         # what -p takes: BF16 is a runtime's precision on an FP32 file
                                               # (OpenVINO's inference precision hint), never a file's
METADATA_KEY = "ssd_detector"
METADATA_FORMAT = 1

# Tensor names of every converted graph.
INPUT = "Input"                      # float32 [N, 3, H, W], values in [-1, 1]
DETECTIONS = "detections"            # float32 [N, K, 7] (portable, trt-plugins)
NUM_DETECTIONS = "num_detections"    # int32 [N]
BOXES = "boxes"                      # float32 [N, anchors, 4] decoded, normalised (core)
SCORES = "scores"                    # float32 [N, anchors, classes] sigmoid (core)


@dataclass(frozen=True)
class Flavour:
    """What a flavour of the converted graph is, for everything that reads one (converter, runners, builder).
    The ONNX graph surgery of each flavour is utils.onnx_export.POSTPROCESSING[name]."""

    name: str
    outputs: tuple[str, str]     # the two output tensors, in the order runners return them
    nms_inside: bool             # False: the runner applies utils.postprocess's NMS to (boxes, scores)
    plugin_ops: bool             # GridAnchor_TRT / FlattenConcat_TRT / NMS_TRT nodes (plugin/ runs them in ORT)


FLAVOUR_INFO = {info.name: info for info in (
    Flavour("portable", (DETECTIONS, NUM_DETECTIONS), nms_inside=True, plugin_ops=False),
    Flavour("trt-plugins", (DETECTIONS, NUM_DETECTIONS), nms_inside=True, plugin_ops=True),
    Flavour("core", (BOXES, SCORES), nms_inside=False, plugin_ops=False),
)}
FLAVOURS = tuple(FLAVOUR_INFO)


def flavour_info(name: str) -> Flavour:
    return FLAVOUR_INFO[name]


@dataclass(frozen=True)
class Artifact:
    """One runnable file and what it is."""

    kind: str                     # "onnx" | "engine" | "frozen" (the TensorFlow reference graph)
    path: Path
    spec: SsdSpec
    flavour: str | None           # None for a frozen graph
    precision: str
    model: str                    # the model's name (for folders and messages)
    labels: dict[int, str] = field(default_factory=dict, hash=False)
    trt_module: str | None = None  # engines: "tensorrt 10.x" / "tensorrt_rtx 1.7.1..."
    max_batch_size: int | None = None  # engines: the optimisation profile's largest batch
    quantization: str | None = None    # INT8 files: utils.quantize.INT8_FORMS (None: the TensorRT Q/DQ form)

    def metadata(self) -> dict:
        """The JSON stored in the ONNX metadata / engine sidecar."""
        data = {"format": METADATA_FORMAT, "model": self.model, "flavour": self.flavour,
                "precision": self.precision, "spec": self.spec.to_dict(),
                "labels": {str(k): v for k, v in sorted(self.labels.items())}}
        if self.kind == "engine":
            data.update(trt_module=self.trt_module, max_batch_size=self.max_batch_size)
        if self.quantization:
            data["quantization"] = self.quantization
        return data

    def identity(self) -> dict:
        """What a cache key needs to know of this file: where it is and its content hash."""
        return {"kind": self.kind, "path": str(Path(self.path).resolve()), **file_fingerprint(self.path)}


def file_fingerprint(path: Path) -> dict:
    """Size and sha256 of a file (hashed once per size / mtime within a process)."""
    info = Path(path).stat()
    return {"size": info.st_size, "sha256": _sha256(str(Path(path).resolve()), info.st_size, info.st_mtime_ns)}


_HASHES: dict[tuple, str] = {}


def _sha256(path: str, size: int, mtime_ns: int) -> str:
    key = (path, size, mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def from_metadata(kind: str, path: Path, data: object, where: str) -> Artifact:
    """An Artifact from its stored JSON; a one-line UserError when it is not what we write."""
    try:
        if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else data!r}")
        flavour, precision = data["flavour"], data["precision"]
        if flavour not in FLAVOURS or precision not in PRECISIONS:
            raise ValueError(f"flavour {flavour!r} / precision {precision!r}")
        labels = {int(k): str(v) for k, v in dict(data.get("labels") or {}).items()}
        batch = data.get("max_batch_size")
        quantization = data.get("quantization")
        if quantization is not None and not isinstance(quantization, str):
            raise ValueError(f"quantization {quantization!r}")
        return Artifact(kind, Path(path), SsdSpec.from_dict(data["spec"]), flavour, precision, str(data["model"]),
                        labels, data.get("trt_module"), int(batch) if batch is not None else None, quantization)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{where} of '{path}' is not a valid SSD description ({type(exc).__name__}: {exc}); "
                        f"convert the graph again with model.py") from None


def read_onnx(path: Path) -> Artifact:
    """The Artifact of a converted ONNX file (its ``ssd_detector`` metadata)."""
    import onnx  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file '{path}' not found; convert a model with: python model.py -m MODEL")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf raises DecodeError and others)
        raise UserError(f"'{path}' is not a readable ONNX file ({type(exc).__name__}); convert the model again "
                        f"with model.py") from None
    props = {entry.key: entry.value for entry in model.metadata_props}
    if METADATA_KEY not in props:
        raise UserError(f"'{path}' has no '{METADATA_KEY}' metadata (it was not written by model.py); convert the "
                        f"graph with: python model.py -m MODEL")
    try:
        data = json.loads(props[METADATA_KEY])
    except ValueError:
        data = None
    return from_metadata("onnx", path, data, f"the '{METADATA_KEY}' metadata")


def set_onnx_metadata(model_proto, artifact: Artifact) -> None:
    """Store ``artifact``'s description in an ONNX ModelProto (replacing an older one)."""
    kept = [(e.key, e.value) for e in model_proto.metadata_props if e.key != METADATA_KEY]
    del model_proto.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(artifact.metadata()))]:
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def engine_sidecar(path: Path) -> Path:
    """The JSON beside an engine file."""
    return Path(path).with_suffix(".json")


def read_engine(path: Path) -> Artifact:
    """The Artifact of a built engine (from the ``artifact`` entry of its sidecar JSON)."""
    path = Path(path)
    side = engine_sidecar(path)
    if not path.is_file():
        raise UserError(f"engine file '{path}' not found; build one with: python build_engine.py --onnx FILE")
    if not side.is_file():
        raise UserError(f"engine '{path}' has no sidecar '{side.name}' beside it; build it again with build_engine.py")
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"the sidecar '{side}' is unreadable; build the engine again with build_engine.py") from None
    data = record.get("artifact") if isinstance(record, dict) else None
    if not isinstance(data, dict):
        raise UserError(f"the sidecar '{side}' is not an engine record (no description of the engine); build the "
                        f"engine again with build_engine.py")
    artifact = from_metadata("engine", path, data, "the sidecar")
    if not artifact.trt_module:
        raise UserError(f"the sidecar '{side}' does not name the TensorRT module that built the engine; "
                        f"build it again with build_engine.py")
    return artifact


_READ: dict[tuple, Artifact] = {}


def read_artifact(kind: str, path: Path) -> Artifact:
    """read_onnx or read_engine, read once per process while the file (and an engine's sidecar) is unchanged:
    the plan reads it to resolve, then to prepare, and an ONNX may be 100 MB of protobuf."""
    path = Path(path)
    try:
        stamps = tuple((info.st_size, info.st_mtime_ns) for info in
                       [p.stat() for p in ([path] if kind == "onnx" else [path, engine_sidecar(path)])])
    except OSError:
        stamps = None                                   # missing: the reader says so in one line
    key = (kind, str(path.resolve()), stamps)
    if stamps is None or key not in _READ:
        artifact = read_onnx(path) if kind == "onnx" else read_engine(path)
        if stamps is None:
            return artifact
        _READ[key] = artifact
    return _READ[key]
