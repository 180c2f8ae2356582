"""The interface every runner implements: a preprocessed batch in, NMS_TRT-style detections out.

A runner is opened from one file (utils.artifact.Artifact) and runtime options, only runs, and is a
context manager: ``close`` (buffers, streams, caches) is always called. Runners import nothing from
conversion, the model registry or engine building.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from utils.artifact import Artifact
from utils.ssd_spec import SsdSpec

DETECTION_FIELDS = ("image_id", "label", "confidence", "xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a file, as the command line says it (resolved by utils.plan)."""

    cuda_graph: bool = False                 # ONNX Runtime CUDA: capture a CUDA graph (batches padded)
    nhwc: bool = False                       # ONNX Runtime CUDA: prefer_nhwc
    use_cuda: bool = True                    # ONNX Runtime: the CUDA provider when installed
    trt_module: str | None = None            # tensorrt | tensorrt_rtx
    compute_capability: str | None = None    # TensorRT-RTX engines: SM86, ... (None: the GPU present)


class Runner(abc.ABC):
    """One opened model. ``detect`` takes float32 [N, 3, H, W] images in [-1, 1] (utils.preprocess)
    with N <= max_batch_size (a numpy array; a CUDA torch tensor too where ``takes_device_input``) and
    returns ``detections`` float32 [N, K, 7] (DETECTION_FIELDS, normalised coordinates, sorted by
    confidence) and ``num_detections`` int32 [N]."""

    name = "runner"          # shown to the user, e.g. "ONNX Runtime"

    def __init__(self, artifact: Artifact, max_batch_size: int, device: str):
        self.artifact = artifact
        self.max_batch_size = max_batch_size
        self.device = device          # e.g. "CPU", "CUDA", a GPU's name

    @property
    def spec(self) -> SsdSpec:
        return self.artifact.spec

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def takes_device_input(self) -> bool:
        """Whether ``detect`` accepts a batch already on the GPU (utils.gpu_input)."""
        return False

    @abc.abstractmethod
    def detect(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on one batch."""

    # detect in two steps, for utils.run.detect_batches: launch (the engine) on the calling thread, finish (NMS,
    # copies back) possibly on another, so that finish of batch k overlaps the engine on batch k + 1

    @property
    def max_in_flight(self) -> int:
        """How many batches may be launched and not yet finished; 1: detect_batches runs detect, one batch at a
        time. Above 1, ``finish`` calls come in launch order, one at a time, from one other thread."""
        return 1

    def launch(self, batch):
        """Start one batch; the handle goes to ``finish``. Here: nothing started early."""
        return batch

    def finish(self, handle) -> tuple[np.ndarray, np.ndarray]:
        """``detect``'s result for a launched batch."""
        return self.detect(handle)

    def close(self) -> None:
        """Free what the runner holds and save its caches."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def settings(self) -> list[str]:
        """The lines the original sample printed about its engine."""
        lines = [f"{self.name} inference engine settings:",
                 f"  * Inference precision - {self.precision}",
                 f"  * Max batch size - {self.max_batch_size}",
                 f"  * Device - {self.device}"]
        if self.artifact.flavour:
            lines.append(f"  * ONNX flavour - {self.artifact.flavour}")
        return lines


def valid_rows(detections: np.ndarray, num_detections: int, threshold: float = 0.0) -> np.ndarray:
    """The real detections of one image with confidence >= threshold, [M, 7]."""
    rows = detections[: int(num_detections)]
    return rows[rows[:, 2] >= threshold]
