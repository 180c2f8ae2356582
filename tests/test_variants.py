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


def _compare_with_tensorflow(model, flavour: str, paths) -> tuple[int, float]:
    """Detections above 0.3 of the ONNX (onnxruntime) == the frozen graph's (TensorFlow) on the same pixels; the
    top-100 scores too. Returns (detections above 0.3, worst |score or box| difference)."""
    from utils.runtime import valid_rows

    with open_model(model, flavour=flavour, batch_size=len(paths)) as ours_runner, \
            open_model(model, "tensorflow", batch_size=len(paths)) as tf_runner:
        batch = _batch(paths, ours_runner.spec.input_size)
        ours, our_counts = ours_runner.detect(batch)
        ref, ref_counts = tf_runner.detect(batch)
    found, worst = 0, 0.0
    for index, path in enumerate(paths):
        mine, theirs = valid_rows(ours[index], our_counts[index], 0.3), valid_rows(ref[index], ref_counts[index], 0.3)
        assert mine.shape == theirs.shape, f"{path.name}: {len(mine)} vs {len(theirs)} detections above 0.3"
        np.testing.assert_array_equal(mine[:, :2], theirs[:, :2])
        np.testing.assert_allclose(mine[:, 2:], theirs[:, 2:], atol=1e-3, rtol=0)
        count = min(our_counts[index], ref_counts[index])
        np.testing.assert_allclose(ours[index, :count, 2], ref[index, :count, 2], atol=1e-3, rtol=0)
        found += len(mine)
        worst = max([worst, *np.abs(mine[:, 2:] - theirs[:, 2:]).reshape(-1)])
    return found, worst


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["portable", "core"])
@pytest.mark.parametrize("model_fixture", ["nonsquare_model", "fpn_model"])
def test_onnx_equals_tensorflow_on_real_photos(model_fixture, flavour, request, shared_dir):
    model = request.getfixturevalue(model_fixture)
    paths = _fpn_photos(shared_dir) if model_fixture == "fpn_model" else _photos(shared_dir)
    found, worst = _compare_with_tensorflow(model, flavour, paths)
    assert found > 0, "no detection above 0.3: the comparison would be empty"
    print(f"{model.name} {flavour} vs TF on {len(paths)} photos: {found} detections above 0.3, "
          f"max |score or box| diff {worst:.1e}")


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
    4096 of the 51150 anchors; zero-area rows dropped after it)."""
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
