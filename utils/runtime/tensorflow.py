"""TensorFlow runner: the untouched frozen graph (the reference), its outputs put in NMS_TRT's form."""

from __future__ import annotations

import numpy as np

from utils import tf_graph
from utils.artifact import Artifact
from utils.preprocess import to_pixel_values
from utils.runtime.base import Runner, RuntimeOptions

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


class TensorFlowRunner(Runner):
    name = "TensorFlow"

    def __init__(self, artifact: Artifact, max_batch_size: int, options: RuntimeOptions = RuntimeOptions()):
        """A tf.compat.v1 session on the frozen graph ``artifact.path`` (kind "frozen")."""
        graph_def = tf_graph.load_graph_def(artifact.path)
        self.float_input = tf_graph.find_ssd_nodes(graph_def, artifact.path).float_input
        self.session = tf_graph.open_session(graph_def)
        super().__init__(artifact, max_batch_size, "CPU")

    def detect(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Fed at the node that casts image_tensor to float: the graph's own resize (to the same size)
        # is then the identity and everything after it runs as exported.
        outputs = self.session.run([f"{name}:0" for name in OUTPUTS],
                                   {f"{self.float_input}:0": to_pixel_values(batch)})
        return to_nms_trt_form(*outputs)

    def close(self) -> None:
        self.session.close()
