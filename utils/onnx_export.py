"""Frozen SSD graph -> ONNX: tf2onnx on the core network, then one onnx-graphsurgeon step per flavour.

Flavour ``core``: the network, TF_CENTER decoding against constant anchors and sigmoid scores; NMS
runs outside (utils.postprocess). Flavour ``portable``: constant anchors and standard ONNX ops (NonMaxSuppression, TopK, ...), run by
ONNX Runtime and by TensorRT's INMSLayer. It reproduces TF's post-processing: TF_CENTER decoding
with the box-coder scales, sigmoid scores, per-class NMS without background, the union sorted by
score, boxes clipped to [0, 1] (zero-area ones dropped, as TF's ClipToWindow does) before or after the
NMS as the graph does it (SsdSpec.nms.clip_order), the best keepTopK kept. The outputs are those of NMS_TRT:
``detections`` [N, keepTopK, 7] = (image_id, label, confidence, xmin, ymin, xmax, ymax) and
``num_detections`` [N] int32; unused rows hold (image_id, -1, 0, 0, 0, 0, 0) as NMS_TRT's do.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from utils import anchors as anchor_math
from utils import tf_graph
from utils.artifact import BOXES, DETECTIONS, INPUT, NUM_DETECTIONS, SCORES
from utils.errors import UserError
from utils.postprocess import TF_CENTER
from utils.ssd_spec import SsdSpec

OPSET = 17
PLUGIN_DOMAIN = "ai.onnx.contrib"   # the only domain ONNX Runtime custom ops (plugin/) can use
POST_PREFIX = "post_"               # names of the nodes added after the network (kept FP32 in variants)
BOX_ENCODINGS = "box_encodings"
log = logging.getLogger(__name__)
CLASS_LOGITS = "class_logits"


def predictor_outputs(predictor_heads: tuple[tuple[str, str], ...]) -> list[str]:
    """The per-layer box-encoding then class-logit tensors (NHWC) that FlattenConcat_TRT consumes."""
    return [f"{box}:0" for box, _ in predictor_heads] + [f"{logits}:0" for _, logits in predictor_heads]


def convert_core(core_graph_def, spec: SsdSpec, extra_outputs: list[str] = ()):
    """tf2onnx on the core graph: ``Input`` NCHW float -> ``box_encodings``, ``class_logits`` (+ extras)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf2onnx  # noqa: PLC0415  (imports TensorFlow)

    tf2onnx.logging.set_level(tf2onnx.logging.ERROR)
    model_proto, _ = tf2onnx.convert.from_graph_def(
        core_graph_def,
        input_names=[f"{INPUT}:0"],
        output_names=[f"{tf_graph.BOX_CONCAT}:0", f"{tf_graph.CLASS_CONCAT}:0", *extra_outputs],
        opset=OPSET,
        inputs_as_nchw=[f"{INPUT}:0"],
        tensors_to_rename={f"{INPUT}:0": INPUT, f"{tf_graph.BOX_CONCAT}:0": BOX_ENCODINGS,
                           f"{tf_graph.CLASS_CONCAT}:0": CLASS_LOGITS},
    )
    return model_proto


class _Builder:
    """Adds nodes to an onnx-graphsurgeon graph, one call per op, returning the output tensor."""

    def __init__(self, graph):
        import onnx_graphsurgeon as gs  # noqa: PLC0415

        self.gs = gs
        self.graph = graph
        self.count = 0

    def const(self, name: str, value) -> "object":
        return self.gs.Constant(f"{name}_const", np.asarray(value))

    def op(self, op: str, inputs: list, attrs: dict | None = None, name: str | None = None,
           num_outputs: int = 1, dtype=None, shape=None):
        self.count += 1
        base = name or f"{POST_PREFIX}{op.lower()}_{self.count}"
        outputs = [self.gs.Variable(f"{base}_out{i}" if num_outputs > 1 else base, dtype=dtype, shape=shape)
                   for i in range(num_outputs)]
        self.graph.layer(op=op, name=f"{POST_PREFIX}{base}_node" if name else f"{base}_node", inputs=inputs,
                         outputs=outputs, attrs=attrs or {})
        return outputs if num_outputs > 1 else outputs[0]


def _decode_boxes(build: _Builder, box_encodings, spec: SsdSpec):
    """TF_CENTER decoding of [N, A, 4] encodings against constant anchors -> [N, A, 4] corners."""
    centers, sizes = anchor_math.to_center_size(anchor_math.anchor_boxes(spec))
    y_scale, x_scale, h_scale, w_scale = spec.box_coder_scales
    encodings = build.op("Reshape", [box_encodings, build.const("box_shape", np.array([0, -1, 4], np.int64))])
    center_codes, size_codes = build.op("Split", [encodings, build.const("split", np.array([2, 2], np.int64))],
                                        {"axis": 2}, num_outputs=2)
    center_codes = build.op("Div", [center_codes, build.const("center_scale", np.array([y_scale, x_scale], np.float32))])
    size_codes = build.op("Div", [size_codes, build.const("size_scale", np.array([h_scale, w_scale], np.float32))])
    anchor_sizes = build.const("anchor_sizes", sizes)
    box_centers = build.op("Add", [build.op("Mul", [center_codes, anchor_sizes]), build.const("anchor_centers", centers)])
    half_sizes = build.op("Div", [build.op("Mul", [build.op("Exp", [size_codes]), anchor_sizes]),
                                  build.const("two", np.float32(2.0))])
    corners = build.op("Concat", [build.op("Sub", [box_centers, half_sizes]),
                                  build.op("Add", [box_centers, half_sizes])], {"axis": 2})
    return corners  # (ymin, xmin, ymax, xmax)


def _decoded_outputs(model_proto, spec: SsdSpec):
    """Import the core network and add decoding and sigmoid: (graph, builder, boxes [N,A,4], scores [N,A,C])."""
    import onnx_graphsurgeon as gs  # noqa: PLC0415

    graph = gs.import_onnx(model_proto)
    tensors = graph.tensors()
    build = _Builder(graph)
    boxes = _decode_boxes(build, tensors[BOX_ENCODINGS], spec)                       # [N, A, 4]
    scores = build.op("Sigmoid", [tensors[CLASS_LOGITS]])                            # [N, A, C]
    return graph, build, boxes, scores


def _export(graph, outputs: list, spec: SsdSpec):
    import onnx_graphsurgeon as gs  # noqa: PLC0415

    graph.outputs = outputs
    graph.inputs[0].shape = ["N", 3, spec.input_size[1], spec.input_size[0]]
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def add_core_postprocessing(model_proto, spec: SsdSpec, extra_outputs: list[str] = ()):
    """Flavour ``core``: decoded ``boxes`` [N,A,4] (ymin, xmin, ymax, xmax) and sigmoid ``scores`` [N,A,C].

    No NMS inside (utils.postprocess.multiclass_nms follows), so every TensorRT can build it.
    """
    graph, build, boxes, scores = _decoded_outputs(model_proto, spec)
    boxes = build.op("Identity", [boxes], name=BOXES, dtype=np.float32, shape=["N", spec.num_anchors, 4])
    scores = build.op("Identity", [scores], name=SCORES, dtype=np.float32,
                      shape=["N", spec.num_anchors, spec.num_classes])
    return _export(graph, [boxes, scores], spec)


def _window(build: _Builder, boxes, prefix: str):
    """Boxes [N, A, 4] clipped to the window [0, 1] (utils.postprocess.window_boxes in ONNX ops) ->
    (clipped, mins [N, A, 2], maxs [N, A, 2], has_area [N, A] bool: area > 0 once clipped)."""
    clipped = build.op("Clip", [boxes, build.const(f"{prefix}_zero", np.float32(0.0)),
                                build.const(f"{prefix}_one", np.float32(1.0))])
    mins, maxs = build.op("Split", [clipped, build.const(f"{prefix}_corners", np.array([2, 2], np.int64))],
                          {"axis": 2}, num_outputs=2)
    area = build.op("ReduceProd", [build.op("Sub", [maxs, mins])], {"axes": [2], "keepdims": 0})
    return clipped, mins, maxs, build.op("Greater", [area, build.const(f"{prefix}_no_area", np.float32(0.0))])


def add_portable_postprocessing(model_proto, spec: SsdSpec, extra_outputs: list[str] = ()):
    """Attach decoding, sigmoid, per-class NMS and top-k with standard ONNX ops; returns the model."""
    import onnx_graphsurgeon as gs  # noqa: PLC0415

    graph, build, boxes, scores = _decoded_outputs(model_proto, spec)
    num_anchors = spec.num_anchors
    keep_top_k = spec.max_detections
    scores = build.op("Slice", [scores, build.const("bg_start", np.array([1], np.int64)),
                                build.const("bg_end", np.array([spec.num_classes], np.int64)),
                                build.const("bg_axis", np.array([2], np.int64))])    # [N, A, C-1]
    scores = build.op("Transpose", [scores], {"perm": [0, 2, 1]})                   # [N, C-1, A]

    clipped, _, _, has_area = _window(build, boxes, "window")
    has_area = build.op("Unsqueeze", [has_area, build.const("class_axis", np.array([1], np.int64))])  # [N, 1, A]
    nms_boxes, nms_scores = boxes, scores
    if spec.nms.clips_before_nms:    # the 2017 order: NMS on the clipped boxes, zero-area ones left out
        nms_boxes = clipped
        nms_scores = build.op("Where", [has_area, scores, build.const("no_area_score", np.float32(-1.0))])

    selected = build.op("NonMaxSuppression", [
        nms_boxes, nms_scores,
        build.const("max_per_class", np.array([spec.nms.top_k], np.int64)),
        build.const("iou_threshold", np.array([spec.nms.iou_threshold], np.float32)),
        build.const("score_threshold", np.array([spec.nms.score_threshold], np.float32)),
    ], {"center_point_box": 0})                                                      # [K, 3]

    # Dense mask of the selected (image, class, anchor) triples, minus boxes with no area once clipped.
    ones = build.op("ConstantOfShape", [build.op("Slice", [build.op("Shape", [selected]),
                                                           build.const("k_start", np.array([0], np.int64)),
                                                           build.const("k_end", np.array([1], np.int64))])],
                    {"value": gs.Constant("one", np.array([1.0], np.float32))})
    zeros = build.op("ConstantOfShape", [build.op("Shape", [scores])],
                     {"value": gs.Constant("zero_fill", np.array([0.0], np.float32))})
    mask = build.op("ScatterND", [zeros, selected, ones])                            # [N, C-1, A]
    keep = build.op("And", [build.op("Greater", [mask, build.const("half", np.float32(0.5))]), has_area])
    ranked = build.op("Where", [keep, scores, build.const("minus_one", np.float32(-1.0))])
    ranked = build.op("Reshape", [ranked, build.const("flat_shape", np.array([0, -1], np.int64))])

    top_scores, top_index = build.op("TopK", [ranked, build.const("keep_top_k", np.array([keep_top_k], np.int64))],
                                     {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)  # [N, K]
    anchor_count = build.const("anchor_count", np.int64(num_anchors))
    class_index = build.op("Div", [top_index, anchor_count])
    anchor_index = build.op("Mod", [top_index, anchor_count])
    top_boxes = build.op("GatherND", [clipped, build.op("Unsqueeze", [anchor_index, build.const("last", np.array([2], np.int64))])],
                         {"batch_dims": 1})                                          # [N, K, 4] y/x order
    top_boxes = build.op("Gather", [top_boxes, build.const("yx_to_xy", np.array([1, 0, 3, 2], np.int64))], {"axis": 2})

    valid = build.op("Greater", [top_scores, build.const("valid_floor", np.float32(-0.5))])  # [N, K]
    label = build.op("Cast", [build.op("Add", [class_index, build.const("label_offset", np.int64(1))])],
                     {"to": 1})
    label = build.op("Where", [valid, label, build.const("no_label", np.float32(-1.0))])
    confidence = build.op("Where", [valid, top_scores, build.const("no_score", np.float32(0.0))])
    top_boxes = build.op("Where", [build.op("Unsqueeze", [valid, build.const("box_axis", np.array([2], np.int64))]),
                                   top_boxes, build.const("no_box", np.float32(0.0))])
    batch = build.op("Squeeze", [build.op("Slice", [build.op("Shape", [ranked]),
                                                    build.const("n_start", np.array([0], np.int64)),
                                                    build.const("n_end", np.array([1], np.int64))]),
                                 build.const("n_axis", np.array([0], np.int64))])
    image_id = build.op("Range", [build.const("r0", np.int64(0)), batch, build.const("r1", np.int64(1))])
    image_id = build.op("Unsqueeze", [build.op("Cast", [image_id], {"to": 1}),
                                      build.const("id_axis", np.array([1], np.int64))])           # [N, 1]
    image_id = build.op("Expand", [image_id, build.op("Shape", [top_scores])])                  # [N, K]
    fields = [build.op("Unsqueeze", [t, build.const(f"f{i}", np.array([2], np.int64))])
              for i, t in enumerate([image_id, label, confidence])]
    detections = build.op("Concat", fields + [top_boxes], {"axis": 2}, name=DETECTIONS,
                          dtype=np.float32, shape=["N", keep_top_k, 7])
    num_detections = build.op("ReduceSum", [build.op("Cast", [valid], {"to": 6}),
                                            build.const("sum_axis", np.array([1], np.int64))],
                              {"keepdims": 0}, name=NUM_DETECTIONS, dtype=np.int32, shape=["N"])

    return _export(graph, [detections, num_detections], spec)


def grid_anchor_problem(spec: SsdSpec) -> str | None:
    """Why GridAnchor_TRT cannot compute this model's anchors, or None when it can."""
    anchors = spec.anchors
    if anchors.multiscale:
        return "GridAnchor_TRT cannot express multiscale anchors (multiscale_anchor_generator, FPN)"
    if not anchors.reduce_boxes_in_lowest_layer or anchors.interpolated_scale_aspect_ratio != 1.0:
        return "GridAnchor_TRT always reduces the lowest layer and adds one interpolated box of ratio 1"
    if any(h != w for h, w in anchors.feature_map_shapes) or spec.input_size[0] != spec.input_size[1]:
        return (f"GridAnchor_TRT needs a square input and square feature maps, not "
                f"{spec.input_size[0]}x{spec.input_size[1]} and {anchors.feature_map_shapes}")
    return None


def grid_anchor_fields(spec: SsdSpec) -> dict:
    """GridAnchor_TRT's fields for a spec (square feature maps, TF's reduced lowest layer)."""
    problem = grid_anchor_problem(spec)
    if problem:
        raise UserError(f"{problem}; use --flavour portable")
    anchors = spec.anchors
    return {"minSize": float(anchors.min_scale), "maxSize": float(anchors.max_scale),
            "aspectRatios": [float(r) for r in anchors.aspect_ratios],
            "featureMapShapes": [int(h) for h, _ in anchors.feature_map_shapes],
            "variance": [float(v) for v in spec.variances], "numLayers": int(anchors.num_layers)}


def constant_priors(spec: SsdSpec) -> np.ndarray:
    """NMS_TRT's priors input as GridAnchor_TRT + Concat would give it, float32 [2, A*4, 1]: each anchor's
    (xmin, ymin, xmax, ymax), then the variances."""
    corners = anchor_math.anchor_boxes(spec)[:, [1, 0, 3, 2]].reshape(-1)
    variances = np.tile(np.asarray(spec.variances, np.float32), spec.num_anchors)
    return np.stack([corners, variances]).astype(np.float32)[..., None]


NMS_TRT_MAX_TOP_K = 4096   # TensorRT's allClassNMS launches at most 8 x 512 threads a class: topK <= 4096


def nms_trt_top_k(spec: SsdSpec) -> int:
    """NMS_TRT's topK: the candidates of each class it runs NMS over, which are also the most it keeps a class.
    TF runs NMS over every box of a class and keeps max_detections_per_class; with topK = every anchor (up to
    TensorRT's 4096) NMS_TRT sees the same candidates, and the rows beyond max_detections_per_class it may keep
    never reach the best keepTopK while keepTopK <= max_detections_per_class (the OD API's configs)."""
    return int(min(max(spec.nms.top_k, spec.num_anchors), NMS_TRT_MAX_TOP_K))


def nms_fields(spec: SsdSpec) -> dict:
    """NMS_TRT's fields for a spec, inputs in the order (loc, priors, conf)."""
    keep_top_k = spec.max_detections
    return {"shareLocation": 1, "varianceEncodedInTarget": 0, "backgroundLabelId": 0,
            "numClasses": int(spec.num_classes), "topK": nms_trt_top_k(spec), "keepTopK": int(keep_top_k),
            "confidenceThreshold": float(spec.nms.score_threshold), "nmsThreshold": float(spec.nms.iou_threshold),
            "inputOrder": [0, 2, 1], "confSigmoid": 1, "isNormalized": 1, "codeType": TF_CENTER}


def add_trt_plugin_postprocessing(model_proto, spec: SsdSpec, extra_outputs: list[str]):
    """Flavour ``trt-plugins``: the original sample's collapse as TensorRT plugin nodes.

    GridAnchor_TRT -> Concat (priors), FlattenConcat_TRT over the per-layer box encodings and class
    logits, NMS_TRT (loc, priors, conf; inputOrder [0, 2, 1]). TensorRT's ONNX parser imports unknown
    ops as plugins (op_type = plugin name, attributes = plugin fields, plugin_version); ONNX Runtime
    runs them through plugin/'s reference ops.
    """
    import onnx_graphsurgeon as gs  # noqa: PLC0415

    graph = gs.import_onnx(model_proto)
    tensors = graph.tensors()
    build = _Builder(graph)
    layers = spec.anchors.num_layers
    plugin = {"plugin_version": "1", "plugin_namespace": ""}
    problem = grid_anchor_problem(spec)
    if problem:
        log.info("%s: the trt-plugins file carries the anchors as constant priors (as the portable flavour does)",
                 problem)
        prior_box = build.const("priorbox", constant_priors(spec))
    else:
        prior_sizes = [h * w * spec.anchors.boxes_per_location(i) * 4
                       for i, (h, w) in enumerate(spec.anchors.feature_map_shapes)]
        priors = [gs.Variable(f"GridAnchor_out{i}", np.float32, [2, size, 1]) for i, size in enumerate(prior_sizes)]
        graph.layer(op="GridAnchor_TRT", name=f"{POST_PREFIX}GridAnchor", domain=PLUGIN_DOMAIN,
                    inputs=[graph.inputs[0]], outputs=priors, attrs={**grid_anchor_fields(spec), **plugin})
        prior_box = build.op("Concat", priors, {"axis": 1}, name="concat_priorbox",
                             dtype=np.float32, shape=[2, sum(prior_sizes), 1])
    num_anchors, num_classes = spec.num_anchors, spec.num_classes
    loc, conf = (gs.Variable(name, np.float32, ["N", size, 1, 1])
                 for name, size in (("concat_box_loc", num_anchors * 4), ("concat_box_conf", num_anchors * num_classes)))
    for name, inputs, output in ((f"{POST_PREFIX}concat_box_loc", extra_outputs[:layers], loc),
                                 (f"{POST_PREFIX}concat_box_conf", extra_outputs[layers:], conf)):
        graph.layer(op="FlattenConcat_TRT", name=name, domain=PLUGIN_DOMAIN,
                    inputs=[tensors[tensor] for tensor in inputs],
                    outputs=[output], attrs={"axis": 1, "ignoreBatch": 0, **plugin})
    if spec.nms.clips_before_nms:
        loc, conf = _clipped_before_nms(build, loc, conf, spec)
    fields = nms_fields(spec)
    keep_top_k = fields["keepTopK"]
    nms_out = gs.Variable("nms_out", np.float32, ["N", 1, keep_top_k, 7])
    nms_count = gs.Variable("nms_count", np.int32, ["N", 1, 1, 1])
    graph.layer(op="NMS_TRT", name=f"{POST_PREFIX}NMS", domain=PLUGIN_DOMAIN, inputs=[loc, prior_box, conf],
                outputs=[nms_out, nms_count], attrs={**fields, **plugin})
    rows = build.op("Reshape", [nms_out, build.const("det_shape", np.array([0, keep_top_k, 7], np.int64))])
    detections, num_detections = _windowed_rows(build, rows, keep_top_k)
    return _export(graph, [detections, num_detections], spec)


def _clipped_before_nms(build: _Builder, loc, conf, spec: SsdSpec):
    """NMS_TRT's inputs for a graph that clips before NMS (TF's 2017 exports). NMS_TRT decodes without clipping
    and runs NMS on the unclipped boxes, so the box encodings it gets are those of the clipped boxes (decoded,
    clipped to [0, 1], encoded again against the same anchors), and the class logits of boxes with no area once
    clipped are set to -1e4 (sigmoid 0, below every threshold): NMS_TRT then sees TF's candidates and IoUs."""
    num_anchors, num_classes = spec.num_anchors, spec.num_classes
    centers, sizes = anchor_math.to_center_size(anchor_math.anchor_boxes(spec))
    y_scale, x_scale, h_scale, w_scale = spec.box_coder_scales
    _, mins, maxs, has_area = _window(build, _decode_boxes(build, loc, spec), "pre")     # y-first
    has_area = build.op("Unsqueeze", [has_area, build.const("pre_area_axis", np.array([2], np.int64))])  # [N, A, 1]
    extent = build.op("Sub", [maxs, mins])                                           # [N, A, 2] (h, w)
    middle = build.op("Div", [build.op("Add", [mins, maxs]), build.const("pre_two", np.float32(2.0))])
    center_codes = build.op("Mul", [build.op("Div", [build.op("Sub", [middle, build.const("pre_centers", centers)]),
                                                     build.const("pre_sizes", sizes)]),
                                    build.const("pre_center_scale", np.array([y_scale, x_scale], np.float32))])
    extent = build.op("Max", [extent, build.const("pre_tiny", np.float32(1e-10))])   # log of a finite size
    size_codes = build.op("Mul", [build.op("Log", [build.op("Div", [extent, build.const("pre_sizes_2", sizes)])]),
                                  build.const("pre_size_scale", np.array([h_scale, w_scale], np.float32))])
    codes = build.op("Concat", [center_codes, size_codes], {"axis": 2})
    loc = build.op("Reshape", [codes, build.const("pre_loc_shape", np.array([0, num_anchors * 4, 1, 1], np.int64))],
                   dtype=np.float32, shape=["N", num_anchors * 4, 1, 1])
    logits = build.op("Reshape", [conf, build.const("pre_conf_rows", np.array([0, num_anchors, num_classes], np.int64))])
    logits = build.op("Where", [has_area, logits, build.const("pre_no_score", np.float32(-1e4))])
    conf = build.op("Reshape", [logits, build.const("pre_conf_shape",
                                                     np.array([0, num_anchors * num_classes, 1, 1], np.int64))],
                    dtype=np.float32, shape=["N", num_anchors * num_classes, 1, 1])
    return loc, conf


def _windowed_rows(build: _Builder, rows, keep_top_k: int):
    """NMS_TRT's rows [N, K, 7] as TF gives them: rows whose (clipped) box has no area dropped (NMS_TRT keeps
    them; TF drops them), the rest moved up in their order -> (detections [N, K, 7], num_detections [N])."""
    head, box = build.op("Split", [rows, build.const("row_split", np.array([3, 4], np.int64))], {"axis": 2},
                         num_outputs=2)                                           # [N, K, 3], [N, K, 4] x-first
    _, _, _, has_area = _window(build, box, "row")                  # rows already clipped: the area test only
    label = build.op("Gather", [head, build.const("label_column", np.int64(1))], {"axis": 2})       # [N, K]
    score = build.op("Gather", [head, build.const("score_column", np.int64(2))], {"axis": 2})
    valid = build.op("And", [has_area, build.op("Greater", [label, build.const("row_no_label", np.float32(-0.5))])])
    key = build.op("Where", [valid, score, build.const("row_dropped", np.float32(-1.0))])
    top_key, order = build.op("TopK", [key, build.const("row_count", np.array([keep_top_k], np.int64))],
                              {"axis": 1, "largest": 1, "sorted": 1}, num_outputs=2)   # stable: ties keep order
    gather_index = build.op("Unsqueeze", [order, build.const("row_index_axis", np.array([2], np.int64))])
    rows = build.op("GatherND", [build.op("Concat", [head, box], {"axis": 2}), gather_index], {"batch_dims": 1})
    kept = build.op("Greater", [top_key, build.const("row_kept", np.float32(-0.5))])                # [N, K]
    image_id, fields = build.op("Split", [rows, build.const("row_id_split", np.array([1, 6], np.int64))],
                                {"axis": 2}, num_outputs=2)
    unused = build.const("row_unused", np.array([-1, 0, 0, 0, 0, 0], np.float32))
    fields = build.op("Where", [build.op("Unsqueeze", [kept, build.const("row_kept_axis", np.array([2], np.int64))]),
                                fields, unused])
    detections = build.op("Concat", [image_id, fields], {"axis": 2}, name=DETECTIONS, dtype=np.float32,
                          shape=["N", keep_top_k, 7])
    num_detections = build.op("ReduceSum", [build.op("Cast", [valid], {"to": 6}),
                                            build.const("row_sum_axis", np.array([1], np.int64))],
                              {"keepdims": 0}, name=NUM_DETECTIONS, dtype=np.int32, shape=["N"])
    return detections, num_detections


POSTPROCESSING = {"portable": add_portable_postprocessing, "core": add_core_postprocessing,
                  "trt-plugins": add_trt_plugin_postprocessing}
