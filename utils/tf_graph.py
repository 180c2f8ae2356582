"""TensorFlow GraphDef surgery for TF Object Detection API SSD frozen graphs.

The frozen graph is cut down to its core network: the Preprocessor is replaced by one float
input ``Input`` (NHWC here; tf2onnx makes it NCHW), Assert nodes are removed, Identity nodes are
forwarded, and everything past the box-encoding and class-logit concats (anchors, decoding, NMS)
is pruned. What the post-processing needs is read from the graph into an ``SsdSpec`` elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from utils.errors import UserError
from utils.ssd_spec import CLIP_AFTER_NMS, CLIP_BEFORE_NMS

INPUT_NAME = "Input"   # = utils.artifact.INPUT (the ONNX input keeps the placeholder's name)
BOX_CONCAT = "concat"
CLASS_CONCAT = "concat_1"
ANCHOR_CONCAT_SUFFIX = "Concatenate/concat"


# What TensorFlow's native code prints to stderr while it is imported, whatever TF_CPP_MIN_LOG_LEVEL says
# (absl logs before its InitializeLog, once per shared library): dropped unless TF_CPP_MIN_LOG_LEVEL is 0.
IMPORT_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
                "This TensorFlow binary is optimized to use available CPU instructions",
                "To enable the following instructions:")


@contextlib.contextmanager
def _native_stderr_filtered(noise: tuple[str, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (native code writes there) and pass on the lines that are not ``noise``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(text in line for text in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_tensorflow():
    """Import TensorFlow lazily and quietly (it is slow and chatty)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
    else:
        quiet = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") not in ("", "0")
        with _native_stderr_filtered(IMPORT_NOISE if quiet else ()):
            import tensorflow as tf  # noqa: PLC0415

    tf.get_logger().setLevel("ERROR")
    return tf


@dataclass(frozen=True)
class SsdGraphNodes:
    """Names of the nodes of a TF OD API SSD graph that the converter cuts at."""

    preprocessed: str          # the Preprocessor output that feeds the feature extractor
    image_input: str           # the original uint8 placeholder (image_tensor)
    float_input: str           # the Cast of image_tensor to float (ToFloat), fed by the TF backend
    box_concat: str            # [N, A, 1, 4] box encodings
    class_concat: str          # [N, A, C] class logits
    anchor_concat: str         # [A, 4] anchors (ymin, xmin, ymax, xmax), constant
    predictor_heads: tuple[tuple[str, str], ...]  # (box-encoding, class-logit) conv outputs (NHWC) per feature map
    anchor_generator: str = "ssd"   # "multiscale" when the graph has a MultiscaleGridAnchorGenerator
    resizer: str = "fixed_shape_resizer"   # "keep_aspect_ratio_resizer" when the Preprocessor resizes to a range


# The box predictors' namespaces and their heads' output nodes, in anchor order:
# convolutional_box_predictor: BoxPredictor_0, BoxPredictor_1, ... each with its own weights;
# weight_shared_convolutional_box_predictor: WeightSharedConvolutionalBoxPredictor, ..._1, ... (one set of weights).
PREDICTOR_FAMILIES = (("BoxPredictor_", "BoxEncodingPredictor/BiasAdd", "ClassPredictor/BiasAdd"),
                      ("WeightSharedConvolutionalBoxPredictor", "BoxPredictor/BiasAdd", "ClassPredictor/BiasAdd"))


def _predictor_heads(names) -> tuple[tuple[str, str], ...]:
    """(box, class) head outputs of the first predictor family the graph has, in anchor order."""
    for prefix, box_head, class_head in PREDICTOR_FAMILIES:
        spaces = {name.split("/")[0] for name in names if name.split("/")[0].startswith(prefix)}
        indices = {space: space[len(prefix):].lstrip("_") or "0" for space in spaces}
        ordered = sorted((space for space in spaces if indices[space].isdigit()), key=lambda s: int(indices[s]))
        if ordered:
            return tuple((f"{space}/{box_head}", f"{space}/{class_head}") for space in ordered)
    return ()


def load_graph_def(path: Path):
    """Read a frozen GraphDef; a file that is not one gives a one-line UserError."""
    tf = import_tensorflow()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read graph '{path}': {exc.strerror}; give a frozen_inference_graph.pb") from exc
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise UserError(f"'{path}' is not a TensorFlow GraphDef ({type(exc).__name__}); "
                        "give the frozen_inference_graph.pb exported by the TF Object Detection API") from exc
    if not graph_def.node or not all(node.name and node.op for node in graph_def.node):
        raise UserError(f"'{path}' is not a TensorFlow GraphDef (no nodes could be read); "
                        "give the frozen_inference_graph.pb exported by the TF Object Detection API")
    return graph_def


def find_ssd_nodes(graph_def, path: Path | str = "graph") -> SsdGraphNodes:
    """Locate the SSD landmarks; a graph without them gives one line naming what is missing."""
    nodes = {node.name: node for node in graph_def.node}
    missing = [name for name in ("image_tensor", BOX_CONCAT, CLASS_CONCAT) if name not in nodes]
    casts = [node.name for node in graph_def.node if node.op == "Cast" and list(node.input) == ["image_tensor"]]
    if not casts:
        missing.append("the Cast of image_tensor to float (ToFloat)")

    preprocessed = sorted({
        inp.split(":")[0]
        for node in graph_def.node if node.name.startswith("FeatureExtractor/")
        for inp in node.input if inp.startswith("Preprocessor/")
    })
    if len(preprocessed) != 1:
        missing.append("a Preprocessor output feeding FeatureExtractor")
    anchors = sorted(name for name in nodes
                     if name.endswith(ANCHOR_CONCAT_SUFFIX) and not name.startswith("Postprocessor/"))
    if not anchors:
        missing.append(f"the anchor generator's '{ANCHOR_CONCAT_SUFFIX}'")
    heads = _predictor_heads(nodes)
    if not heads:
        missing.append("BoxPredictor_* or WeightSharedConvolutionalBoxPredictor layers")
    if missing:
        raise UserError(f"'{path}' is not a TF Object Detection API SSD graph: missing {', '.join(missing)}")
    multiscale = any(name.startswith("MultiscaleGridAnchorGenerator/") for name in nodes)
    to_range = any(name.startswith("Preprocessor/") and "ResizeToRange" in name for name in nodes)
    return SsdGraphNodes(preprocessed=preprocessed[0], image_input="image_tensor", float_input=casts[0],
                         box_concat=BOX_CONCAT, class_concat=CLASS_CONCAT, anchor_concat=anchors[0],
                         predictor_heads=heads, anchor_generator="multiscale" if multiscale else "ssd",
                         resizer="keep_aspect_ratio_resizer" if to_range else "fixed_shape_resizer")


# The per-class NMS ops of TF's image ops (tf.image.non_max_suppression in the OD API's MultiClassNonMaxSuppression).
NMS_OPS = ("NonMaxSuppression", "NonMaxSuppressionV2", "NonMaxSuppressionV3", "NonMaxSuppressionV4",
           "NonMaxSuppressionV5")
POSTPROCESSOR = "Postprocessor/"
_DT_FLOAT = 1   # tensorflow.DataType.DT_FLOAT


def _clips(node) -> bool:
    """A float Minimum / Maximum: how box_list_ops.clip_to_window (ClipToWindow) clips coordinates to the window."""
    return node.op in ("Minimum", "Maximum") and node.attr["T"].type == _DT_FLOAT


def _reaches(start: list[str], edges: dict[str, list[str]], nodes: dict) -> bool:
    """Whether a clipping node is among ``start`` and what ``edges`` lead to from them, inside the Postprocessor."""
    seen, todo = set(), [name for name in start if name.startswith(POSTPROCESSOR)]
    while todo:
        name = todo.pop()
        if name in seen or name not in nodes:
            continue
        seen.add(name)
        if _clips(nodes[name]):
            return True
        todo.extend(other for other in edges.get(name, ()) if other.startswith(POSTPROCESSOR))
    return False


def clip_order(graph_def, path: Path | str = "graph") -> str:
    """Where the graph's post-processing clips the boxes to the window, read from its data flow:
    CLIP_BEFORE_NMS when clipping feeds the boxes input of the per-class NonMaxSuppression (the OD API's
    2017 exports), CLIP_AFTER_NMS when it follows the NMS's selection (later exports). A graph where
    neither can be read gives a one-line UserError: converting it would mean guessing."""
    nodes = {node.name: node for node in graph_def.node}
    nms = [node for node in graph_def.node if node.name.startswith(POSTPROCESSOR) and node.op in NMS_OPS]
    if not nms:
        ops = sorted({node.op for node in graph_def.node if node.name.startswith(POSTPROCESSOR)
                      and "NonMaxSuppression" in node.op})
        found = f" (it has {', '.join(ops)})" if ops else ""
        raise UserError(f"'{path}': cannot read where its post-processing clips the boxes: no per-class "
                        f"NonMaxSuppression under Postprocessor/{found}; only the TF Object Detection API's "
                        "BatchMultiClassNonMaxSuppression post-processing is supported")
    inputs = {name: [i.split(":")[0] for i in node.input if not i.startswith("^")] for name, node in nodes.items()}
    before = {_reaches([inputs[node.name][0]], inputs, nodes) for node in nms}
    if before == {True}:
        return CLIP_BEFORE_NMS
    consumers: dict[str, list[str]] = {}
    for name, sources in inputs.items():
        for source in sources:
            consumers.setdefault(source, []).append(name)
    after = {_reaches(consumers.get(node.name, []), consumers, nodes) for node in nms}
    if before == {False} and after == {True}:
        return CLIP_AFTER_NMS
    raise UserError(f"'{path}': cannot read where its post-processing clips the boxes to the window (before or "
                    f"after the NonMaxSuppression of {len(nms)} class(es)): no consistent ClipToWindow found; only "
                    "the TF Object Detection API's BatchMultiClassNonMaxSuppression post-processing is supported")


def extract_core(graph_def, ssd_nodes: SsdGraphNodes, input_size: tuple[int, int]):
    """Return the core network: ``Input`` [N,H,W,3] float (values in [-1,1]) -> the two concats.

    input_size is (width, height).
    """
    tf = import_tensorflow()
    width, height = input_size
    core = tf.compat.v1.GraphDef()
    core.versions.CopyFrom(graph_def.versions)

    # Identity forwarding map (resolved through chains), Assert nodes dropped.
    forward = {node.name: node.input[0] for node in graph_def.node
               if node.op == "Identity" and node.input and not node.input[0].startswith("^")}

    def resolve(name: str) -> str:
        base, _, port = name.partition(":")
        while base in forward and port in ("", "0"):  # an Identity has one output
            base, _, port = forward[base].partition(":")
        if base == ssd_nodes.preprocessed and port in ("", "0"):
            return INPUT_NAME
        return f"{base}:{port}" if port not in ("", "0") else base

    placeholder = core.node.add()
    placeholder.name = INPUT_NAME
    placeholder.op = "Placeholder"
    placeholder.attr["dtype"].type = tf.float32.as_datatype_enum
    placeholder.attr["shape"].shape.CopyFrom(
        tf.TensorShape([None, height, width, 3]).as_proto())

    for node in graph_def.node:
        if node.op in ("Assert", "Identity") or node.name == INPUT_NAME:
            continue
        new_node = core.node.add()
        new_node.CopyFrom(node)
        del new_node.input[:]
        new_node.input.extend(resolve(inp) for inp in node.input if not inp.startswith("^"))

    return tf.compat.v1.graph_util.extract_sub_graph(core, [ssd_nodes.box_concat, ssd_nodes.class_concat])


def open_session(graph_def):
    """A TF1 session on a GraphDef imported without a name prefix."""
    tf = import_tensorflow()
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return tf.compat.v1.Session(graph=graph)


def evaluate(graph_def, fetches: list[str], feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Run tensors of a GraphDef once (used for anchors and the reference outputs)."""
    with open_session(graph_def) as session:
        return session.run([name if ":" in name else f"{name}:0" for name in fetches],
                           feed_dict={f"{k}:0" if ":" not in k else k: v for k, v in (feeds or {}).items()})


def static_shapes(graph_def, tensor_names: list[str]) -> list[list[int | None]]:
    """Static shapes of tensors after importing the graph (the core graph has a fixed H, W)."""
    tf = import_tensorflow()
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return [graph.get_tensor_by_name(name if ":" in name else f"{name}:0").shape.as_list()
            for name in tensor_names]


def const_value(graph_def, name_suffix: str) -> np.ndarray | None:
    """Value of the first Const node whose name ends with ``name_suffix`` (None when absent)."""
    tf = import_tensorflow()
    for node in graph_def.node:
        if node.op == "Const" and node.name.endswith(name_suffix):
            return tf.make_ndarray(node.attr["value"].tensor)
    return None
