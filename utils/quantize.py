"""FP16 and INT8 (Q/DQ) variants of a converted FP32 ONNX, for strongly typed TensorRT and ONNX Runtime.

FP16: onnxconverter-common's float16 converter on the network; inputs/outputs and the
post-processing (decoding, NMS, plugin nodes) stay FP32. INT8: ONNX Runtime's static quantization
in the Q/DQ format TensorRT reads (symmetric, per-channel weights), calibrated on real images through
the project's one preprocessing function; only convolutions are quantized.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from utils.errors import UserError
from utils.files import atomic_path
from utils.artifact import INPUT, Artifact, set_onnx_metadata
from utils.onnx_export import PLUGIN_DOMAIN, POST_PREFIX
from utils.pipeline import load_batches

CALIBRATION_BATCH = 8
CALIBRATION_IMAGES = 64
REPO_IMAGES = Path(__file__).resolve().parents[1] / "images"


def calibration_images(folder: Path | None = None, count: int = CALIBRATION_IMAGES) -> list[Path]:
    """The first ``count`` JPEGs of ``folder`` if given, else of $VOC_DIR/JPEGImages, else of images/."""
    import os  # noqa: PLC0415

    voc = os.environ.get("VOC_DIR")
    candidates = [folder] if folder is not None else [Path(voc) / "JPEGImages" if voc else None, REPO_IMAGES]
    for candidate in candidates:
        if candidate is not None and Path(candidate).is_dir():
            found = sorted(p for p in Path(candidate).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
            if found:
                return found[:count]
    raise UserError(f"no calibration images (*.jpg) in {folder or REPO_IMAGES}; give --calib-dir with JPEG files")


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
        raise UserError("INT8 needs calibration images; give --calib-dir with JPEG files (e.g. a VOC JPEGImages folder)")
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
