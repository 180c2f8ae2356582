"""Numpy reference semantics of TensorRT's GridAnchor_TRT, FlattenConcat_TRT and NMS_TRT plugins.

``attrs`` are the plugins' fields under their TensorRT names (see plugin/README.md). Only the
configuration that TF Object Detection API SSD graphs use is implemented; other values raise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from utils.anchors import grid_anchors
from utils.postprocess import TF_CENTER, decode_boxes, multiclass_nms, sigmoid
from utils.ssd_spec import CLIP_AFTER_NMS, AnchorSpec, NmsSpec

NMS_REQUIRED = {"shareLocation": 1, "varianceEncodedInTarget": 0, "backgroundLabelId": 0, "codeType": TF_CENTER,
                "isNormalized": 1}


def anchor_spec(attrs: Mapping) -> AnchorSpec:
    """The AnchorSpec that GridAnchor_TRT's fields describe."""
    sizes = [int(size) for size in attrs["featureMapShapes"]]
    if int(attrs["numLayers"]) != len(sizes):
        raise ValueError(f"numLayers {attrs['numLayers']} but {len(sizes)} featureMapShapes")
    return AnchorSpec(min_scale=float(attrs["minSize"]), max_scale=float(attrs["maxSize"]),
                      aspect_ratios=tuple(float(r) for r in attrs["aspectRatios"]),
                      reduce_boxes_in_lowest_layer=True, interpolated_scale_aspect_ratio=1.0,
                      feature_map_shapes=tuple((size, size) for size in sizes))


def grid_anchor(attrs: Mapping) -> list[np.ndarray]:
    """GridAnchor_TRT: per layer float32 [2, H*W*K*4, 1]: each anchor's (xmin, ymin, xmax, ymax), then variances."""
    spec = anchor_spec(attrs)
    variance = np.asarray(attrs["variance"], np.float32)
    if variance.shape != (4,):
        raise ValueError(f"variance needs 4 values, not {variance.tolist()}")
    counts = [h * w * spec.boxes_per_location(i) for i, (h, w) in enumerate(spec.feature_map_shapes)]
    layers = np.split(grid_anchors(spec)[:, [1, 0, 3, 2]], np.cumsum(counts)[:-1])
    return [np.stack([layer.reshape(-1), np.tile(variance, len(layer))])[..., None] for layer in layers]


def flatten_concat(inputs: Sequence[np.ndarray], axis: int = 1, ignore_batch: int = 0) -> np.ndarray:
    """FlattenConcat_TRT: each input flattened per batch item (memory order), concatenated -> [N, C, 1, 1]."""
    if axis != 1 or ignore_batch:
        raise ValueError(f"FlattenConcat_TRT supports axis=1, ignoreBatch=0 only (got {axis}, {ignore_batch})")
    return np.concatenate([np.reshape(x, (x.shape[0], -1)) for x in inputs], axis=1)[:, :, None, None]


def decode_tf_center(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """NMS_TRT's TF_CENTER decoding: loc (ty, tx, th, tw) per prior -> [N, A, 4] (ymin, xmin, ymax, xmax), unclipped.

    The same decoding as utils.postprocess.decode_boxes, whose box-coder scales are 1 / variance.
    """
    corners, variances = np.asarray(priors, np.float32).reshape(2, -1, 4)    # x-first, variances (x, y, w, h)
    if not (variances == variances[0]).all():
        raise ValueError("NMS_TRT reference expects one variance for every prior (as GridAnchor_TRT writes)")
    scales = tuple(float(1 / v) for v in variances[0][[1, 0, 3, 2]])          # (y, x, h, w)
    return decode_boxes(np.asarray(loc, np.float32), corners[:, [1, 0, 3, 2]], scales)


def nms_trt(loc: np.ndarray, priors: np.ndarray, conf: np.ndarray, attrs: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """NMS_TRT on loc [N, A*4, 1, 1], priors [2, A*4, 1], conf [N, A*C, 1, 1].

    Returns nms_out float32 [N, 1, keepTopK, 7] (image_id, label, confidence, xmin, ymin, xmax, ymax),
    padded with (image_id, -1, 0, 0, 0, 0, 0), and nms_count int32 [N, 1, 1, 1].
    """
    unsupported = {name: attrs[name] for name, value in NMS_REQUIRED.items() if int(attrs[name]) != value}
    if unsupported:
        raise ValueError(f"NMS_TRT reference implements {NMS_REQUIRED} only, not {unsupported}")
    count, keep_top_k = len(loc), int(attrs["keepTopK"])
    scores = np.asarray(conf, np.float32).reshape(count, -1, int(attrs["numClasses"]))
    if int(attrs["confSigmoid"]):
        scores = sigmoid(scores)
    # TensorRT's detectionInference decodes with clipBBox = false, runs NMS on the unclipped boxes and clips
    # only the rows it writes (gatherTopDetections); rows whose clipped box has no area are kept.
    nms = NmsSpec(score_threshold=float(attrs["confidenceThreshold"]), iou_threshold=float(attrs["nmsThreshold"]),
                  top_k=int(attrs["topK"]), keep_top_k=keep_top_k, clip_order=CLIP_AFTER_NMS)
    detections, counts = multiclass_nms(decode_tf_center(loc, priors), scores, nms, max_candidates=nms.top_k,
                                        keep_empty=True)
    nms_out = np.zeros((count, 1, keep_top_k, 7), np.float32)
    nms_out[..., 0] = np.arange(count)[:, None, None]
    nms_out[..., 1] = -1
    nms_out[:, 0, :detections.shape[1]] = detections
    return nms_out, counts.astype(np.int32).reshape(count, 1, 1, 1)
