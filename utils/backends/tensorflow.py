"""TensorFlow backend: the untouched frozen graph (the reference), its outputs put in NMS_TRT's form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from utils import tf_graph
from utils.backends.base import Backend
from utils.converter import read_spec
from utils.errors import UserError
from utils.models import ResolvedModel
from utils.preprocess import to_pixel_values

OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


def to_nms_trt_form(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                    num: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TF OD API outputs -> ([N, K, 7] detections, [N] int32 counts); padding rows as NMS_TRT writes them."""
    count, keep = scores.shape
    valid = np.arange(keep)[None, :] < num[:, None]
    detections = np.zeros((count, keep, 7), np.float32)
    detections[..., 0] = np.arange(count)[:, None]
    detections[..., 1] = np.where(valid, classes, -1)
    detections[..., 2] = np.where(valid, scores, 0)
    detections[..., 3:] = np.where(valid[..., None], boxes[..., [1, 0, 3, 2]], 0)
    return detections, num.astype(np.int32)


@dataclass
class TensorFlowBackend(Backend):
    session: object = None
    float_input: str = "ToFloat"

    @classmethod
    def for_model(cls, model: ResolvedModel, precision: str, max_batch_size: int,
                  log: Callable[[str], None]) -> "TensorFlowBackend":
        if precision != "FP32":
            raise UserError(f"the tensorflow backend runs the frozen graph in FP32 only, not {precision}; use -p FP32")
        log(f"Loading TensorFlow frozen graph from {model.graph_path}")
        graph_def, _, nodes, spec = read_spec(model)
        session = tf_graph.open_session(graph_def)
        return cls(name="TensorFlow", precision=precision, max_batch_size=max_batch_size,
                   spec=spec, device="CPU", session=session, float_input=nodes.float_input)

    def detect(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Fed at the node that casts image_tensor to float: the graph's own resize (to the same size)
        # is then the identity and everything after it runs as exported.
        outputs = self.session.run([f"{name}:0" for name in OUTPUTS],
                                   {f"{self.float_input}:0": to_pixel_values(batch)})
        return to_nms_trt_form(*outputs)
