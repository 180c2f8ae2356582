"""OpenVINO runner: a converted ONNX file (core or portable flavour) on the CPU, in FP32, BF16 or INT8.

OpenVINO reads the ONNX directly. The precision is the file's, or BF16 for an FP32 file run with
OpenVINO's ``INFERENCE_PRECISION_HINT=bf16`` (AVX512-BF16 / AMX); an INT8 file is the NNCF
post-training quantisation of the FP32 one (utils.quantize, form ``openvino-nncf``), its detection
heads left in FP32 (run with the f32 hint, so that what NNCF left in float stays FP32).

The model is compiled for one image per request with the THROUGHPUT performance hint: OpenVINO
makes one stream per core group (2 on a 2-core machine) and a batch is run as that many requests in
flight (ov.AsyncInferQueue). On the 2-core machines this measured faster than batch 8 in one request
with the LATENCY hint (benchmarks/README.md). ``core`` is followed by utils.postprocess's NMS.
"""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov

from utils.artifact import INPUT, Artifact, flavour_info
from utils.errors import UserError
from utils.postprocess import batched_multiclass_nms
from utils.runtime.base import Runner, RuntimeOptions

PRECISION_HINTS = {"FP32": "f32", "BF16": "bf16", "INT8": "f32"}


@functools.cache
def supports_bf16() -> bool:
    """The CPU has native BF16 arithmetic (OpenVINO's CPU plugin lists BF16 among its capabilities); asked once
    per process (it loads the CPU plugin)."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str) -> dict[str, str]:
    """The CPU plugin's settings for a precision (FP32 explicitly f32: on BF16 CPUs OpenVINO defaults to bf16)."""
    if precision not in PRECISION_HINTS:
        raise UserError(f"the openvino backend runs FP32, BF16 or INT8 files, not {precision}; use -p FP32, BF16 or "
                        f"INT8")
    return {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}


class OpenVinoRunner(Runner):
    name = "OpenVINO"

    def __init__(self, artifact: Artifact, max_batch_size: int, options: RuntimeOptions = RuntimeOptions()):
        """``artifact``'s ONNX compiled for the CPU, one image per request, requests in parallel streams."""
        if flavour_info(artifact.flavour).plugin_ops:
            raise UserError(f"the openvino backend cannot run the trt-plugins flavour's TensorRT plugin nodes "
                            f"({artifact.path.name}); convert with --flavour core or portable")
        core = ov.Core()
        model = core.read_model(str(artifact.path))
        width, height = artifact.spec.input_size
        model.reshape({INPUT: [1, 3, height, width]})
        self.compiled = core.compile_model(model, "CPU", compile_config(artifact.precision))
        self.requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self.queue.set_callback(self._collect)
        self.outputs: list[np.ndarray] = []
        super().__init__(artifact, max_batch_size, "CPU")
        self.flavour = artifact.flavour
        self.output_names = flavour_info(artifact.flavour).outputs
        self.nms_inside = flavour_info(artifact.flavour).nms_inside

    def _collect(self, request: ov.InferRequest, index: int) -> None:
        for buffer, name in zip(self.outputs, self.output_names):
            buffer[index] = request.get_tensor(name).data[0]
        if self.nms_inside:
            self.outputs[0][index, :, 0] = index        # NMS_TRT's image_id: the image's place in the batch

    def _buffers(self, count: int) -> list[np.ndarray]:
        anchors, classes = self.spec.num_anchors, self.spec.num_classes
        if self.nms_inside:
            return [np.zeros((count, self.spec.max_detections, 7), np.float32), np.zeros(count, np.int32)]
        return [np.zeros((count, anchors, 4), np.float32), np.zeros((count, anchors, classes), np.float32)]

    def run_network(self, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for one batch: one request per image, as many in flight as OpenVINO has streams."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self.outputs = self._buffers(len(batch))
        for index in range(len(batch)):
            self.queue.start_async({INPUT: batch[index:index + 1]}, index)
        self.queue.wait_all()
        return self.outputs

    def detect(self, batch) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.run_network(batch)
        if not self.nms_inside:
            return batched_multiclass_nms(*outputs, self.spec.nms)
        return outputs[0], outputs[1]

    def settings(self) -> list[str]:
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return super().settings() + [f"  * OpenVINO {ov.get_version().split('-')[0]}: {self.requests} streams, "
                                     f"inference precision hint {hint}"]

    def close(self) -> None:
        self.queue.wait_all()
        self.outputs = []

