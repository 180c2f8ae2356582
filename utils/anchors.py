"""Grid anchors from an SsdSpec, laid out as TF's MultipleGridAnchorGenerator and GridAnchor_TRT do."""

from __future__ import annotations

import numpy as np

from utils.ssd_spec import AnchorSpec


def layer_scales(spec: AnchorSpec) -> list[float]:
    """The linearly spaced scale of each layer, plus 1.0 after the last (for the interpolated box)."""
    count = spec.num_layers
    if count == 1:
        return [spec.min_scale, 1.0]
    return [spec.min_scale + (spec.max_scale - spec.min_scale) * i / (count - 1) for i in range(count)] + [1.0]


def layer_box_specs(spec: AnchorSpec, layer: int) -> list[tuple[float, float]]:
    """(scale, aspect ratio) of each box at one feature-map cell, in TF's order."""
    scales = layer_scales(spec)
    scale, next_scale = scales[layer], scales[layer + 1]
    if layer == 0 and spec.reduce_boxes_in_lowest_layer:
        return [(0.1, 1.0), (scale, 2.0), (scale, 0.5)]
    boxes = [(scale, ratio) for ratio in spec.aspect_ratios]
    if spec.interpolated_scale_aspect_ratio > 0:
        boxes.append((float(np.sqrt(scale * next_scale)), spec.interpolated_scale_aspect_ratio))
    return boxes


def grid_anchors(spec: AnchorSpec) -> np.ndarray:
    """All anchors, float32 [A, 4] as (ymin, xmin, ymax, xmax), normalised (not clipped)."""
    layers = []
    for layer, (height, width) in enumerate(spec.feature_map_shapes):
        scales, ratios = np.array(layer_box_specs(spec, layer), dtype=np.float64).T
        box_heights = scales / np.sqrt(ratios)
        box_widths = scales * np.sqrt(ratios)
        y_centers = (np.arange(height) + 0.5) / height
        x_centers = (np.arange(width) + 0.5) / width
        # order: row, column, box — as TF's tile_anchors reshapes its [H, W, K] grids
        cy = np.broadcast_to(y_centers[:, None, None], (height, width, len(scales)))
        cx = np.broadcast_to(x_centers[None, :, None], (height, width, len(scales)))
        bh = np.broadcast_to(box_heights[None, None, :], (height, width, len(scales)))
        bw = np.broadcast_to(box_widths[None, None, :], (height, width, len(scales)))
        layers.append(np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], axis=-1).reshape(-1, 4))
    return np.concatenate(layers).astype(np.float32)


def to_center_size(anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ycenter, xcenter) and (height, width) of corner-form anchors, float32 [A, 2] each."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2:] - anchors[:, :2]
    return centers.astype(np.float32), sizes.astype(np.float32)
