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
from utils.ssd_spec import (MULTISCALE_ASPECT_RATIOS, MULTISCALE_GENERATOR, SSD_GENERATOR, AnchorSpec, NmsSpec,
                            SsdSpec, check_value)


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


# The resizers and anchor generators of the OD API's ssd.proto that conversion supports; the others are refused.
# keep_aspect_ratio_resizer gives every image its own input size: a TensorRT engine / ONNX file of one size cannot
# reproduce it (feature maps and anchors change with each image).
RESIZERS = ("fixed_shape_resizer",)
ANCHOR_GENERATORS = {"ssd_anchor_generator": SSD_GENERATOR, "multiscale_anchor_generator": MULTISCALE_GENERATOR}
KEEP_ASPECT = "keep_aspect_ratio_resizer"

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
    "min_level": (("anchor_generator", "multiscale_anchor_generator"), "min_level", _integer, "positive"),
    "max_level": (("anchor_generator", "multiscale_anchor_generator"), "max_level", _integer, "positive"),
    "anchor_scale": (("anchor_generator", "multiscale_anchor_generator"), "anchor_scale", _real, "positive"),
    "scales_per_octave": (("anchor_generator", "multiscale_anchor_generator"), "scales_per_octave", _integer,
                          "positive"),
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
    for key, block, known in (("resizer", "image_resizer", RESIZERS), ("anchor_generator", "anchor_generator",
                                                                       ANCHOR_GENERATORS)):
        kinds = [name for name, values in (pbtxt.message(ssd, block) or {}).items()
                 if any(isinstance(value, dict) for value in values)]
        if kinds:
            found[key] = kinds[-1]
            _refuse_resizer(kinds[-1], path)
            if kinds[-1] not in known:
                raise UserError(f"'{path}': {block} {kinds[-1]} is not supported (only {' or '.join(known)}); "
                                "export the model with one of those")
    generator = found.get("anchor_generator", "ssd_anchor_generator")
    anchor = pbtxt.message(ssd, "anchor_generator", generator)
    field = f"anchor_generator.{generator}.aspect_ratios"
    ratios = tuple(_checked(path, field, value, _real(path, field, value), "positive")
                   for value in pbtxt.values(anchor, "aspect_ratios"))
    if ratios:
        found["aspect_ratios"] = ratios
    if generator == "ssd_anchor_generator":
        _refuse_unread_anchor_fields(anchor, path)
    converter = pbtxt.last(pbtxt.message(ssd, "post_processing"), "score_converter")
    if converter is not None:
        found["score_converter"] = str(converter)
    label_map = [value for reader in ("train_input_reader", "eval_input_reader")
                 for value in pbtxt.values(pbtxt.message(document, reader), "label_map_path")]
    if label_map:
        found["label_map_path"] = str(label_map[-1])
    return found


# ssd_anchor_generator fields the anchors here do not follow: explicit scales, a base anchor other than 1x1,
# explicit strides / offsets (the generator's defaults are what utils.anchors computes).
_UNREAD_ANCHOR_FIELDS = {"scales": None, "base_anchor_height": 1.0, "base_anchor_width": 1.0, "height_stride": None,
                         "width_stride": None, "height_offset": None, "width_offset": None}


def _refuse_unread_anchor_fields(anchor: dict | None, path: Path) -> None:
    """A one-line UserError for an ssd_anchor_generator field that would give other anchors than the ones
    computed here (rather than converting with wrong anchors)."""
    for name, default in _UNREAD_ANCHOR_FIELDS.items():
        values = pbtxt.values(anchor, name)
        if values and (default is None or any(float(value) != default for value in values)):
            field = f"anchor_generator.ssd_anchor_generator.{name}"
            raise _bad(path, field, values[-1] if len(values) == 1 else list(values),
                       "is not supported by this converter (only the generator's defaults); remove it or export "
                       "with the default anchor layout")


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


def _refuse_resizer(kind: str, where: Path | str) -> None:
    if kind == KEEP_ASPECT:
        raise UserError(f"'{where}' uses keep_aspect_ratio_resizer (a different input size for every image), which "
                        "cannot be converted to one fixed-size network; export the model with fixed_shape_resizer")


def input_size(graph_def, ssd_nodes: tf_graph.SsdGraphNodes, config_path: Path | None,
               graph_path: Path | str = "graph") -> tuple[int, int]:
    """The network's fixed (width, height): pipeline.config's fixed_shape_resizer, else the graph's resize
    constant, else 300 x 300; a keep_aspect_ratio_resizer model is refused in one line."""
    _refuse_resizer(ssd_nodes.resizer, graph_path)
    values = {**_graph_values(graph_def), **(read_config(config_path) if config_path else {})}
    return values.get("width", 300), values.get("height", 300)


def _predictor_shapes(core_graph_def, ssd_nodes: tf_graph.SsdGraphNodes) -> list[tuple[list, list]]:
    """[(box-encoding shape, class-logit shape)] of each predictor, NHWC, before the reshapes."""
    pairs = list(ssd_nodes.predictor_heads)
    names = {node.name for node in core_graph_def.node}
    absent = [name for pair in pairs for name in pair if name not in names]
    if absent:
        raise UserError(f"the graph's box predictors lack {', '.join(absent[:2])}; "
                        "only convolutional SSD box predictors are supported")
    shapes = tf_graph.static_shapes(core_graph_def, [name for pair in pairs for name in pair])
    return list(zip(shapes[0::2], shapes[1::2]))


def _anchor_spec(values: dict, ssd_nodes: tf_graph.SsdGraphNodes, feature_maps: tuple) -> AnchorSpec:
    """The anchor generator's parameters: the config's generator (else the graph's), its values, else defaults."""
    defaults = AnchorSpec()
    configured = values.get("anchor_generator")
    generator = ANCHOR_GENERATORS[configured] if configured else ssd_nodes.anchor_generator
    if generator == MULTISCALE_GENERATOR:
        return AnchorSpec(generator=generator, aspect_ratios=values.get("aspect_ratios", MULTISCALE_ASPECT_RATIOS),
                          feature_map_shapes=feature_maps,
                          **{key: values.get(key, getattr(defaults, key))
                             for key in ("min_level", "max_level", "anchor_scale", "scales_per_octave")})
    return AnchorSpec(generator=generator, feature_map_shapes=feature_maps,
                      **{key: values.get(key, getattr(defaults, key))
                         for key in ("min_scale", "max_scale", "aspect_ratios", "reduce_boxes_in_lowest_layer",
                                     "interpolated_scale_aspect_ratio")})


def read_ssd_spec(graph_def, core_graph_def, ssd_nodes: tf_graph.SsdGraphNodes,
                  config_path: Path | None, graph_path: Path | str = "graph") -> SsdSpec:
    """Build the SsdSpec of a graph (see the module docstring for where each value comes from)."""
    values = _graph_values(graph_def)
    config = read_config(config_path) if config_path else {}
    config.pop("label_map_path", None)
    values.update(config)
    _refuse_resizer(ssd_nodes.resizer, graph_path)
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

    anchors = _anchor_spec(values, ssd_nodes, tuple(feature_maps))
    expected = [anchors.boxes_per_location(i) for i in range(anchors.num_layers)]
    layers = (anchors.max_level - anchors.min_level + 1 if anchors.multiscale
              else values.get("num_layers", anchors.num_layers))
    if expected != boxes_per_layer or layers != anchors.num_layers:
        raise UserError(f"'{graph_path}': the anchor generator gives {expected} boxes per location on {layers} "
                        f"feature maps but the graph's predictors have {boxes_per_layer}; put the model's "
                        "pipeline.config beside it")

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
                    keep_top_k=values.get("keep_top_k", nms_defaults.keep_top_k),
                    clip_order=tf_graph.clip_order(graph_def, graph_path)),
    )
