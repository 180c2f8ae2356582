"""Box decoding and per-class NMS in numpy: the reference every flavour is held to.

The semantics are those of TF's post-processing and of the ``portable`` ONNX flavour: TF_CENTER
decoding, sigmoid scores, per-class greedy NMS without the background class (boxes scoring above
the threshold, at most top_k kept per class, a box suppressed when its IoU with a kept one exceeds
the threshold), the union sorted by score (ties: lower class, then lower anchor first), boxes
clipped to [0, 1] with zero-area ones dropped, the best keep_top_k kept, in NMS_TRT's 7-tuple form.
"""

from __future__ import annotations

import numpy as np

from utils.ssd_spec import NmsSpec


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).astype(np.float32)


def decode_boxes(encodings: np.ndarray, anchors: np.ndarray,
                 scales: tuple[float, float, float, float]) -> np.ndarray:
    """TF_CENTER decoding: [N, A, 4] (ty, tx, th, tw) against [A, 4] corner anchors -> (ymin, xmin, ymax, xmax)."""
    encodings = encodings.reshape(encodings.shape[0], -1, 4).astype(np.float32)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2:] - anchors[:, :2]
    box_centers = encodings[..., :2] / np.float32(scales[:2]) * sizes + centers
    half = np.exp(encodings[..., 2:] / np.float32(scales[2:])) * sizes / 2
    return np.concatenate([box_centers - half, box_centers + half], axis=-1).astype(np.float32)


def iou_rows(picked: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of each picked (ymin, xmin, ymax, xmax) box [P, 4] with every box [A, 4] -> [P, A].

    Corners are ordered first and a zero union gives 0, as ONNX NonMaxSuppression computes it.
    """
    lo, hi = np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])
    p_lo, p_hi = np.minimum(picked[:, :2], picked[:, 2:]), np.maximum(picked[:, :2], picked[:, 2:])
    height = np.clip(np.minimum(p_hi[:, None, 0], hi[None, :, 0]) - np.maximum(p_lo[:, None, 0], lo[None, :, 0]), 0, None)
    width = np.clip(np.minimum(p_hi[:, None, 1], hi[None, :, 1]) - np.maximum(p_lo[:, None, 1], lo[None, :, 1]), 0, None)
    inter = height * width
    union = (p_hi - p_lo).prod(axis=1)[:, None] + (hi - lo).prod(axis=1)[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms_per_class(boxes: np.ndarray, class_scores: np.ndarray, nms: NmsSpec,
                  max_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS of one image for every class at once.

    boxes [A, 4] are shared by the classes, class_scores is [C, A]. Returns (class rows, anchor
    indices) of the kept boxes. Each class keeps at most top_k boxes; ``max_candidates`` limits the
    boxes considered to its best N before NMS (NMS_TRT's topK; None = all, as TF does).
    """
    classes, anchors = class_scores.shape
    alive = class_scores > nms.score_threshold
    if max_candidates is not None and max_candidates < anchors:
        ranked = np.argsort(-class_scores, axis=1, kind="stable")[:, :max_candidates]
        limited = np.zeros_like(alive)
        np.put_along_axis(limited, ranked, True, axis=1)
        alive &= limited
    suppresses = np.empty((anchors, anchors), bool)   # row i: boxes that box i suppresses, filled on demand
    known = np.zeros(anchors, bool)
    masked = np.where(alive, class_scores, -np.inf)
    kept_rows, kept_anchors = [], []
    everyone = np.arange(classes)
    for _ in range(nms.top_k):
        best = masked.argmax(axis=1)              # first maximum = lowest anchor on ties
        active = alive[everyone, best]
        if not active.any():
            break
        rows, picks = everyone[active], best[active]
        fresh = np.unique(picks[~known[picks]])
        if fresh.size:
            suppresses[fresh] = iou_rows(boxes[fresh], boxes) > nms.iou_threshold
            known[fresh] = True
        kept_rows.append(rows)
        kept_anchors.append(picks)
        alive[rows] &= ~suppresses[picks]
        alive[rows, picks] = False
        masked[rows] = np.where(alive[rows], masked[rows], -np.inf)
    if not kept_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(kept_rows), np.concatenate(kept_anchors)


def multiclass_nms(boxes: np.ndarray, scores: np.ndarray, nms: NmsSpec, max_candidates: int | None = None,
                   clip_before_nms: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decoded boxes [N, A, 4] and sigmoid scores [N, A, C] (class 0 = background) -> NMS_TRT outputs.

    Returns detections float32 [N, keep_top_k, 7] (image_id, label, confidence, xmin, ymin, xmax,
    ymax) and num_detections int32 [N]; unused rows are (image_id, -1, 0, 0, 0, 0, 0).
    The defaults are TF's semantics; NMS_TRT's are ``max_candidates=topK, clip_before_nms=True``
    (it clips while decoding and keeps zero-area boxes).
    """
    count, anchors, classes = scores.shape
    keep = min(nms.keep_top_k, anchors * (classes - 1))
    clipped = np.clip(boxes, 0.0, 1.0)
    has_area = np.prod(clipped[..., 2:] - clipped[..., :2], axis=-1) > 0
    if clip_before_nms:
        boxes, has_area = clipped, np.ones_like(has_area)
    detections = np.zeros((count, keep, 7), np.float32)
    detections[..., 0] = np.arange(count)[:, None]
    detections[..., 1] = -1
    num_detections = np.zeros(count, np.int32)
    for image in range(count):
        labels, indices = nms_per_class(boxes[image], scores[image, :, 1:].T, nms, max_candidates)
        labels = labels + 1
        found = has_area[image, indices]
        labels, indices = labels[found], indices[found]
        if not len(labels):
            continue
        picked_scores = scores[image, indices, labels]
        order = np.lexsort((indices, labels, -picked_scores))[:keep]   # score desc, then class, then anchor
        rows = len(order)
        detections[image, :rows, 1] = labels[order]
        detections[image, :rows, 2] = picked_scores[order]
        detections[image, :rows, 3:] = clipped[image, indices[order]][:, [1, 0, 3, 2]]
        num_detections[image] = rows
    return detections, num_detections
