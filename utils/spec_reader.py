"""Read an SsdSpec once from a frozen graph and its pipeline.config (the conversion side).

Precedence for every value: a command-line override, then ``pipeline.config`` beside the graph,
then the graph's own constants, then the TF Object Detection API's proto defaults (those of
``ssd_anchor_generator``, ``faster_rcnn_box_coder`` and ``batch_non_max_suppression`` as written in
the public SSD sample configs). Layer count, feature-map sizes, boxes per location and the class
count always come from the graph and are checked against the config.
"""

from __future__ import annotations

import re
from pathlib import Path

from utils import tf_graph
from utils.errors import UserError
from utils.ssd_spec import AnchorSpec, NmsSpec, SsdSpec


# --- pipeline.config (protobuf text format; only the few scalar fields we need) -------------------

def _block(text: str, name: str) -> str | None:
    """The body of the first ``name { ... }`` block, braces matched."""
    match = re.search(rf"\b{name}\s*\{{", text)
    if not match:
        return None
    depth, start = 1, match.end()
    for pos in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start:pos]
    return None


def _values(block: str | None, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s*:\s*([^\s#]+)", block or "", flags=re.MULTILINE)


def _first(block: str | None, name: str, cast):
    found = _values(block, name)
    return cast(found[0].strip('"')) if found else None


def _as_bool(text: str) -> bool:
    return text.lower() == "true"


def _read_config(path: Path) -> dict:
    """The values of a pipeline.config that the spec uses (absent ones omitted)."""
    text = re.sub(r"#.*", "", path.read_text(encoding="utf-8", errors="replace"))
    ssd = _block(text, "ssd")
    if ssd is None:
        raise UserError(f"'{path}' has no 'ssd {{ ... }}' model block; give the pipeline.config of an SSD model")
    anchor = _block(ssd, "ssd_anchor_generator")
    coder = _block(ssd, "faster_rcnn_box_coder")
    nms = _block(ssd, "batch_non_max_suppression")
    resizer = _block(ssd, "fixed_shape_resizer")
    found = {
        "num_classes": _first(ssd, "num_classes", int),
        "height": _first(resizer, "height", int),
        "width": _first(resizer, "width", int),
        "min_scale": _first(anchor, "min_scale", float),
        "max_scale": _first(anchor, "max_scale", float),
        "aspect_ratios": tuple(float(v) for v in _values(anchor, "aspect_ratios")) or None,
        "reduce_boxes_in_lowest_layer": _first(anchor, "reduce_boxes_in_lowest_layer", _as_bool),
        "interpolated_scale_aspect_ratio": _first(anchor, "interpolated_scale_aspect_ratio", float),
        "num_layers": _first(anchor, "num_layers", int),
        "y_scale": _first(coder, "y_scale", float),
        "x_scale": _first(coder, "x_scale", float),
        "height_scale": _first(coder, "height_scale", float),
        "width_scale": _first(coder, "width_scale", float),
        "score_threshold": _first(nms, "score_threshold", float),
        "iou_threshold": _first(nms, "iou_threshold", float),
        "top_k": _first(nms, "max_detections_per_class", int),
        "keep_top_k": _first(nms, "max_total_detections", int),
        "score_converter": _first(ssd, "score_converter", str),
    }
    return {key: value for key, value in found.items() if value is not None}


# --- the graph ------------------------------------------------------------------------------------

def _graph_values(graph_def) -> dict:
    """Constants of the Preprocessor and Postprocessor that some exports carry."""
    found = {}
    resize = tf_graph.const_value(graph_def, "ResizeImage/stack")
    if resize is not None and resize.size == 2:
        found["height"], found["width"] = (int(v) for v in resize)
    for key, suffix in (("iou_threshold", "non_max_suppression/iou_threshold"),
                        ("score_threshold", "non_max_suppression/score_threshold")):
        value = tf_graph.const_value(graph_def, suffix)
        if value is not None and value.size == 1:
            found[key] = float(value)
    for key, suffix in (("y_scale", "Decode/truediv/y"), ("x_scale", "Decode/truediv_1/y"),
                        ("height_scale", "Decode/truediv_2/y"), ("width_scale", "Decode/truediv_3/y")):
        value = tf_graph.const_value(graph_def, suffix)
        if value is not None and value.size == 1:
            found[key] = float(value)
    return found


def _predictor_shapes(core_graph_def, ssd_nodes: tf_graph.SsdGraphNodes) -> list[tuple[list, list]]:
    """[(box-encoding shape, class-logit shape)] of each predictor, NHWC, before the reshapes."""
    pairs = [(f"{ns}/BoxEncodingPredictor/BiasAdd", f"{ns}/ClassPredictor/BiasAdd") for ns in ssd_nodes.box_predictors]
    names = {node.name for node in core_graph_def.node}
    absent = [name for pair in pairs for name in pair if name not in names]
    if absent:
        raise UserError(f"the graph's box predictors lack {', '.join(absent[:2])}; "
                        "only convolutional SSD box predictors are supported")
    shapes = tf_graph.static_shapes(core_graph_def, [name for pair in pairs for name in pair])
    return list(zip(shapes[0::2], shapes[1::2]))


def read_ssd_spec(graph_def, core_graph_def, ssd_nodes: tf_graph.SsdGraphNodes,
                  config_path: Path | None, graph_path: Path | str = "graph") -> SsdSpec:
    """Build the SsdSpec of a graph (see the module docstring for where each value comes from)."""
    values = _graph_values(graph_def)
    config = _read_config(config_path) if config_path else {}
    values.update(config)
    if values.get("score_converter", "SIGMOID") != "SIGMOID":
        raise UserError(f"score converter {values['score_converter']} is not supported (only SIGMOID, "
                        "as GridAnchor/NMS_TRT's confSigmoid); export the model with score_converter: SIGMOID")

    shapes = _predictor_shapes(core_graph_def, ssd_nodes)
    feature_maps, boxes_per_layer, class_counts = [], [], set()
    for box_shape, class_shape in shapes:
        if len(box_shape) != 4 or None in box_shape[1:] or box_shape[3] % 4:
            raise UserError(f"'{graph_path}': a box predictor has an unexpected shape {box_shape}; "
                            "only convolutional SSD box predictors are supported")
        boxes = box_shape[3] // 4
        feature_maps.append((box_shape[1], box_shape[2]))
        boxes_per_layer.append(boxes)
        class_counts.add(class_shape[3] // boxes)
    if len(class_counts) != 1:
        raise UserError(f"'{graph_path}': the class predictors disagree on the class count {sorted(class_counts)}")
    num_classes = class_counts.pop()
    if "num_classes" in config and config["num_classes"] + 1 != num_classes:
        raise UserError(f"'{config_path}' says num_classes {config['num_classes']} but the graph predicts "
                        f"{num_classes - 1} classes plus background; give the config of this graph")

    anchor_defaults = AnchorSpec()
    anchors = AnchorSpec(
        min_scale=values.get("min_scale", anchor_defaults.min_scale),
        max_scale=values.get("max_scale", anchor_defaults.max_scale),
        aspect_ratios=values.get("aspect_ratios", anchor_defaults.aspect_ratios),
        reduce_boxes_in_lowest_layer=values.get("reduce_boxes_in_lowest_layer",
                                                anchor_defaults.reduce_boxes_in_lowest_layer),
        interpolated_scale_aspect_ratio=values.get("interpolated_scale_aspect_ratio",
                                                   anchor_defaults.interpolated_scale_aspect_ratio),
        feature_map_shapes=tuple(feature_maps),
    )
    expected = [anchors.boxes_per_location(i) for i in range(anchors.num_layers)]
    if expected != boxes_per_layer or values.get("num_layers", anchors.num_layers) != anchors.num_layers:
        raise UserError(f"'{graph_path}': the anchor generator gives {expected} boxes per location but the "
                        f"graph's predictors have {boxes_per_layer}; put the model's pipeline.config beside it")

    nms_defaults = NmsSpec()
    return SsdSpec(
        num_classes=num_classes,
        input_size=(values.get("width", 300), values.get("height", 300)),
        anchors=anchors,
        box_coder_scales=(values.get("y_scale", 10.0), values.get("x_scale", 10.0),
                          values.get("height_scale", 5.0), values.get("width_scale", 5.0)),
        nms=NmsSpec(score_threshold=values.get("score_threshold", nms_defaults.score_threshold),
                    iou_threshold=values.get("iou_threshold", nms_defaults.iou_threshold),
                    top_k=values.get("top_k", nms_defaults.top_k),
                    keep_top_k=values.get("keep_top_k", nms_defaults.keep_top_k)),
    )
