"""The interface every backend implements: a preprocessed batch in, NMS_TRT-style detections out."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from utils.ssd_spec import SsdSpec

DETECTION_FIELDS = ("image_id", "label", "confidence", "xmin", "ymin", "xmax", "ymax")


@dataclass
class Backend(abc.ABC):
    """One way of running an SSD model.

    ``detect`` takes float32 [N, 3, H, W] images in [-1, 1] (utils.preprocess) with
    N <= max_batch_size (a numpy array; a CUDA torch tensor too where ``takes_device_input``) and returns ``detections`` float32 [N, K, 7] (DETECTION_FIELDS, normalised
    coordinates, sorted by confidence) and ``num_detections`` int32 [N].
    """

    name: str            # shown to the user, e.g. "ONNX Runtime"
    precision: str
    max_batch_size: int
    spec: SsdSpec
    device: str          # e.g. "CPU", "CUDA"

    @property
    def takes_device_input(self) -> bool:
        """Whether ``detect`` accepts a batch already on the GPU (utils.gpu_input)."""
        return False

    @abc.abstractmethod
    def detect(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the model on one batch."""

    def settings(self) -> list[str]:
        """The lines the original sample printed about its engine."""
        return [f"{self.name} inference engine settings:",
                f"  * Inference precision - {self.precision}",
                f"  * Max batch size - {self.max_batch_size}",
                f"  * Device - {self.device}"]


def valid_rows(detections: np.ndarray, num_detections: int, threshold: float = 0.0) -> np.ndarray:
    """The real detections of one image with confidence >= threshold, [M, 7]."""
    rows = detections[: int(num_detections)]
    return rows[rows[:, 2] >= threshold]
