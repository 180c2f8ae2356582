"""The anchors of an SsdSpec, laid out as TF's anchor generators (and GridAnchor_TRT) compute them.

ssd_anchor_generator: TF's MultipleGridAnchorGenerator (create_ssd_anchors), whose base anchor [1, 1] is scaled
by min(h, w) / h and min(h, w) / w for an input of height h and width w (square anchors stay square in pixels).
multiscale_anchor_generator: TF's MultiscaleGridAnchorGenerator (FPN / RetinaNet): per level l, a grid of stride
2**l pixels whose boxes are anchor_scale * 2**l * 2**(i / scales_per_octave) pixels at each aspect ratio, offset by
half a stride when the input side is a multiple of 2**l, normalised by the input size.
"""

from __future__ import annotations

import numpy as np

from utils.ssd_spec import AnchorSpec, SsdSpec


def anchor_boxes(spec: SsdSpec) -> np.ndarray:
    """All anchors of a model, float32 [A, 4] (ymin, xmin, ymax, xmax), normalised: the one entry point."""
    if spec.anchors.multiscale:
        return multiscale_anchors(spec.anchors, spec.input_size)
    return grid_anchors(spec.anchors, spec.input_size)


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


def _tile(y_centers: np.ndarray, x_centers: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """[H*W*K, 4] corners in TF's tile_anchors order: row, column, box."""
    shape = (len(y_centers), len(x_centers), len(heights))
    cy = np.broadcast_to(y_centers[:, None, None], shape)
    cx = np.broadcast_to(x_centers[None, :, None], shape)
    bh = np.broadcast_to(heights[None, None, :], shape)
    bw = np.broadcast_to(widths[None, None, :], shape)
    return np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], axis=-1).reshape(-1, 4)


def grid_anchors(spec: AnchorSpec, input_size: tuple[int, int] | None = None) -> np.ndarray:
    """ssd_anchor_generator's anchors, float32 [A, 4] as (ymin, xmin, ymax, xmax), normalised (not clipped).

    ``input_size`` (width, height) matters only when it is not square (None: square, as GridAnchor_TRT assumes).
    """
    width, height = input_size or (1, 1)
    base_height, base_width = min(width, height) / height, min(width, height) / width
    layers = []
    for layer, (rows, columns) in enumerate(spec.feature_map_shapes):
        scales, ratios = np.array(layer_box_specs(spec, layer), dtype=np.float64).T
        layers.append(_tile((np.arange(rows) + 0.5) / rows, (np.arange(columns) + 0.5) / columns,
                            scales / np.sqrt(ratios) * base_height, scales * np.sqrt(ratios) * base_width))
    return np.concatenate(layers).astype(np.float32)


def multiscale_anchors(spec: AnchorSpec, input_size: tuple[int, int]) -> np.ndarray:
    """multiscale_anchor_generator's anchors for an input of ``input_size`` (width, height), float32 [A, 4]
    (ymin, xmin, ymax, xmax), normalised (not clipped)."""
    width, height = input_size
    octave = 2.0 ** (np.arange(spec.scales_per_octave) / spec.scales_per_octave)
    ratios = np.repeat(np.asarray(spec.aspect_ratios, np.float64), spec.scales_per_octave)   # ratio-major,
    scales = np.tile(octave, len(spec.aspect_ratios))                                          # scale fastest
    layers = []
    for level, (rows, columns) in zip(range(spec.min_level, spec.max_level + 1), spec.feature_map_shapes):
        stride = 2.0 ** level
        base = spec.anchor_scale * stride
        offset_y = stride / 2 if height % stride == 0 else 0.0
        offset_x = stride / 2 if width % stride == 0 else 0.0
        corners = _tile(np.arange(rows) * stride + offset_y, np.arange(columns) * stride + offset_x,
                        scales / np.sqrt(ratios) * base, scales * np.sqrt(ratios) * base)
        layers.append(corners / np.array([height, width, height, width], np.float64))
    return np.concatenate(layers).astype(np.float32)


def to_center_size(anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ycenter, xcenter) and (height, width) of corner-form anchors, float32 [A, 2] each."""
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    sizes = anchors[:, 2:] - anchors[:, :2]
    return centers.astype(np.float32), sizes.astype(np.float32)
