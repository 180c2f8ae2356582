"""batched_multiclass_nms (the batch-at-once NMS used after the core graph, numpy or torch) gives
exactly multiclass_nms's answer (the reference held equal to TF and to the portable graph)."""

import numpy as np
import pytest

from utils.postprocess import batched_multiclass_nms, multiclass_nms
from utils.ssd_spec import NmsSpec


def _random_outputs(seed: int, images: int, anchors: int, classes: int, coarse: bool):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-0.1, 1.1, (images, anchors, 2))
    sizes = rng.uniform(0.0, 0.5, (images, anchors, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], -1).astype(np.float32)
    boxes[:, ::7] = boxes[:, ::7, [2, 3, 0, 1]]             # some corners given in the wrong order
    scores = rng.uniform(0, 1, (images, anchors, classes)) ** 8
    if coarse:                                             # many exact ties
        scores = np.round(scores * 20) / 20
    return boxes, scores.astype(np.float32)


@pytest.mark.parametrize("classes,coarse,candidates", [
    (2, False, 256), (2, True, 16), (91, False, 256), (91, True, 64), (91, False, 4), (21, False, 5000),
    (91, False, 2048)])   # 2048: two images per chunk
def test_batched_nms_equals_reference_on_random_outputs(classes, coarse, candidates):
    """Random boxes (some outside the image, some with no area, corners swapped), ties, tiny
    candidate counts that force the wider second pass, and a count past MAX_CANDIDATES."""
    nms = NmsSpec(score_threshold=1e-3 if coarse else 1e-8, iou_threshold=0.5, top_k=40, keep_top_k=100)
    boxes, scores = _random_outputs(classes, 11, 600, classes, coarse)
    expected, expected_counts = multiclass_nms(boxes, scores, nms)
    got, got_counts = batched_multiclass_nms(boxes, scores, nms, candidates)
    np.testing.assert_array_equal(got_counts, expected_counts)
    np.testing.assert_array_equal(got, expected)


def test_batched_nms_with_no_candidates():
    nms = NmsSpec(score_threshold=0.5)
    boxes, scores = _random_outputs(0, 3, 50, 4, False)
    got, counts = batched_multiclass_nms(boxes, scores * 0, nms)
    assert got.shape == (3, 100, 7) and not counts.any()
    np.testing.assert_array_equal(got, multiclass_nms(boxes, scores * 0, nms)[0])


@pytest.mark.parametrize("onnx_fixture", ["pedestrian_onnx", pytest.param("inception_onnx", marks=pytest.mark.slow)])
def test_batched_nms_equals_reference_on_model_outputs(onnx_fixture, request, shared_dir):
    """The core graph's real outputs on VOC photos: the same detections, bit for bit."""
    import onnxruntime as ort

    from utils.converter import convert
    from utils.preprocess import load_image, preprocess

    converted = request.getfixturevalue(onnx_fixture)
    core = convert(request.getfixturevalue(onnx_fixture.replace("_onnx", "_model")), "core")
    voc = sorted((shared_dir / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))[:12]
    batch = np.stack([preprocess(load_image(path)) for path in voc])
    boxes, scores = ort.InferenceSession(str(core.onnx_path), providers=["CPUExecutionProvider"]).run(
        ["boxes", "scores"], {"Input": batch})
    expected = multiclass_nms(boxes, scores, converted.spec.nms)
    for candidates in (8, 256):
        got = batched_multiclass_nms(boxes, scores, converted.spec.nms, candidates)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
