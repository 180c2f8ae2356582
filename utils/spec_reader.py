"""Read an SsdSpec once from a frozen graph and its pipeline.config (the conversion side).

Precedence for every value: a command-line override, then ``pipeline.config`` beside the graph,
then the graph's own constants, then the TF Object Detection API's proto defaults (those of
``ssd_anchor_generator``, ``faster_rcnn_box_coder`` and ``batch_non_max_suppression`` as written in
the public SSD sample configs). Layer count, feature-map sizes, boxes per location and the class
count always come from the graph and are checked against the config.
"""

from __future__ import annotations

import math
from pathlib import Path

from utils import pbtxt, tf_graph
from utils.errors import UserError
from utils.ssd_spec import AnchorSpec, NmsSpec, SsdSpec, check_value


# --- pipeline.config (protobuf text format, read by utils.pbtxt; every value checked where it is read) -------

def _bad(path: Path, field: str, value, why: str) -> UserError:
    shown = repr(value) if isinstance(value, str) else value     # as written in the file
    return UserError(f"'{path}': {field} is {shown}, {why}; fix the model's pipeline.config")


def _integer(path: Path, field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, field, value, "not an integer")
    return value


def _real(path: Path, field: str, value) -> float:
    if isinstance(value, str) and value.lower() in ("inf", "-inf", "infinity", "-infinity", "nan"):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise _bad(path, field, value, "not a number")
    return float(value)


def _boolean(path: Path, field: str, value) -> bool:
    if value in ("true", "True", "t", 1):
        return True
    if value in ("false", "False", "f", 0):
        return False
    raise _bad(path, field, value, "not true or false")


def _checked(path: Path, field: str, written, value, check: str | None):
    """``value`` (read from ``written``) if it passes ``check`` (a range of utils.ssd_spec.check_value), else a
    UserError."""
    why = check_value(check, value) if check else None
    if why:
        raise _bad(path, field, written, why)
    return value


# key -> (message path below ssd, proto field, reader, range check)
_CONFIG_FIELDS = {
    "num_classes": ((), "num_classes", _integer, "positive"),
    "height": (("image_resizer", "fixed_shape_resizer"), "height", _integer, "positive"),
    "width": (("image_resizer", "fixed_shape_resizer"), "width", _integer, "positive"),
    "min_scale": (("anchor_generator", "ssd_anchor_generator"), "min_scale", _real, "positive"),
    "max_scale": (("anchor_generator", "ssd_anchor_generator"), "max_scale", _real, "positive"),
    "reduce_boxes_in_lowest_layer": (("anchor_generator", "ssd_anchor_generator"), "reduce_boxes_in_lowest_layer",
                                     _boolean, None),
    "interpolated_scale_aspect_ratio": (("anchor_generator", "ssd_anchor_generator"),
                                        "interpolated_scale_aspect_ratio", _real, "non_negative"),
    "num_layers": (("anchor_generator", "ssd_anchor_generator"), "num_layers", _integer, "positive"),
    "y_scale": (("box_coder", "faster_rcnn_box_coder"), "y_scale", _real, "positive"),
    "x_scale": (("box_coder", "faster_rcnn_box_coder"), "x_scale", _real, "positive"),
    "height_scale": (("box_coder", "faster_rcnn_box_coder"), "height_scale", _real, "positive"),
    "width_scale": (("box_coder", "faster_rcnn_box_coder"), "width_scale", _real, "positive"),
    "score_threshold": (("post_processing", "batch_non_max_suppression"), "score_threshold", _real, "score_threshold"),
    "iou_threshold": (("post_processing", "batch_non_max_suppression"), "iou_threshold", _real, "iou_threshold"),
    "top_k": (("post_processing", "batch_non_max_suppression"), "max_detections_per_class", _integer, "top_k"),
    "keep_top_k": (("post_processing", "batch_non_max_suppression"), "max_total_detections", _integer, "keep_top_k"),
}


def read_config(path: Path) -> dict:
    """The values of a pipeline.config that the spec uses (absent ones omitted), each checked: a one-line
    UserError naming the field, the value and the file for a bad one."""
    path = Path(path)
    document = pbtxt.load(path, "pipeline.config")
    ssd = pbtxt.message(document, "model", "ssd") or pbtxt.message(document, "ssd")
    if ssd is None:
        raise UserError(f"'{path}' has no 'model {{ ssd {{ ... }} }}' block; give the pipeline.config of an SSD model")
    found = {}
    for key, (where, name, reader, check) in _CONFIG_FIELDS.items():
        value = pbtxt.last(pbtxt.message(ssd, *where), name)
        if value is not None:
            field = ".".join((*where, name))
            found[key] = _checked(path, field, value, reader(path, field, value), check)
    anchor = pbtxt.message(ssd, "anchor_generator", "ssd_anchor_generator")
    field = "anchor_generator.ssd_anchor_generator.aspect_ratios"
    ratios = tuple(_checked(path, field, value, _real(path, field, value), "positive")
                   for value in pbtxt.values(anchor, "aspect_ratios"))
    if ratios:
        found["aspect_ratios"] = ratios
    converter = pbtxt.last(pbtxt.message(ssd, "post_processing"), "score_converter")
    if converter is not None:
        found["score_converter"] = str(converter)
    label_map = [value for reader in ("train_input_reader", "eval_input_reader")
                 for value in pbtxt.values(pbtxt.message(document, reader), "label_map_path")]
    if label_map:
        found["label_map_path"] = str(label_map[-1])
    return found


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
    config = read_config(config_path) if config_path else {}
    config.pop("label_map_path", None)
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
