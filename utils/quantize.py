"""FP16 and INT8 variants of a converted FP32 ONNX, for TensorRT, ONNX Runtime and OpenVINO.

FP16: onnxconverter-common's float16 converter on the network; inputs/outputs and the
post-processing (decoding, NMS, plugin nodes) stay FP32.

INT8 comes in one form per runtime (INT8_FORMS), each calibrated on real images through the project's
one preprocessing function, on images that are not evaluated (``calibration_images``: never the VOC set):

- ``tensorrt-qdq`` (utils.converter's INT8, ``quantize_int8``): ONNX Runtime's static quantization in the
  Q/DQ form TensorRT reads (symmetric INT8 activations and per-channel weights, FP32 biases; convolutions only).
- ``onnxruntime-qoperator``: QLinearConv with U8 activations, S8 per-channel weights and INT32 biases, the
  form ONNX Runtime's CPU kernels run in integer arithmetic (its Q/DQ graphs run DequantizeLinear + FP32 Conv);
  the detection heads' last convolutions stay FP32.
- ``openvino-nncf``: NNCF's post-training quantisation (MIXED preset: asymmetric activations; its default
  symmetric activations wreck SSDLite's scores here) with the detection heads' last convolutions in FP32;
  a Q/DQ ONNX that OpenVINO fuses into its INT8 kernels.

``int8_variant`` writes the latter two beside the FP32 file, cached under a key of the FP32 file's content,
the form and the calibration set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from utils.errors import UserError
from utils.files import atomic_path, write_text_atomic
from utils.artifact import INPUT, Artifact, file_fingerprint, read_onnx, set_onnx_metadata
from utils.onnx_export import PLUGIN_DOMAIN, POST_PREFIX
from utils.pipeline import load_batches

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
CALIBRATION_IMAGES = 64
CALIBRATION_SUFFIXES = (".jpg", ".jpeg", ".png")
REPO_IMAGES = Path(__file__).resolve().parents[1] / "images"

INT8_FORMS = ("tensorrt-qdq", "onnxruntime-qoperator", "openvino-nncf")
INT8_FORM_OF = {"tensorrt": "tensorrt-qdq", "onnxruntime": "onnxruntime-qoperator", "openvino": "openvino-nncf"}
QUANTIZE_VERSION = 1
# The detection heads' last convolutions (class logits and box encodings of every TF OD API SSD): kept FP32.
HEAD_PATTERN = r".*(ClassPredictor|BoxEncodingPredictor)/BiasAdd.*"


def calibration_images(folder: Path | None = None, count: int = CALIBRATION_IMAGES) -> list[Path]:
    """The first ``count`` images (JPEG, PNG) of ``folder`` if given, else of the project's images/.

    Never the evaluation set by default: calibrating on the images that are then evaluated flatters INT8.
    """
    for candidate in [folder] if folder is not None else [REPO_IMAGES]:
        if candidate is not None and Path(candidate).is_dir():
            found = sorted(p for p in Path(candidate).iterdir() if p.suffix.lower() in CALIBRATION_SUFFIXES)
            if found:
                return found[:count]
    raise UserError(f"no calibration images (*.jpg, *.png) in {folder or REPO_IMAGES}; give --calib-dir with "
                    f"JPEG or PNG files that are not in the evaluation set")


def _kept_fp32(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.name.startswith(POST_PREFIX) or node.domain == PLUGIN_DOMAIN]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The network in FP16, FP32 at the edges and in the post-processing."""
    from onnxconverter_common import float16  # noqa: PLC0415

    with warnings.catch_warnings():  # one warning per tiny weight flushed to FP16's smallest normal value
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=_kept_fp32(model),
                                                     op_block_list=["NonMaxSuppression", "TopK", "ScatterND",
                                                                    "GatherND", "Range", "ConstantOfShape", "Resize"])
    _outputs_to_fp32(converted)
    return converted


def _outputs_to_fp32(model: onnx.ModelProto) -> None:
    """Graph outputs the converter left FP16 get a Cast back to FP32 (the contract's types)."""
    for output in model.graph.output:
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        inner = f"{output.name}_fp16"
        for node in model.graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
            node.input[:] = [inner if name == output.name else name for name in node.input]
        model.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=onnx.TensorProto.FLOAT,
                                                      name=f"{POST_PREFIX}{output.name}_to_fp32"))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


class _ImageReader:
    """onnxruntime.quantization CalibrationDataReader over preprocessed image batches."""

    def __init__(self, paths: Sequence[Path], input_size: tuple[int, int]):
        self._batches: Iterator = load_batches(list(paths), CALIBRATION_BATCH, input_size)

    def get_next(self) -> dict | None:
        for batch in self._batches:
            tensors = [item.tensor for item in batch if item.tensor is not None]
            if tensors:
                return {INPUT: np.stack(tensors)}
        return None


def calibration_fingerprint(paths: Sequence[Path]) -> str:
    """Identifies a calibration set (names and sizes), for cache keys."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).name}:{Path(path).stat().st_size};".encode())
    return digest.hexdigest()


def quantize_int8(fp32_path: Path, output_path: Path, calibration_images: Sequence[Path],
                  artifact: Artifact) -> None:
    """Write the INT8 Q/DQ variant of ``fp32_path`` calibrated on ``calibration_images`` (atomic), described
    by ``artifact``'s metadata."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    if not calibration_images:
        raise UserError("INT8 needs calibration images; give --calib-dir with JPEG or PNG files that you do not "
                        "evaluate")
    model = onnx.load(str(fp32_path), load_external_data=False)
    if any(node.domain == PLUGIN_DOMAIN for node in model.graph.node):
        raise UserError("INT8 calibration runs the graph in ONNX Runtime, which cannot run the trt-plugins "
                        "flavour's plugin nodes while quantizing; use --flavour portable or core for INT8")
    with atomic_path(output_path) as tmp:
        quantize_static(str(fp32_path), str(tmp), _ImageReader(calibration_images, artifact.spec.input_size),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"], per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Entropy,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})  # TensorRT reads FP32 biases beside Q/DQ weights
        quantized = onnx.load(str(tmp))
        set_onnx_metadata(quantized, artifact)
        onnx.save(quantized, str(tmp))


# --- INT8 for the CPU runtimes -----------------------------------------------------------------------


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept FP32 in the CPU INT8 forms: the heads' last convolutions and the post-processing."""
    return [node.name for node in model.graph.node
            if re.fullmatch(HEAD_PATTERN, node.name) or node.name.startswith(POST_PREFIX)]


def _calibration_tensors(paths: Sequence[Path], input_size: tuple[int, int]) -> list[np.ndarray]:
    """Preprocessed [1, 3, H, W] calibration inputs, each image and its mirror image (few images: twice the data)."""
    tensors = [item.tensor[None] for batch in load_batches(list(paths), CALIBRATION_BATCH, input_size)
               for item in batch if item.tensor is not None]
    if not tensors:
        raise UserError("none of the calibration images could be read; give --calib-dir with JPEG or PNG files")
    return tensors + [np.ascontiguousarray(tensor[..., ::-1]) for tensor in tensors]


def _quantize_qoperator(fp32_path: Path, output: Path, tensors: list[np.ndarray]) -> None:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_static)

    class Reader:
        def __init__(self):
            self.items = iter(tensors)

        def get_next(self):
            return next(({INPUT: tensor} for tensor in self.items), None)

    model = onnx.load(str(fp32_path), load_external_data=False)
    quantize_static(str(fp32_path), str(output), Reader(), quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=["Conv"], per_channel=True, reduce_range=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head_nodes(model))


def _quantize_nncf(fp32_path: Path, output: Path, tensors: list[np.ndarray]) -> None:
    import nncf  # noqa: PLC0415

    model = onnx.load(str(fp32_path), load_external_data=False)
    with contextlib.redirect_stdout(sys.stderr):          # NNCF prints node names; stdout stays the scripts'
        dataset = nncf.Dataset(tensors, lambda tensor: {INPUT: tensor})
        quantized = nncf.quantize(model, dataset, subset_size=len(tensors),
                                  preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=nncf.IgnoredScope(names=head_nodes(model), validate=False))
    onnx.save(quantized, str(output))


_QUANTIZERS = {"onnxruntime-qoperator": _quantize_qoperator, "openvino-nncf": _quantize_nncf}


def int8_path(fp32: Artifact, form: str) -> Path:
    """``<stem without _FP32>_INT8-<form>.onnx`` beside the FP32 file."""
    stem = re.sub(r"_FP32$", "", Path(fp32.path).stem)
    return Path(fp32.path).with_name(f"{stem}_INT8-{form}.onnx")


def int8_key(fp32: Artifact, form: str, images: Sequence[Path]) -> dict:
    """What an INT8 variant depends on: the FP32 file's content, the form, the calibration set and the tool."""
    tool = "nncf" if form == "openvino-nncf" else "onnxruntime"
    from importlib.metadata import version  # noqa: PLC0415

    key = {"quantize_version": QUANTIZE_VERSION, "source": file_fingerprint(fp32.path), "form": form,
           "calibration": calibration_fingerprint(images), "tool": f"{tool} {version(tool)}",
           "labels": {str(k): v for k, v in sorted(fp32.labels.items())}, "spec": fp32.spec.to_dict()}
    return json.loads(json.dumps(key))       # as it reads back from the key file (tuples as lists)


def int8_variant(fp32: Artifact, form: str, images: Sequence[Path]) -> Artifact:
    """The INT8 ``form`` of the FP32 ONNX ``fp32``, calibrated on ``images``: cached beside it (key file
    ``.quantize.json``), quantised again when the FP32 file, the form, the images or the tool changed."""
    if form not in _QUANTIZERS:
        raise UserError(f"unknown INT8 form {form!r}; choose one of {', '.join(_QUANTIZERS)}")
    if fp32.precision != "FP32":
        raise UserError(f"{fp32.path} is {fp32.precision}; INT8 is quantised from an FP32 file")
    if any(node.domain == PLUGIN_DOMAIN for node in onnx.load(str(fp32.path), load_external_data=False).graph.node):
        raise UserError("INT8 calibration cannot run the trt-plugins flavour's plugin nodes; use --flavour core or "
                        "portable for INT8")
    if not images:
        raise UserError("INT8 needs calibration images; give --calib-dir with JPEG or PNG files")
    path, key = int8_path(fp32, form), int8_key(fp32, form, images)
    key_path = path.with_suffix(".quantize.json")
    artifact = replace(fp32, path=path, precision="INT8", quantization=form)
    try:
        record = json.loads(key_path.read_text(encoding="utf-8"))
        if record.get("key") == key and record.get("file") == file_fingerprint(path):
            return read_onnx(path)
    except (OSError, ValueError, AttributeError):
        pass
    log.info("Quantising %s to INT8 (%s) on %d calibration images...", Path(fp32.path).name, form, len(images))
    key_path.unlink(missing_ok=True)
    tensors = _calibration_tensors(images, fp32.spec.input_size)
    with atomic_path(path) as tmp:
        _QUANTIZERS[form](Path(fp32.path), tmp, tensors)
        quantized = onnx.load(str(tmp))
        set_onnx_metadata(quantized, artifact)
        onnx.save(quantized, str(tmp))
    write_text_atomic(key_path, json.dumps({"key": key, "file": file_fingerprint(path)}, indent=1))
    return artifact
