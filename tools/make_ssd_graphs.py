#!/usr/bin/env python3
"""Seeded random-weight frozen graphs of TF Object Detection API SSD variants (for tests; never committed).

Real pretrained graphs of these topologies cannot be downloaded here, so this writes frozen GraphDefs op
by op with TensorFlow's v1 graph API, with the node names and namespaces of the Object Detection API's
TF1 exports (as ../shared/models/make_inception_v2_random.py does for SSD InceptionV2):

  image_tensor -> ToFloat -> Preprocessor/map/while/ResizeImage (stack [H, W], legacy bilinear) ->
  Preprocessor/mul, sub -> FeatureExtractor/MobilenetV1/MobilenetV1/Conv2d_*  (+ the variant's extra layers) ->
  box predictor -> concat / concat_1 -> Postprocessor (FasterRcnnBoxCoder decode, sigmoid, the OD API's
  per-class NMS in a map over the batch, in the variant's generation: "2017" and "2018" clip each class's boxes
  to the window and drop zero-area ones BEFORE NonMaxSuppressionV2 (2018: the window is a per-image map input,
  SSDMetaArch._compute_clip_window); "2019" (tensorflow/models 59f7e80a, 2018-08-07, on; the real pedestrian
  graph) runs NonMaxSuppressionV3 on unclipped boxes and clips the sorted union AFTER it)
  -> detection_boxes / scores / classes / num_detections.
  The anchors are computed in the graph by TF ops as the OD API does (MultipleGridAnchorGenerator or
  MultiscaleGridAnchorGenerator, then Concatenate/concat), so evaluating that node is TensorFlow's answer.

Variants:
  ssd_mobilenet_v1_640x360   ssd_mobilenet_v1 (feature maps Conv2d_11/13_pointwise + 4 extra layers),
                             ssd_anchor_generator (non-square: base anchor scaled by min(h, w)/h, min(h, w)/w),
                             convolutional_box_predictor (BoxPredictor_N/BoxEncodingPredictor, ClassPredictor,
                             kernel 1), fixed_shape_resizer 360 x 640, 3 custom classes + label_map.pbtxt.
  ssd_mobilenet_v1_fpn_640   ssd_mobilenet_v1_fpn (fpn/top_down/projection_N, smoothing_N, bottom_up_Conv2d_14/15,
                             levels 3-7, depth 256), multiscale_anchor_generator (anchor_scale 4, 2 scales per
                             octave, aspect ratios 1, 2, 0.5), weight_shared_convolutional_box_predictor
                             (WeightSharedConvolutionalBoxPredictor[_N]/{Box,Class}PredictionTower/conv2d_0..3,
                             BoxPredictor, ClassPredictor), fixed_shape_resizer 640 x 640, 90 COCO classes.
  ssd_mobilenet_v1_2017_300, ssd_mobilenet_v1_2017_480x300, ssd_mobilenet_v1_2018_400x300
                             as ssd_mobilenet_v1 above at those sizes (90 COCO or the 3 custom classes), with the
                             2017 / 2018 post-processing.

Weights come from numpy's RandomState(seed) in construction order; the graph is serialised
deterministically, so one TensorFlow version writes the same bytes everywhere. Detections are
meaningless (untrained) but deterministic: for conversion, parity and anchors, never for accuracy.

Usage: python tools/make_ssd_graphs.py VARIANT --out FOLDER [--seed N] [--check IMAGE]
(writes FOLDER/frozen_inference_graph.pb, pipeline.config and, with custom classes, label_map.pbtxt)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np

BN_EPS = 0.001
BOX_SCALES = (10.0, 10.0, 5.0, 5.0)
SCORE_THRESH, IOU_THRESH, MAX_PER_CLASS, MAX_TOTAL = 1e-8, 0.6, 100, 100
# MobilenetV1 after Conv2d_0 (3x3, stride 2, 32): (stride, depth) of Conv2d_1 .. Conv2d_13 (depthwise + pointwise)
MOBILENET_V1 = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512), (1, 512), (1, 512), (1, 512),
                (1, 512), (1, 512), (2, 1024), (1, 1024)]


@dataclass(frozen=True)
class Variant:
    height: int
    width: int
    classes: tuple[str, ...] | None      # custom names (written to label_map.pbtxt), or None for 90 COCO slots
    fpn: bool
    seed: int
    class_bias: float                    # mean of the class-logit biases
    class_std: float                     # spread of the class-logit weights (with the bias: a few scores above 0.3)
    generation: str = "2019"             # the OD API post-processing's form: "2017", "2018" (clip before NMS), "2019"

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 90


VARIANTS = {
    "ssd_mobilenet_v1_640x360": Variant(360, 640, ("pallet", "forklift", "hard hat"), fpn=False, seed=360,
                                        class_bias=-3.0, class_std=1.5),
    "ssd_mobilenet_v1_fpn_640": Variant(640, 640, None, fpn=True, seed=640, class_bias=-4.6,
                                        class_std=0.6),
    "ssd_mobilenet_v1_2017_300": Variant(300, 300, None, fpn=False, seed=2017, class_bias=-3.0, class_std=1.0,
                                         generation="2017"),
    "ssd_mobilenet_v1_2017_480x300": Variant(300, 480, ("pallet", "forklift", "hard hat"), fpn=False, seed=2018,
                                             class_bias=-2.0, class_std=1.5, generation="2017"),
    "ssd_mobilenet_v1_2018_400x300": Variant(300, 400, ("pallet", "forklift", "hard hat"), fpn=False, seed=2019,
                                             class_bias=-2.0, class_std=1.5, generation="2018"),
}
SSD_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)
FPN_ASPECT_RATIOS = (1.0, 2.0, 0.5)
CLIP_BEFORE_NMS = ("2017", "2018")   # generations whose post-processing clips each class's boxes before NMS
MIN_LEVEL, MAX_LEVEL, ANCHOR_SCALE, SCALES_PER_OCTAVE, FPN_DEPTH, TOWER_LAYERS = 3, 7, 4.0, 2, 256, 4


class Weights:
    """Seeded weights, drawn in graph-construction order."""

    def __init__(self, seed: int):
        self.rng = np.random.RandomState(seed)

    def normal(self, shape, std, mean=0.0):
        return (mean + std * np.clip(self.rng.standard_normal(size=shape), -2.0, 2.0)).astype(np.float32)

    def uniform(self, shape, low, high):
        return self.rng.uniform(low, high, size=shape).astype(np.float32)


class Builder:
    """Ops named as slim / the OD API name them, weights as frozen variables (Const + '<name>/read')."""

    def __init__(self, tf, graph, seed: int):
        self.tf, self.raw, self.graph, self.w = tf, tf.raw_ops, graph, Weights(seed)
        self.frozen: dict = {}

    def var(self, name: str, make):
        """A frozen variable, made once (weight sharing reuses it)."""
        if name not in self.frozen:
            with self.graph.name_scope(None), self.graph.control_dependencies(None):
                self.frozen[name] = self.tf.identity(self.tf.constant(make(), name=name), name=name + "/read")
        return self.frozen[name]

    def batch_norm(self, x, depth: int, var_scope: str):
        gamma = self.var(var_scope + "/gamma", lambda: self.w.uniform([depth], 0.8, 1.2))
        beta = self.var(var_scope + "/beta", lambda: self.w.normal([depth], 0.1))
        mean = self.var(var_scope + "/moving_mean", lambda: self.w.normal([depth], 0.1))
        variance = self.var(var_scope + "/moving_variance", lambda: self.w.uniform([depth], 0.7, 1.1))
        return self.raw.FusedBatchNorm(x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=BN_EPS,
                                       is_training=False, name="FusedBatchNorm").y

    def conv(self, x, cin: int, op_scope: str, var_scope: str, depth: int, kernel: int, stride: int = 1, *,
             depthwise: bool = False, batch_norm: str | None = "BatchNorm", relu: bool = True, std: float | None = None,
             bias_mean: float = 0.0):
        """slim conv2d / separable_conv2d(num_outputs=None) [+ BatchNorm] [+ Relu6], or + biases without batch norm.
        ``batch_norm`` is the BN scope below op_scope / var_scope (feature_N for the weight-shared towers)."""
        raw, w = self.raw, self.w
        strides = [1, stride, stride, 1]
        with self.graph.name_scope(op_scope + "/"):
            if depthwise:
                kernel_value = self.var(var_scope + "/depthwise_weights",
                                        lambda: w.normal([kernel, kernel, cin, 1], np.sqrt(2.0 / (kernel * kernel))))
                y = raw.DepthwiseConv2dNative(input=x, filter=kernel_value, strides=strides, padding="SAME",
                                              name="depthwise")
            else:
                scale = std if std is not None else np.sqrt(2.0 / (kernel * kernel * cin))
                kernel_value = self.var(var_scope + "/weights", lambda: w.normal([kernel, kernel, cin, depth], scale))
                y = raw.Conv2D(input=x, filter=kernel_value, strides=strides, padding="SAME", name="Conv2D")
            if batch_norm:
                with self.graph.name_scope(f"{op_scope}/{batch_norm}/"):
                    y = self.batch_norm(y, depth, f"{var_scope}/{batch_norm}")
            else:
                biases = self.var(var_scope + "/biases", lambda: w.normal([depth], 0.1, mean=bias_mean))
                y = raw.BiasAdd(value=y, bias=biases, name="BiasAdd")
            return raw.Relu6(features=y, name="Relu6") if relu else y


# --- feature extractors ------------------------------------------------------------------------------

def mobilenet_v1(b: Builder, image):
    """MobilenetV1 base to Conv2d_13_pointwise: {endpoint: (tensor, depth)}."""
    ops, var = "FeatureExtractor/MobilenetV1/MobilenetV1", "FeatureExtractor/MobilenetV1"
    net = b.conv(image, 3, f"{ops}/Conv2d_0", f"{var}/Conv2d_0", 32, 3, 2)
    depth, endpoints = 32, {}
    for index, (stride, out) in enumerate(MOBILENET_V1, start=1):
        name = f"Conv2d_{index}_depthwise"
        net = b.conv(net, depth, f"{ops}/{name}", f"{var}/{name}", depth, 3, stride, depthwise=True)
        name = f"Conv2d_{index}_pointwise"
        net = b.conv(net, depth, f"{ops}/{name}", f"{var}/{name}", out, 1)
        depth = out
        endpoints[name] = (net, depth)
    return endpoints


def ssd_mobilenet_v1_features(b: Builder, image):
    """ssd_mobilenet_v1: Conv2d_11_pointwise, Conv2d_13_pointwise and 4 extra layers (multi_resolution_feature_maps)."""
    endpoints = mobilenet_v1(b, image)
    maps = [endpoints["Conv2d_11_pointwise"], endpoints["Conv2d_13_pointwise"]]
    net, cin = endpoints["Conv2d_13_pointwise"]
    scope = "FeatureExtractor/MobilenetV1"
    for index, depth in enumerate((512, 256, 256, 128), start=2):
        name = f"Conv2d_13_pointwise_1_Conv2d_{index}_1x1_{depth // 2}"
        net = b.conv(net, cin, f"{scope}/{name}", f"{scope}/{name}", depth // 2, 1)
        name = f"Conv2d_13_pointwise_2_Conv2d_{index}_3x3_s2_{depth}"
        net = b.conv(net, depth // 2, f"{scope}/{name}", f"{scope}/{name}", depth, 3, 2)
        cin = depth
        maps.append((net, depth))
    return maps


def nearest_neighbor_upsampling(tf, x):
    """ops.nearest_neighbor_upsampling(scale=2): stacks and a reshape (no resize op)."""
    with tf.name_scope("nearest_neighbor_upsampling"):
        _, height, width, channels = x.shape.as_list()
        batch = tf.shape(x)[0]
        x = tf.stack([x] * 2, axis=3)
        x = tf.stack([x] * 2, axis=2)
        return tf.reshape(x, [batch, height * 2, width * 2, channels])


def ssd_mobilenet_v1_fpn_features(b: Builder, image):
    """ssd_mobilenet_v1_fpn: top-down FPN on Conv2d_5/11/13_pointwise (levels 3-5), bottom_up_Conv2d_14/15 (6-7)."""
    tf = b.tf
    endpoints = mobilenet_v1(b, image)
    blocks = [endpoints[name] for name in ("Conv2d_5_pointwise", "Conv2d_11_pointwise", "Conv2d_13_pointwise")]
    fpn_ops, fpn_var = "FeatureExtractor/MobilenetV1/fpn/top_down", "FeatureExtractor/MobilenetV1/fpn"
    top_down = b.conv(blocks[-1][0], blocks[-1][1], f"{fpn_ops}/projection_3", f"{fpn_var}/projection_3",
                      FPN_DEPTH, 1, batch_norm=None, relu=False)
    outputs = [top_down]
    for level in (1, 0):
        with b.graph.name_scope(fpn_ops + "/"):
            top_down = nearest_neighbor_upsampling(tf, top_down)
        residual = b.conv(blocks[level][0], blocks[level][1], f"{fpn_ops}/projection_{level + 1}",
                          f"{fpn_var}/projection_{level + 1}", FPN_DEPTH, 1, batch_norm=None, relu=False)
        with b.graph.name_scope(fpn_ops + "/"):
            top_down = tf.add(top_down, residual, name="add")
        outputs.append(b.conv(top_down, FPN_DEPTH, f"{fpn_ops}/smoothing_{level + 1}",
                              f"{fpn_var}/smoothing_{level + 1}", FPN_DEPTH, 3))
    maps = [(fm, FPN_DEPTH) for fm in reversed(outputs)]
    net = outputs[0]                                   # top_down_Conv2d_13_pointwise (the level-5 map)
    for index in (14, 15):
        name = f"FeatureExtractor/MobilenetV1/fpn/bottom_up_Conv2d_{index}"
        net = b.conv(net, FPN_DEPTH, name, name, FPN_DEPTH, 3, 2)
        maps.append((net, FPN_DEPTH))
    return maps


# --- anchors (in-graph, as the OD API computes them) ----------------------------------------------------

def meshgrid(tf, x, y):
    """ops.meshgrid: xgrid, ygrid of shape y.shape + x.shape."""
    with tf.name_scope("Meshgrid"):
        x, y = tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.float32)
        x_shape = tf.concat([tf.ones([len(y.shape)], tf.int32), tf.shape(x)], 0)
        y_shape = tf.concat([tf.shape(y), tf.ones([len(x.shape)], tf.int32)], 0)
        xgrid = tf.tile(tf.reshape(x, x_shape), y_shape)
        ygrid = tf.tile(tf.reshape(y, y_shape), x_shape)
        shape = y.shape.concatenate(x.shape)
        xgrid.set_shape(shape)
        ygrid.set_shape(shape)
        return xgrid, ygrid


def tile_anchors(tf, grid_height, grid_width, scales, aspect_ratios, base_anchor_size, stride, offset):
    """grid_anchor_generator.tile_anchors: [H*W*K, 4] corners, row-major, box fastest."""
    ratio_sqrts = tf.sqrt(aspect_ratios)
    heights = scales / ratio_sqrts * base_anchor_size[0]
    widths = scales * ratio_sqrts * base_anchor_size[1]
    y_centers = tf.cast(tf.range(grid_height), tf.float32) * stride[0] + offset[0]
    x_centers = tf.cast(tf.range(grid_width), tf.float32) * stride[1] + offset[1]
    x_centers, y_centers = meshgrid(tf, x_centers, y_centers)
    widths_grid, x_centers_grid = meshgrid(tf, widths, x_centers)
    heights_grid, y_centers_grid = meshgrid(tf, heights, y_centers)
    centers = tf.reshape(tf.stack([y_centers_grid, x_centers_grid], axis=3), [-1, 2])
    sizes = tf.reshape(tf.stack([heights_grid, widths_grid], axis=3), [-1, 2])
    return tf.concat([centers - 0.5 * sizes, centers + 0.5 * sizes], 1)


def ssd_box_specs(num_layers: int, min_scale=0.2, max_scale=0.95):
    """create_ssd_anchors' (scale, aspect ratio) lists (reduced lowest layer, interpolated scale last)."""
    scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
    specs = [[(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]]
    for layer in range(1, num_layers):
        specs.append([(scales[layer], ratio) for ratio in SSD_ASPECT_RATIOS]
                     + [(float(np.sqrt(scales[layer] * scales[layer + 1])), 1.0)])
    return specs


def multiple_grid_anchors(tf, shapes, box_specs, im_height: int, im_width: int):
    """MultipleGridAnchorGenerator._generate with base_anchor_size [1, 1] scaled for a non-square image."""
    with tf.name_scope("MultipleGridAnchorGenerator"):
        height, width = tf.cast(im_height, tf.float32), tf.cast(im_width, tf.float32)
        strides = [(1.0 / tf.cast(h, tf.float32), 1.0 / tf.cast(w, tf.float32)) for h, w in shapes]
        offsets = [(0.5 * sy, 0.5 * sx) for sy, sx in strides]
        min_im_shape = tf.minimum(height, width)
        base = [min_im_shape / height * tf.constant(1.0), min_im_shape / width * tf.constant(1.0)]
        grids = []
        for (h, w), specs, stride, offset in zip(shapes, box_specs, strides, offsets):
            scales, ratios = zip(*specs)
            grids.append(tile_anchors(tf, h, w, tf.constant(scales, tf.float32), tf.constant(ratios, tf.float32),
                                      base, stride, offset))
        return grids


def multiscale_grid_anchors(tf, shapes, im_height: int, im_width: int):
    """MultiscaleGridAnchorGenerator._generate: one GridAnchorGenerator per level, normalised coordinates."""
    grids = []
    with tf.name_scope("MultiscaleGridAnchorGenerator"):
        for level, (h, w) in zip(range(MIN_LEVEL, MAX_LEVEL + 1), shapes):
            stride = 2 ** level
            offset = [stride / 2.0 if im_height % 2.0 ** level == 0 else 0.0,
                      stride / 2.0 if im_width % 2.0 ** level == 0 else 0.0]
            with tf.name_scope("GridAnchorGenerator"):
                scales = [2 ** (float(scale) / SCALES_PER_OCTAVE) for scale in range(SCALES_PER_OCTAVE)]
                scales_grid, ratios_grid = meshgrid(tf, scales, list(FPN_ASPECT_RATIOS))
                corners = tile_anchors(tf, h, w, tf.reshape(scales_grid, [-1]), tf.reshape(ratios_grid, [-1]),
                                       tf.constant([stride * ANCHOR_SCALE] * 2, tf.float32),
                                       tf.constant([stride] * 2, tf.float32), tf.constant(offset, tf.float32))
            with tf.name_scope("ToNormalizedCoordinates"), tf.name_scope("Scale"):
                y_scale = tf.cast(1 / tf.cast(im_height, tf.float32), tf.float32)
                x_scale = tf.cast(1 / tf.cast(im_width, tf.float32), tf.float32)
                y_min, x_min, y_max, x_max = tf.split(corners, 4, axis=1)
                grids.append(tf.concat([y_scale * y_min, x_scale * x_min, y_scale * y_max, x_scale * x_max], 1))
    return grids


# --- box predictors ---------------------------------------------------------------------------------------

def convolutional_box_predictor(b: Builder, maps, boxes_per_layer, num_class_slots, class_bias, class_std):
    """BoxPredictor_N/{BoxEncodingPredictor,ClassPredictor} (kernel 1, as ssd_mobilenet_v1_coco), reshaped."""
    tf, boxes, classes = b.tf, [], []
    for index, ((fm, depth), count) in enumerate(zip(maps, boxes_per_layer)):
        scope = f"BoxPredictor_{index}"
        box = b.conv(fm, depth, f"{scope}/BoxEncodingPredictor", f"{scope}/BoxEncodingPredictor", count * 4, 1,
                     batch_norm=None, relu=False, std=0.5 / np.sqrt(depth))
        logits = b.conv(fm, depth, f"{scope}/ClassPredictor", f"{scope}/ClassPredictor", count * num_class_slots, 1,
                        batch_norm=None, relu=False, std=class_std / np.sqrt(depth), bias_mean=class_bias)
        with b.graph.name_scope(scope + "/"):
            batch = tf.shape(fm)[0]
            boxes.append(tf.reshape(box, tf.stack([batch, -1, 1, 4]), name="Reshape"))
            classes.append(tf.reshape(logits, tf.stack([batch, -1, num_class_slots]), name="Reshape_1"))
    return boxes, classes


def weight_shared_box_predictor(b: Builder, maps, count, num_class_slots, class_bias, class_std):
    """WeightSharedConvolutionalBoxPredictor[_N]: shared 3x3 towers (batch norm per feature map) and heads."""
    tf, boxes, classes = b.tf, [], []
    shared = "WeightSharedConvolutionalBoxPredictor"
    for index, (fm, depth) in enumerate(maps):
        scope = shared if index == 0 else f"{shared}_{index}"
        heads = []
        for tower, head, size, bias, std in (("BoxPredictionTower", "BoxPredictor", 4, 0.0, 0.3),
                                             ("ClassPredictionTower", "ClassPredictor", num_class_slots, class_bias,
                                              class_std)):
            net = fm
            for layer in range(TOWER_LAYERS):
                net = b.conv(net, depth, f"{scope}/{tower}/conv2d_{layer}", f"{shared}/{tower}/conv2d_{layer}",
                             FPN_DEPTH, 3, batch_norm=f"BatchNorm/feature_{index}")
            heads.append(b.conv(net, FPN_DEPTH, f"{scope}/{head}", f"{shared}/{head}", count * size, 3,
                                batch_norm=None, relu=False, std=std / np.sqrt(9.0 * FPN_DEPTH), bias_mean=bias))
        with b.graph.name_scope(scope + "/"):
            batch = tf.shape(fm)[0]
            boxes.append(tf.reshape(heads[0], tf.stack([batch, -1, 4]), name="Reshape"))
            classes.append(tf.reshape(heads[1], tf.stack([batch, -1, num_class_slots]), name="Reshape_1"))
    return boxes, classes


# --- post-processing (the OD API's FasterRcnnBoxCoder and batch_multiclass_non_max_suppression) ------------

def postprocess(tf, box_encodings, class_predictions, anchors, num_anchors: int, num_classes: int,
                height: int, width: int, generation: str = "2019"):
    tf1, raw = tf.compat.v1, tf.raw_ops

    def decode(codes, boxes):
        with tf.name_scope("Decode"):
            with tf.name_scope("get_center_coordinates_and_sizes"):
                ymin, xmin, ymax, xmax = tf.unstack(tf.transpose(boxes))
                wa, ha = xmax - xmin, ymax - ymin
                yca, xca = ymin + ha / 2.0, xmin + wa / 2.0
            ty, tx, th, tw = tf.unstack(tf.transpose(codes))
            ty, tx, th, tw = ty / BOX_SCALES[0], tx / BOX_SCALES[1], th / BOX_SCALES[2], tw / BOX_SCALES[3]
            w, h = tf.exp(tw) * wa, tf.exp(th) * ha
            yc, xc = ty * ha + yca, tx * wa + xca
            return tf.transpose(tf.stack([yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0]))

    def gather(fields, index):
        with tf.name_scope("Gather"):
            return {key: tf.gather(value, index) for key, value in fields.items()}

    def clip_to_window(fields, window):
        """box_list_ops.clip_to_window(window, filter_nonoverlapping=True): corners clipped to the window
        (ymin, xmin, ymax, xmax), boxes with no area dropped."""
        with tf.name_scope("ClipToWindow"):
            y0, x0, y1, x1 = tf.split(fields["boxes"], 4, axis=1)
            win_y0, win_x0, win_y1, win_x1 = tf.unstack(window)
            y0, y1 = (tf.maximum(tf.minimum(v, win_y1), win_y0) for v in (y0, y1))
            x0, x1 = (tf.maximum(tf.minimum(v, win_x1), win_x0) for v in (x0, x1))
            fields = {**fields, "boxes": tf.concat([y0, x0, y1, x1], 1)}
            with tf.name_scope("Area"):
                area = tf.squeeze((y1 - y0) * (x1 - x0), [1])
            return gather(fields, tf.cast(tf.reshape(tf.where(area > 0.0), [-1]), tf.int32))

    def multiclass_nms(boxes, scores, window):
        """post_processing.multiclass_non_max_suppression of the variant's generation.

        2017 and 2018 (before tensorflow/models 59f7e80a, 2018-08-07; ssd_inception_v2_coco_2017_11_17, the
        *_2018_01_28 zoo SSDs): per class the boxes above the score threshold, clipped to the window with the
        zero-area ones dropped, NonMaxSuppressionV2 on the clipped boxes; the union sorted by score, the best
        max_total_size kept. 2019 (59f7e80a on; the real pedestrian graph): NonMaxSuppressionV3 per class on the
        unclipped boxes, the union sorted by score, then clipped with zero-area boxes dropped, then the best
        max_total_size."""
        with tf.name_scope("MultiClassNonMaxSuppression"):
            selected = []
            for class_index in range(num_classes):
                fields = {"boxes": boxes, "scores": tf.reshape(scores[:, class_index], [-1])}
                if generation in CLIP_BEFORE_NMS:
                    with tf.name_scope("FilterGreaterThan"):
                        fields = gather(fields, tf.cast(tf.reshape(tf.where(fields["scores"] > SCORE_THRESH), [-1]),
                                                        tf.int32))
                    fields = clip_to_window(fields, window)
                    keep = raw.NonMaxSuppressionV2(
                        boxes=fields["boxes"], scores=fields["scores"],
                        max_output_size=tf.minimum(MAX_PER_CLASS, tf.shape(fields["boxes"])[0]),
                        iou_threshold=tf.constant(IOU_THRESH, tf.float32),
                        name="non_max_suppression/NonMaxSuppressionV2")
                else:
                    keep = raw.NonMaxSuppressionV3(boxes=fields["boxes"], scores=fields["scores"],
                                                   max_output_size=tf.minimum(MAX_PER_CLASS, tf.shape(boxes)[0]),
                                                   iou_threshold=tf.constant(IOU_THRESH, tf.float32),
                                                   score_threshold=tf.constant(SCORE_THRESH, tf.float32),
                                                   name="non_max_suppression/NonMaxSuppressionV3")
                fields = gather(fields, keep)
                fields["classes"] = tf.zeros_like(fields["scores"]) + float(class_index)
                selected.append(fields)
            with tf.name_scope("Concatenate"):
                merged = {key: tf.concat([s[key] for s in selected], 0) for key in ("boxes", "scores", "classes")}
            with tf.name_scope("SortByField"):
                _, order = tf.nn.top_k(merged["scores"], tf.shape(merged["boxes"])[0], sorted=True)
                merged = gather(merged, order)
            if generation not in CLIP_BEFORE_NMS:
                merged = clip_to_window(merged, window)
            total = tf.minimum(MAX_TOTAL, tf.shape(merged["boxes"])[0])
            return gather(merged, tf.range(total)), total

    def pad_or_clip(t, length):
        rank = len(t.shape)
        size = tf.shape(t)[0]
        t = tf.slice(t, [0] * rank, tf.stack([tf.minimum(size, length)] + [-1] * (rank - 1)))
        padding = tf.stack([tf.maximum(length - size, 0)] + [0] * (rank - 1))
        t = tf.pad(t, tf.stack([tf.zeros([rank], tf.int32), padding],
                               axis=1))
        t.set_shape([length] + t.shape.as_list()[1:])
        return t

    def one_image(args):
        if generation == "2018":       # the window of each image, a map_fn input
            boxes, scores, window = args
        else:                          # the constant window [0, 0, 1, 1]
            (boxes, scores), window = args, tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32)
        merged, total = multiclass_nms(boxes, scores, window)
        with tf.name_scope("PadOrClipBoxList"):
            return (pad_or_clip(merged["boxes"], MAX_TOTAL), pad_or_clip(merged["scores"], MAX_TOTAL),
                    pad_or_clip(merged["classes"], MAX_TOTAL), total)

    with tf.name_scope("Postprocessor"):
        batch = tf.shape(box_encodings)[0]
        tiled = tf.reshape(tf.tile(tf.expand_dims(anchors, 0), tf.stack([batch, 1, 1])), [-1, 4])
        decoded = decode(tf.reshape(box_encodings, [-1, 4]), tiled)
        decoded = tf.reshape(decoded, tf.stack([batch, num_anchors, 4]))
        scores = tf.sigmoid(tf.slice(class_predictions, [0, 0, 1], [-1, -1, -1]))
        elements = (decoded, scores)
        if generation == "2018":
            # SSDMetaArch._compute_clip_window: [0, 0, true height / height, true width / width] per image, from
            # true_image_shapes (a fixed_shape_resizer's: the network's own size, so [0, 0, 1, 1])
            shapes = tf.cast(tf.tile(tf.constant([[height, width, 3]], tf.int32), tf.stack([batch, 1])), tf.float32,
                             name="ToFloat_1")
            true_height, true_width, _ = tf.unstack(shapes, axis=1)
            elements += (tf.stack([tf.zeros_like(true_height), tf.zeros_like(true_width), true_height / height,
                                   true_width / width], axis=1),)
        with tf.name_scope("BatchMultiClassNonMaxSuppression"):
            boxes, scores, classes, count = tf1.map_fn(one_image, elems=elements,
                                                       dtype=(tf.float32, tf.float32, tf.float32, tf.int32),
                                                       parallel_iterations=32)
        count = tf.cast(count, tf.float32, name="ToFloat")
    tf.identity(boxes, name="detection_boxes")
    tf.identity(scores, name="detection_scores")
    tf.identity(classes + 1, name="detection_classes")
    tf.identity(count, name="num_detections")


# --- the whole graph -----------------------------------------------------------------------------------

def build(variant: Variant, seed: int | None = None):
    """The frozen GraphDef of ``variant``."""
    import tensorflow as tf  # noqa: PLC0415

    tf1 = tf.compat.v1
    tf1.disable_control_flow_v2()          # TF1-style while loops, as the TF1 exports have
    graph = tf.Graph()
    b = Builder(tf, graph, variant.seed if seed is None else seed)
    height, width, slots = variant.height, variant.width, variant.num_classes + 1
    with graph.as_default():
        image_tensor = tf1.placeholder(tf.uint8, shape=(None, None, None, 3), name="image_tensor")
        inputs = tf.cast(image_tensor, tf.float32, name="ToFloat")

        def resize(image):
            with tf.name_scope("ResizeImage"):
                size = tf.stack([height, width])
                with tf.name_scope("resize_images"):
                    x = b.raw.ResizeBilinear(images=tf.expand_dims(image, 0), size=size, align_corners=False,
                                             half_pixel_centers=False, name="ResizeBilinear")
                    return tf.squeeze(x, axis=[0])

        with tf.name_scope("Preprocessor"):
            resized = tf1.map_fn(resize, elems=inputs, dtype=tf.float32)
            resized.set_shape([None, height, width, 3])
            preprocessed = (2.0 / 255.0) * resized - 1.0

        maps = (ssd_mobilenet_v1_fpn_features if variant.fpn else ssd_mobilenet_v1_features)(b, preprocessed)
        shapes = [tuple(fm.shape.as_list()[1:3]) for fm, _ in maps]
        if variant.fpn:
            grids = multiscale_grid_anchors(tf, shapes, height, width)
            per_location = [len(FPN_ASPECT_RATIOS) * SCALES_PER_OCTAVE] * len(shapes)
            boxes, classes = weight_shared_box_predictor(b, maps, per_location[0], slots, variant.class_bias,
                                                         variant.class_std)
        else:
            box_specs = ssd_box_specs(len(shapes))
            grids = multiple_grid_anchors(tf, shapes, box_specs, height, width)
            per_location = [len(specs) for specs in box_specs]
            boxes, classes = convolutional_box_predictor(b, maps, per_location, slots, variant.class_bias,
                                                         variant.class_std)
        with tf.name_scope("Concatenate"):
            anchors = tf.concat(grids, 0)
        num_anchors = sum(h * w * k for (h, w), k in zip(shapes, per_location))
        box_encodings = tf.concat(boxes, 1)          # 'concat'
        class_predictions = tf.concat(classes, 1)    # 'concat_1'
        assert (box_encodings.op.name, class_predictions.op.name, anchors.op.name) == (
            "concat", "concat_1", "Concatenate/concat")
        if not variant.fpn:
            box_encodings = tf.squeeze(box_encodings, axis=2)
        postprocess(tf, box_encodings, class_predictions, anchors, num_anchors, variant.num_classes, height, width,
                    variant.generation)
    outputs = ["detection_boxes", "detection_scores", "detection_classes", "num_detections"]
    return tf1.graph_util.extract_sub_graph(graph.as_graph_def(), outputs)


# --- the files beside the graph ----------------------------------------------------------------------------

def pipeline_config(variant: Variant) -> str:
    """The pipeline.config (inference-relevant parts) of what ``build`` writes."""
    if variant.fpn:
        anchor = ("    anchor_generator {\n      multiscale_anchor_generator {\n"
                  f"        min_level: {MIN_LEVEL}\n        max_level: {MAX_LEVEL}\n"
                  f"        anchor_scale: {ANCHOR_SCALE}\n"
                  + "".join(f"        aspect_ratios: {r}\n" for r in FPN_ASPECT_RATIOS)
                  + f"        scales_per_octave: {SCALES_PER_OCTAVE}\n      }}\n    }}\n")
        predictor = ("    box_predictor {\n      weight_shared_convolutional_box_predictor {\n"
                     f"        depth: {FPN_DEPTH}\n        num_layers_before_predictor: {TOWER_LAYERS}\n"
                     f"        kernel_size: 3\n        class_prediction_bias_init: {variant.class_bias}\n"
                     "      }\n    }\n")
        extractor = ("    feature_extractor {\n      type: 'ssd_mobilenet_v1_fpn'\n"
                     f"      fpn {{ min_level: {MIN_LEVEL} max_level: {MAX_LEVEL} }}\n"
                     "      depth_multiplier: 1.0\n      min_depth: 16\n    }\n")
    else:
        anchor = ("    anchor_generator {\n      ssd_anchor_generator {\n        num_layers: 6\n"
                  "        min_scale: 0.2\n        max_scale: 0.95\n"
                  + "".join(f"        aspect_ratios: {r}\n" for r in SSD_ASPECT_RATIOS)
                  + "      }\n    }\n")
        predictor = ("    box_predictor {\n      convolutional_box_predictor {\n        kernel_size: 1\n"
                     "        box_code_size: 4\n        use_dropout: false\n      }\n    }\n")
        extractor = ("    feature_extractor {\n      type: 'ssd_mobilenet_v1'\n      depth_multiplier: 1.0\n"
                     "      min_depth: 16\n    }\n")
    label_map = ('train_input_reader {\n  label_map_path: "PATH_TO_BE_CONFIGURED/label_map.pbtxt"\n}\n'
                 if variant.classes else "")
    return ("# Written by tools/make_ssd_graphs.py for its random-weight graph (inference-relevant parts).\n"
            f"model {{\n  ssd {{\n    num_classes: {variant.num_classes}\n"
            f"    image_resizer {{\n      fixed_shape_resizer {{\n        height: {variant.height}\n"
            f"        width: {variant.width}\n      }}\n    }}\n"
            + extractor
            + "    box_coder {\n      faster_rcnn_box_coder {\n        y_scale: 10.0\n        x_scale: 10.0\n"
              "        height_scale: 5.0\n        width_scale: 5.0\n      }\n    }\n"
            + predictor + anchor
            + "    post_processing {\n      batch_non_max_suppression {\n"
              f"        score_threshold: {SCORE_THRESH}\n        iou_threshold: {IOU_THRESH}\n"
              f"        max_detections_per_class: {MAX_PER_CLASS}\n        max_total_detections: {MAX_TOTAL}\n"
              "      }\n      score_converter: SIGMOID\n    }\n  }\n}\n" + label_map)


def label_map_text(classes: tuple[str, ...]) -> str:
    return "".join(f"item {{\n  id: {index}\n  name: '{name}'\n  display_name: '{name}'\n}}\n"
                   for index, name in enumerate(classes, start=1))


def _write(path: str, data: bytes) -> None:
    """Write all or nothing (a temporary file renamed into place)."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as out:
        out.write(data)
    os.replace(temporary, path)


def write(name: str, folder: str, seed: int | None = None) -> str:
    """Write the variant's graph, pipeline.config and label map into ``folder``; returns the graph's path."""
    variant = VARIANTS[name]
    os.makedirs(folder, exist_ok=True)
    data = build(variant, seed).SerializeToString(deterministic=True)
    if variant.classes:
        _write(os.path.join(folder, "label_map.pbtxt"), label_map_text(variant.classes).encode())
    _write(os.path.join(folder, "pipeline.config"), pipeline_config(variant).encode())
    graph = os.path.join(folder, "frozen_inference_graph.pb")
    _write(graph, data)                       # last: its presence means the folder is complete
    print(f"wrote {graph}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return graph


def check(graph: str, image_path: str) -> None:
    import tensorflow as tf  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    graph_def = tf.compat.v1.GraphDef()
    with open(graph, "rb") as source:
        graph_def.ParseFromString(source.read())
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=g) as session:
        count, scores, boxes, classes = session.run(
            ["num_detections:0", "detection_scores:0", "detection_boxes:0", "detection_classes:0"],
            {"image_tensor:0": np.asarray(Image.open(image_path).convert("RGB"))[None]})
    print(f"num_detections {count[0]:.0f}")
    for index in range(min(8, int(count[0]))):
        box = np.round(boxes[0, index], 3).tolist()
        print(f"  class {classes[0, index]:.0f} score {scores[0, index]:.4f} box {box}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--out", required=True, help="folder to write the graph, pipeline.config and label map to")
    parser.add_argument("--seed", type=int, help="weights' seed (default: the variant's)")
    parser.add_argument("--check", metavar="IMAGE", help="run the written graph once on IMAGE")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    graph = write(args.variant, args.out, args.seed)
    if args.check:
        check(graph, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
