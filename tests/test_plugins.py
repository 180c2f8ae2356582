"""plugin/: the TensorRT plugins' numpy references against TensorFlow and utils.postprocess, and as ONNX Runtime ops."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import IMAGES_DIR, REPO_ROOT
from plugin import reference
from utils import tf_graph
from utils.anchors import grid_anchors
from utils.converter import read_spec
from utils.onnx_export import grid_anchor_fields, nms_fields
from utils.postprocess import decode_boxes, multiclass_nms, sigmoid
from utils.ssd_spec import CLIP_AFTER_NMS, AnchorSpec, NmsSpec, SsdSpec

SPEC = SsdSpec(num_classes=3, input_size=(300, 300),
               anchors=AnchorSpec(feature_map_shapes=((19, 19), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1))),
               nms=NmsSpec(top_k=20, keep_top_k=50))


def _as_stored(fields: dict) -> dict:
    """Fields as an ONNX node stores them and TensorRT reads them: floats rounded to float32."""
    def stored(value):
        return float(np.float32(value)) if isinstance(value, float) else value
    return {k: [stored(x) for x in v] if isinstance(v, list) else stored(v) for k, v in fields.items()}


def _predictions(spec: SsdSpec, count: int, seed: int = 0) -> tuple[list, list]:
    """Random NHWC box-encoding and class-logit predictor outputs, one per layer."""
    rng = np.random.default_rng(seed)
    shapes = [(count, h, w, spec.anchors.boxes_per_location(i))
              for i, (h, w) in enumerate(spec.anchors.feature_map_shapes)]
    boxes = [rng.normal(0, 1, (*s[:3], s[3] * 4)).astype(np.float32) for s in shapes]
    logits = [rng.normal(-2, 2, (*s[:3], s[3] * spec.num_classes)).astype(np.float32) for s in shapes]
    return boxes, logits


@pytest.mark.tensorflow
@pytest.mark.parametrize("model_fixture", ["pedestrian_model", pytest.param("inception_model", marks=pytest.mark.slow)])
def test_grid_anchor_equals_tensorflows_anchor_subgraph(model_fixture, request):
    graph_def, _, nodes, spec = read_spec(request.getfixturevalue(model_fixture))
    (tf_anchors,) = tf_graph.evaluate(graph_def, [nodes.anchor_concat])
    fields = _as_stored(grid_anchor_fields(spec))
    layers = reference.grid_anchor(fields)
    assert len(layers) == 6
    sizes = [h * w * spec.anchors.boxes_per_location(i) for i, (h, w) in enumerate(spec.anchors.feature_map_shapes)]
    assert [layer.shape for layer in layers] == [(2, n * 4, 1) for n in sizes]
    assert all(layer.dtype == np.float32 for layer in layers)
    priors = np.concatenate(layers, axis=1)
    np.testing.assert_allclose(priors[0].reshape(-1, 4)[:, [1, 0, 3, 2]], tf_anchors, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(priors[1].reshape(-1, 4), np.float32(spec.variances)[None].repeat(len(tf_anchors), 0))


@pytest.mark.tensorflow
def test_flatten_concat_equals_tensorflows_reshape_and_concat():
    tf = tf_graph.import_tensorflow()
    boxes, logits = _predictions(SPEC, count=3)
    for tensors, width in ((boxes, 4), (logits, SPEC.num_classes)):
        expected = tf.concat([tf.reshape(t, [3, -1, width]) for t in tensors], axis=1).numpy()
        ours = reference.flatten_concat(tensors, axis=1, ignore_batch=0)
        assert ours.shape == (3, SPEC.num_anchors * width, 1, 1)
        np.testing.assert_array_equal(ours.reshape(3, -1, width), expected)
    with pytest.raises(ValueError, match="axis=1"):
        reference.flatten_concat(boxes, axis=2)


def test_tf_center_decoding_equals_postprocess():
    boxes, _ = _predictions(SPEC, count=2)
    loc = reference.flatten_concat(boxes)
    priors = np.concatenate(reference.grid_anchor(grid_anchor_fields(SPEC)), axis=1)
    expected = decode_boxes(loc, grid_anchors(SPEC.anchors), SPEC.box_coder_scales)
    np.testing.assert_allclose(reference.decode_tf_center(loc, priors), expected, atol=2e-6, rtol=0)


def _nms_inputs(spec: SsdSpec, count: int, seed: int = 0):
    boxes, logits = _predictions(spec, count, seed)
    priors = np.concatenate(reference.grid_anchor(_as_stored(grid_anchor_fields(spec))), axis=1)
    return reference.flatten_concat(boxes), priors, reference.flatten_concat(logits)


def test_nms_trt_equals_postprocess_on_decoded_inputs():
    loc, priors, conf = _nms_inputs(SPEC, count=2)
    fields = nms_fields(SPEC)
    assert fields["topK"] == min(SPEC.num_anchors, 4096) > SPEC.nms.top_k   # every anchor a candidate, as in TF
    nms_out, nms_count = reference.nms_trt(loc, priors, conf, fields)
    assert nms_out.shape == (2, 1, 50, 7) and nms_out.dtype == np.float32
    assert nms_count.shape == (2, 1, 1, 1) and nms_count.dtype == np.int32

    # TensorRT's NMS_TRT: NMS on the unclipped boxes over each class's best topK, the rows clipped, none dropped
    scores = sigmoid(conf.reshape(2, -1, SPEC.num_classes))
    decoded = decode_boxes(loc, grid_anchors(SPEC.anchors), SPEC.box_coder_scales)
    plugin_nms = replace(SPEC.nms, top_k=fields["topK"], clip_order=CLIP_AFTER_NMS)
    expected, counts = multiclass_nms(decoded, scores, plugin_nms, max_candidates=fields["topK"], keep_empty=True)
    np.testing.assert_array_equal(nms_count.reshape(-1), counts)
    assert (counts > 0).all()
    np.testing.assert_array_equal(nms_out[:, 0, :, :2], expected[..., :2])
    np.testing.assert_allclose(nms_out[:, 0, :, 2:], expected[..., 2:], atol=1e-5, rtol=0)
    padding = nms_out[1, 0, counts[1]:]
    assert (padding[:, 0] == 1).all() and (padding[:, 1] == -1).all() and not padding[:, 2:].any()


def test_nms_trt_pads_to_keep_top_k_and_refuses_other_configurations():
    small = SsdSpec(num_classes=2, input_size=(300, 300), anchors=AnchorSpec(feature_map_shapes=((1, 1),) * 6),
                    nms=NmsSpec(keep_top_k=200))
    loc, priors, conf = _nms_inputs(small, count=1)
    assert nms_fields(small)["keepTopK"] == small.num_anchors  # the graphs clamp it to what can exist
    nms_out, nms_count = reference.nms_trt(loc, priors, conf, {**nms_fields(small), "keepTopK": 200})
    assert nms_out.shape == (1, 1, 200, 7) and 0 < nms_count[0, 0, 0, 0] <= small.num_anchors
    with pytest.raises(ValueError, match="codeType"):
        reference.nms_trt(loc, priors, conf, {**nms_fields(small), "codeType": 1})


def _plugin_model(spec: SsdSpec):
    """Input -> GridAnchor_TRT -> Concat, the predictor outputs -> FlattenConcat_TRT x2, -> NMS_TRT."""
    trt = {"domain": "ai.onnx.contrib", "plugin_version": "1", "plugin_namespace": ""}
    layers = [f"anchors_{i}" for i in range(6)]
    boxes = [f"box_{i}" for i in range(6)]
    logits = [f"class_{i}" for i in range(6)]
    nodes = [
        helper.make_node("GridAnchor_TRT", ["Input"], layers, **trt, **grid_anchor_fields(spec)),
        helper.make_node("Concat", layers, ["priors"], axis=1),
        helper.make_node("FlattenConcat_TRT", boxes, ["loc"], axis=1, ignoreBatch=0, **trt),
        helper.make_node("FlattenConcat_TRT", logits, ["conf"], axis=1, ignoreBatch=0, **trt),
        helper.make_node("NMS_TRT", ["loc", "priors", "conf"], ["nms_out", "nms_count"], **trt,
                         **nms_fields(spec)),
    ]
    inputs = [helper.make_tensor_value_info("Input", TensorProto.FLOAT, ["N", 3, 300, 300])]
    for i, (h, w) in enumerate(spec.anchors.feature_map_shapes):
        k = spec.anchors.boxes_per_location(i)
        inputs += [helper.make_tensor_value_info(boxes[i], TensorProto.FLOAT, ["N", h, w, k * 4]),
                   helper.make_tensor_value_info(logits[i], TensorProto.FLOAT, ["N", h, w, k * spec.num_classes])]
    outputs = [helper.make_tensor_value_info(name, elem, None)
               for name, elem in (("priors", TensorProto.FLOAT), ("loc", TensorProto.FLOAT),
                                  ("conf", TensorProto.FLOAT), ("nms_out", TensorProto.FLOAT),
                                  ("nms_count", TensorProto.INT32))]
    graph = helper.make_graph(nodes, "trt_plugins", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("ai.onnx.contrib", 1)])


def test_custom_ops_run_in_onnxruntime():
    from plugin import ort_ops

    model = _plugin_model(SPEC)
    assert [a.type for a in model.graph.node[0].attribute if a.name == "variance"] == [helper.AttributeProto.FLOATS]
    session = ort_ops.inference_session(model, options=ort_ops.session_options())
    boxes, logits = _predictions(SPEC, count=2, seed=1)
    feed = {"Input": np.zeros((2, 3, 300, 300), np.float32), **{f"box_{i}": b for i, b in enumerate(boxes)},
            **{f"class_{i}": c for i, c in enumerate(logits)}}
    priors, loc, conf, nms_out, nms_count = session.run(None, feed)
    expected_priors = np.concatenate(reference.grid_anchor(_as_stored(grid_anchor_fields(SPEC))), axis=1)
    np.testing.assert_array_equal(priors, expected_priors)
    np.testing.assert_array_equal(loc, reference.flatten_concat(boxes))
    np.testing.assert_array_equal(conf, reference.flatten_concat(logits))
    expected_out, expected_count = reference.nms_trt(loc, priors, conf, _as_stored(nms_fields(SPEC)))
    assert nms_count.dtype == np.int32
    np.testing.assert_array_equal(nms_count, expected_count)
    np.testing.assert_array_equal(nms_out, expected_out)


def test_importing_the_ops_is_cheap_and_needs_no_tensorflow():
    code = "import sys, plugin.ort_ops; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


@pytest.mark.tensorflow
def test_trt_plugins_equals_portable_equals_tensorflow(pedestrian_model, shared_dir):
    import onnxruntime as ort

    from conftest import open_model
    from plugin import ort_ops
    from utils.converter import convert
    from utils.preprocess import load_image, preprocess
    from utils.runtime import valid_rows

    voc = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:8]
    paths = sorted(IMAGES_DIR.glob("*.jpg")) + voc
    batch = np.stack([preprocess(load_image(path)) for path in paths])
    count = len(paths)

    plugins = ort_ops.inference_session(convert(pedestrian_model, "trt-plugins").onnx_path)
    nms_out, nms_count = plugins.run(None, {"Input": batch})
    results = {"trt-plugins": (nms_out.reshape(count, -1, 7), nms_count.reshape(count))}
    portable = ort.InferenceSession(str(convert(pedestrian_model, "portable").onnx_path),
                                    providers=["CPUExecutionProvider"])
    results["portable"] = tuple(portable.run(None, {"Input": batch}))
    with open_model(pedestrian_model, "tensorflow", batch_size=count) as reference:
        results["tensorflow"] = reference.detect(batch)

    reference_rows = [valid_rows(d, n, 0.3) for d, n in zip(*results["tensorflow"])]
    assert sum(len(rows) for rows in reference_rows) > 0
    for name in ("trt-plugins", "portable"):
        worst = 0.0
        for index, (detections, found) in enumerate(zip(*results[name])):
            rows, expected = valid_rows(detections, found, 0.3), reference_rows[index]
            assert rows.shape == expected.shape, f"{name}, {paths[index].name}: {len(rows)} vs {len(expected)}"
            np.testing.assert_array_equal(rows[:, :2], expected[:, :2])
            np.testing.assert_allclose(rows[:, 2:], expected[:, 2:], atol=1e-3, rtol=0)
            worst = max([worst, *np.abs(rows[:, 2:] - expected[:, 2:]).reshape(-1)])
        print(f"{name} vs TF on {count} photos: max |score or box| diff {worst:.1e}")
