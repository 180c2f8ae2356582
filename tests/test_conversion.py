"""The converter against TensorFlow itself: anchors, the ONNX graph's outputs, batching, specs."""

import numpy as np
import onnx
import pytest

from conftest import IMAGES_DIR, open_model
from parity import assert_same_detections
from utils import tf_graph
from utils.anchors import grid_anchors
from utils.converter import NmsOverrides, convert, read_spec
from utils.errors import UserError
from utils.models import resolve_model
from utils.preprocess import load_image, preprocess
from utils.runtime import valid_rows

pytestmark = pytest.mark.tensorflow

PHOTOS = ["person.jpg", "kite.jpg", "dog.jpg", "horses.jpg"]


def _batch(paths) -> np.ndarray:
    return np.stack([preprocess(load_image(path)) for path in paths])


def _photos(shared_dir) -> list:
    voc = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:12]
    return [IMAGES_DIR / name for name in PHOTOS] + voc


@pytest.mark.parametrize("model_fixture", ["pedestrian_model", pytest.param("inception_model", marks=pytest.mark.slow)])
def test_anchors_equal_tensorflows_anchor_subgraph(model_fixture, request):
    model = request.getfixturevalue(model_fixture)
    graph_def, _, nodes, spec = read_spec(model)
    (tf_anchors,) = tf_graph.evaluate(graph_def, [nodes.anchor_concat])
    ours = grid_anchors(spec.anchors)
    assert ours.shape == tf_anchors.shape == (1917, 4)
    np.testing.assert_allclose(ours, tf_anchors, atol=1e-6, rtol=0)


def test_core_graph_has_one_input_and_no_assert_or_identity(pedestrian_model):
    _, core, _, _ = read_spec(pedestrian_model)
    ops = {node.op for node in core.node}
    assert "Assert" not in ops and "Identity" not in ops
    placeholders = [node.name for node in core.node if node.op == "Placeholder"]
    assert placeholders == ["Input"]
    assert not any(node.name.startswith(("Preprocessor/", "Postprocessor/", "MultipleGridAnchorGenerator/"))
                   for node in core.node)


def _compare_with_tensorflow(model, paths):
    """Run the ONNX (onnxruntime) and the frozen graph (tensorflow) on the same pixels: the detections above 0.3
    pair up (tests/parity.py). Returns (worst |score| difference, worst |box| difference)."""
    batch = _batch(paths)
    with open_model(model, batch_size=len(paths)) as onnx_runner, \
            open_model(model, "tensorflow", batch_size=len(paths)) as tf_runner:
        ours, our_counts = onnx_runner.detect(batch)
        ref, ref_counts = tf_runner.detect(batch)
    result = assert_same_detections(ours, our_counts, ref, ref_counts, 0.3, names=[p.name for p in paths],
                                    what="ONNX vs TensorFlow")
    assert result.paired > 0, "no detection above 0.3: the comparison would be empty"
    return result.worst_score, result.worst_box


def test_onnx_equals_tensorflow_on_real_photos(pedestrian_model, shared_dir):
    worst_score, worst_box = _compare_with_tensorflow(pedestrian_model, _photos(shared_dir))
    print(f"pedestrian ONNX vs TF: max |score| diff {worst_score:.2e}, max |box| diff {worst_box:.2e}")


def test_person_photo_finds_the_person(pedestrian_onnx, pedestrian_model):
    with open_model(pedestrian_model) as runner:
        detections, counts = runner.detect(_batch([IMAGES_DIR / "person.jpg"]))
    best = valid_rows(detections[0], counts[0], 0.5)
    assert len(best) == 1 and best[0, 1] == 1 and best[0, 2] > 0.99
    np.testing.assert_allclose(best[0, 3:], [0.286, 0.239, 0.429, 0.899], atol=0.01)  # xmin ymin xmax ymax


def test_batch_of_four_equals_four_batches_of_one(pedestrian_model):
    batch = _batch([IMAGES_DIR / name for name in PHOTOS])
    with open_model(pedestrian_model, batch_size=4) as runner:
        together, together_counts = runner.detect(batch)
        alone_runs = [runner.detect(batch[index:index + 1]) for index in range(4)]
    for index, (alone, alone_counts) in enumerate(alone_runs):
        assert together_counts[index] == alone_counts[0]
        # image_id is the position in the batch; everything else must match
        np.testing.assert_allclose(together[index, :, 1:], alone[0, :, 1:], atol=1e-5)
        assert (together[index, :, 0] == index).all() and (alone[0, :, 0] == 0).all()


@pytest.mark.slow
def test_inception_graph_converts_with_the_contract_shapes(inception_onnx, inception_model, shared_dir):
    model = onnx.load(str(inception_onnx.onnx_path), load_external_data=False)
    (graph_input,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "Input" and dims[1:] == [3, 300, 300] and isinstance(dims[0], str)
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs["detections"][1:] == [100, 7] and len(outputs["num_detections"]) == 1
    assert inception_onnx.spec.num_classes == 91
    # and it runs, equal to TensorFlow on the random-weight stand-in as well
    _compare_with_tensorflow(inception_model, [IMAGES_DIR / "dog.jpg", IMAGES_DIR / "kite.jpg"])


def test_nms_overrides_reach_the_graph(pedestrian_model, tmp_path):
    converted = convert(pedestrian_model, nms=NmsOverrides(keep_top_k=10, score_threshold=0.2),
                        output=tmp_path / "small.onnx")
    assert converted.spec.nms.keep_top_k == 10
    import onnxruntime as ort

    session = ort.InferenceSession(str(converted.onnx_path), providers=["CPUExecutionProvider"])
    detections, counts = session.run(None, {"Input": _batch([IMAGES_DIR / "kite.jpg"])})
    assert detections.shape == (1, 10, 7)
    assert (detections[0, : counts[0], 2] > 0.2).all()
    assert (detections[0, counts[0]:, 1] == -1).all()


def test_cached_onnx_is_reused_and_rebuilt_when_the_key_changes(pedestrian_model, tmp_path):
    target = tmp_path / "cached.onnx"
    first = convert(pedestrian_model, output=target)
    again = convert(pedestrian_model, output=target)
    changed = convert(pedestrian_model, output=target, nms=NmsOverrides(iou_threshold=0.5))
    assert first.built and not again.built and changed.built
    assert changed.spec.nms.iou_threshold == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cached.convert.json", "cached.onnx"]
    # a cached file that is not the one converted (here: truncated) is converted again, never reused
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    repaired = convert(pedestrian_model, output=target, nms=NmsOverrides(iou_threshold=0.5))
    assert repaired.built and repaired.artifact.spec == changed.spec


def test_the_onnx_describes_itself(pedestrian_model, tmp_path):
    """spec, flavour, precision, model name and labels travel inside the ONNX (metadata_props)."""
    from utils.artifact import METADATA_KEY, read_onnx

    converted = convert(pedestrian_model, "core", output=tmp_path / "alone.onnx")
    (tmp_path / "alone.convert.json").unlink()            # the cache key is not needed to run the file
    artifact = read_onnx(tmp_path / "alone.onnx")
    assert artifact == converted.artifact
    assert (artifact.flavour, artifact.precision, artifact.model) == ("core", "FP32", pedestrian_model.name)
    assert artifact.labels == {1: "person"} and artifact.spec.num_anchors == 1917
    props = {p.key for p in onnx.load(str(tmp_path / "alone.onnx"), load_external_data=False).metadata_props}
    assert METADATA_KEY in props


def test_pipeline_config_that_contradicts_the_graph_is_refused(pedestrian_model, tmp_path):
    folder = tmp_path / "mismatched"
    folder.mkdir()
    (folder / "frozen_inference_graph.pb").symlink_to(pedestrian_model.graph_path)
    (folder / "pipeline.config").write_text("model { ssd { num_classes: 90 } }")
    model = resolve_model(str(folder), tmp_path / "ws")
    with pytest.raises(UserError, match="num_classes 90"):
        read_spec(model)


def test_our_preprocessing_equals_the_graphs_own(pedestrian_model, shared_dir):
    """Original uint8 photos through the untouched graph (its own resize) == our resize + the graph from ToFloat."""
    from utils.runtime.tensorflow import OUTPUTS, to_nms_trt_form

    backend = open_model(pedestrian_model, "tensorflow")
    session = backend.session
    for path in _photos(shared_dir)[:8]:
        image = load_image(path)
        reference = to_nms_trt_form(*session.run([f"{name}:0" for name in OUTPUTS],
                                                 {"image_tensor:0": np.asarray(image)[None]}))
        ours = backend.detect(preprocess(image)[None])
        assert_same_detections(ours[0], ours[1], reference[0], reference[1], 0.3, names=[path.name],
                               what="our resize vs the graph's", score_tol=1e-3)


@pytest.mark.parametrize("model_fixture", ["pedestrian_model", pytest.param("inception_model", marks=pytest.mark.slow)])
def test_core_flavour_plus_numpy_nms_equals_portable(model_fixture, request, shared_dir):
    """The `core` graph (no NMS inside) + utils.postprocess.multiclass_nms == the portable graph."""
    import onnxruntime as ort

    from utils.postprocess import multiclass_nms

    model = request.getfixturevalue(model_fixture)
    core, portable = convert(model, "core"), convert(model, "portable")
    paths = _photos(shared_dir)[: 16 if model_fixture == "pedestrian_model" else 4]
    batch = _batch(paths)
    boxes, scores = ort.InferenceSession(str(core.onnx_path), providers=["CPUExecutionProvider"]).run(
        ["boxes", "scores"], {"Input": batch})
    assert boxes.shape == (len(paths), 1917, 4) and scores.shape == (len(paths), 1917, core.spec.num_classes)
    ours, our_counts = multiclass_nms(boxes, scores, core.spec.nms)
    theirs, their_counts = ort.InferenceSession(str(portable.onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"Input": batch})
    np.testing.assert_array_equal(our_counts, their_counts)
    np.testing.assert_array_equal(ours[..., :2], theirs[..., :2])
    np.testing.assert_allclose(ours[..., 2], theirs[..., 2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[..., 3:], theirs[..., 3:], atol=1e-5, rtol=0)
