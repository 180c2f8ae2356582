"""TF OD API SSD variants beyond the square 300x300 SSD: a non-square input (SSD MobileNetV1 at 640x360, custom
label map) and an FPN (SSD MobileNetV1-FPN at 640x640: multiscale anchors, weight-shared box predictor).

The graphs come from tools/make_ssd_graphs.py (random weights, the OD API's node names, anchors computed in
the graph by TF ops, the OD API's post-processing), so TensorFlow running them is the reference.
"""

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import IMAGES_DIR, WORKSPACE, open_model
from parity import assert_same_detections
from utils.ssd_spec import AnchorSpec, SsdSpec

CUSTOM_NAMES = {1: "pallet", 2: "forklift", 3: "hard hat"}


def _photos(shared_dir) -> list:
    return sorted((shared_dir / "images").glob("*.jpg")) + sorted(IMAGES_DIR.glob("*.jpg"))


def _fpn_photos(shared_dir) -> list:
    """Fewer photos for the FPN (51150 anchors, 90 classes: about a second a photo in TensorFlow here)."""
    return [shared_dir / "images" / "eagle.jpg", shared_dir / "images" / "giraffe.jpg", IMAGES_DIR / "person.jpg"]


def _batch(paths, input_size) -> np.ndarray:
    from utils.preprocess import load_image, preprocess

    return np.stack([preprocess(load_image(path), input_size) for path in paths])


def test_specs_written_before_the_multiscale_fields_still_load():
    spec = SsdSpec(num_classes=3, input_size=(300, 300), anchors=AnchorSpec(feature_map_shapes=((19, 19), (10, 10))))
    old = spec.to_dict()
    for key in ("generator", "min_level", "max_level", "anchor_scale", "scales_per_octave"):
        del old["anchors"][key]
    assert SsdSpec.from_dict(old) == spec and not spec.anchors.multiscale
    fpn = SsdSpec(num_classes=3, input_size=(640, 640), anchors=AnchorSpec(
        generator="multiscale", aspect_ratios=(1.0, 2.0, 0.5), feature_map_shapes=((80, 80), (40, 40))))
    assert SsdSpec.from_dict(fpn.to_dict()) == fpn and fpn.num_anchors == (6400 + 1600) * 6


@pytest.mark.tensorflow
@pytest.mark.parametrize("model_fixture", ["nonsquare_model", pytest.param("fpn_model", marks=pytest.mark.slow)])
def test_anchors_equal_tensorflows_anchor_subgraph(model_fixture, request):
    from utils import tf_graph
    from utils.anchors import anchor_boxes
    from utils.converter import read_spec

    graph_def, _, nodes, spec = read_spec(request.getfixturevalue(model_fixture))
    (tf_anchors,) = tf_graph.evaluate(graph_def, [nodes.anchor_concat])
    if model_fixture == "nonsquare_model":
        assert spec.input_size == (640, 360) and not spec.anchors.multiscale
        assert spec.anchors.feature_map_shapes == ((23, 40), (12, 20), (6, 10), (3, 5), (2, 3), (1, 2))
    else:
        assert spec.input_size == (640, 640) and spec.anchors.multiscale
        assert spec.anchors.feature_map_shapes == ((80, 80), (40, 40), (20, 20), (10, 10), (5, 5))
        assert nodes.predictor_heads[1] == ("WeightSharedConvolutionalBoxPredictor_1/BoxPredictor/BiasAdd",
                                            "WeightSharedConvolutionalBoxPredictor_1/ClassPredictor/BiasAdd")
    ours = anchor_boxes(spec)
    assert ours.shape == tf_anchors.shape == (spec.num_anchors, 4)
    np.testing.assert_allclose(ours, tf_anchors, atol=1e-5, rtol=0)


def _compare_with_tensorflow(model, flavour: str, paths, backend: str = "onnxruntime"):
    """Detections above 0.3 of the ONNX (``backend``) and of the frozen graph (TensorFlow) on the same pixels pair
    up (tests/parity.py); returns the Comparison."""
    with open_model(model, backend, flavour=flavour, precision="FP32", batch_size=len(paths)) as ours_runner, \
            open_model(model, "tensorflow", batch_size=len(paths)) as tf_runner:
        batch = _batch(paths, ours_runner.spec.input_size)
        ours, our_counts = ours_runner.detect(batch)
        ref, ref_counts = tf_runner.detect(batch)
    result = assert_same_detections(ours, our_counts, ref, ref_counts, 0.3, names=[path.name for path in paths],
                                    what=f"{model.name} {flavour} on {backend} vs TensorFlow")
    assert result.paired > 0, "no detection above 0.3: the comparison would be empty"
    return result


def _voc_photos(shared_dir, count: int = 8) -> list:
    """VOC photos (non-square, objects at the borders: boxes that cross the image's edge)."""
    return sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:count]


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["portable", "core"])
@pytest.mark.parametrize("model_fixture", ["nonsquare_model", "fpn_model"])
def test_onnx_equals_tensorflow_on_real_photos(model_fixture, flavour, request, shared_dir):
    model = request.getfixturevalue(model_fixture)
    paths = _fpn_photos(shared_dir) if model_fixture == "fpn_model" else _photos(shared_dir)
    result = _compare_with_tensorflow(model, flavour, paths)
    print(f"{model.name} {flavour} vs TF on {len(paths)} photos: {result.paired} detections above 0.3 paired, "
          f"max |score| diff {result.worst_score:.1e}, |box| {result.worst_box:.1e}")


# Every post-processing generation (clip before NMS in 2017 and 2018, after it since tensorflow/models 59f7e80a,
# 2018-08-07) x flavour x runtime, against TF.
GENERATIONS = [("clip_2017_model", "before_nms"), ("clip_2017_square_model", "before_nms"),
               ("clip_2018_model", "before_nms"), ("nonsquare_model", "after_nms")]
RUNTIMES = [("portable", "onnxruntime"), ("core", "onnxruntime"), ("core", "openvino"), ("trt-plugins", "onnxruntime")]


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize(("flavour", "backend"), RUNTIMES)
@pytest.mark.parametrize(("model_fixture", "clip_order"), GENERATIONS)
def test_every_flavour_equals_tensorflow_where_boxes_cross_the_border(model_fixture, clip_order, flavour, backend,
                                                                       request, shared_dir):
    """VOC photos, where boxes reach past the image's edge, so where the graph clips (before or after NMS) decides
    which boxes NMS keeps: each flavour and runtime gives TensorFlow's detections for each generation."""
    model = request.getfixturevalue(model_fixture)
    result = _compare_with_tensorflow(model, flavour, _voc_photos(shared_dir), backend)
    with open_model(model, backend, flavour=flavour, precision="FP32") as runner:
        assert runner.spec.nms.clip_order == clip_order
    print(f"{model.name} ({clip_order}) {flavour} on {backend}: {result.paired} paired, {len(result.excused)} "
          f"excused, max |score| diff {result.worst_score:.1e}")


@pytest.mark.tensorflow
@pytest.mark.parametrize("change", ["no NMS", "no clipping"])
def test_a_graph_whose_clip_order_cannot_be_read_is_refused_in_one_line(nonsquare_model, change, tmp_path, capsys):
    """Where the post-processing clips cannot be read from the graph, model.py says so in one line, exit 2, and
    writes nothing (no guess)."""
    import model as model_script
    from utils import tf_graph

    graph_def = tf_graph.load_graph_def(nonsquare_model.graph_path)
    for node in graph_def.node:
        if change == "no NMS" and node.op in tf_graph.NMS_OPS:
            node.op = "CombinedNonMaxSuppression"     # another NMS than the OD API's per-class one
        if change == "no clipping" and "ClipToWindow" in node.name and node.op in ("Minimum", "Maximum"):
            node.op = "AddV2"                          # the window is no longer applied
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "frozen_inference_graph.pb").write_bytes(graph_def.SerializeToString())
    shutil.copy(nonsquare_model.graph_path.parent / "pipeline.config", folder)
    with pytest.raises(SystemExit) as exit_info:
        model_script.main(["-m", str(folder), "-w", str(tmp_path / "ws")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Converting ")]
    assert len(err) == 1 and "cannot read where its post-processing clips the boxes" in err[0], err
    assert not any(tmp_path.rglob("*.onnx"))


@pytest.mark.tensorflow
@pytest.mark.slow
def test_model_py_converts_a_nonsquare_model_and_its_custom_names_are_printed(nonsquare_model, shared_dir, capsys,
                                                                             tmp_path):
    import detect_objects
    import model as model_script

    folder = str(nonsquare_model.graph_path.parent)
    assert model_script.main(["-m", folder, "-w", str(WORKSPACE)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(".onnx")
    assert detect_objects.main([*map(str, _photos(shared_dir)), "-m", folder, "-w", str(WORKSPACE), "--backend",
                                "onnxruntime", "-t", "0.3", "-o", str(tmp_path)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Detected ")]
    assert printed and all(any(f"Detected {name} with" in line for name in CUSTOM_NAMES.values()) for line in printed)
    from utils.artifact import read_onnx

    assert read_onnx(out.strip().splitlines()[-1]).labels == CUSTOM_NAMES


@pytest.mark.tensorflow
@pytest.mark.slow
def test_trt_plugins_flavour_carries_multiscale_anchors_as_constant_priors(fpn_model, caplog):
    """GridAnchor_TRT cannot express multiscale anchors: constant priors instead (one log line); NMS_TRT on them
    decodes exactly the core flavour's boxes (NMS_TRT's own semantics: each class's best topK candidates, here
    4096 of the 51150 anchors, TensorRT's most; zero-area rows dropped after it)."""
    import onnx
    import onnxruntime as ort

    from plugin import ort_ops
    from utils.converter import convert
    from utils.onnx_export import nms_fields
    from utils.postprocess import multiclass_nms

    with caplog.at_level(logging.INFO, logger="utils.onnx_export"):
        plugins = convert(fpn_model, "trt-plugins", force=True)
    said = [record.getMessage() for record in caplog.records if record.name == "utils.onnx_export"]
    assert len(said) == 1 and "GridAnchor_TRT cannot express multiscale anchors" in said[0], said
    assert "GridAnchor_TRT" not in {node.op_type for node in onnx.load(str(plugins.onnx_path)).graph.node}
    batch = _batch([IMAGES_DIR / "dog.jpg"], plugins.spec.input_size)
    nms_out, nms_count = ort_ops.inference_session(plugins.onnx_path).run(None, {"Input": batch})
    core = ort.InferenceSession(str(convert(fpn_model, "core").onnx_path), providers=["CPUExecutionProvider"])
    boxes, scores = core.run(["boxes", "scores"], {"Input": batch})
    top_k = nms_fields(plugins.spec)["topK"]
    assert top_k == 4096 < plugins.spec.num_anchors
    expected, counts = multiclass_nms(boxes, scores, replace(plugins.spec.nms, top_k=top_k), max_candidates=top_k)
    assert int(counts[0]) > 0
    assert_same_detections(nms_out, nms_count, expected, counts, what="NMS_TRT reference vs multiclass_nms")


@pytest.mark.tensorflow
def test_keep_aspect_ratio_resizer_is_refused_in_one_line(nonsquare_model, tmp_path, capsys):
    import model as model_script

    folder = tmp_path / "keep_aspect"
    folder.mkdir()
    (folder / "frozen_inference_graph.pb").symlink_to(nonsquare_model.graph_path)
    shutil.copy(nonsquare_model.graph_path.parent / "label_map.pbtxt", folder)
    (folder / "pipeline.config").write_text("model { ssd { num_classes: 3 image_resizer { keep_aspect_ratio_resizer "
                                            "{ min_dimension: 600 max_dimension: 1024 } } } }")
    with pytest.raises(SystemExit) as exit_info:
        model_script.main(["-m", str(folder), "-w", str(tmp_path / "ws")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keep_aspect_ratio_resizer" in err[0] and "fixed_shape_resizer" in err[0], err
    assert not (tmp_path / "ws" / "models").exists() or not any((tmp_path / "ws" / "models").rglob("*.onnx"))


@pytest.mark.tensorflow
@pytest.mark.slow
def test_model_py_converts_an_fpn_model(fpn_model, capsys, caplog):
    import model as model_script

    with caplog.at_level(logging.INFO):
        assert model_script.main(["-m", str(fpn_model.graph_path.parent), "-w", str(WORKSPACE)]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip().endswith("_portable_FP32.onnx")
    assert "51150 multiscale anchors on feature maps 80/40/20/10/5, input 640x640" in printed.err + caplog.text
