"""batched_multiclass_nms (the batch-at-once NMS used after the core graph, numpy or torch) gives
exactly multiclass_nms's answer (the reference held equal to TF and to the portable graph)."""

import numpy as np
import pytest

from utils.postprocess import batched_multiclass_nms, multiclass_nms, nms_per_class
from utils.ssd_spec import CLIP_AFTER_NMS, CLIP_BEFORE_NMS, CLIP_ORDERS, NmsSpec


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


@pytest.mark.parametrize("clip_order", CLIP_ORDERS)
@pytest.mark.parametrize("classes,coarse,candidates", [
    (2, False, 256), (2, True, 16), (91, False, 256), (91, True, 64), (91, False, 4), (21, False, 5000),
    (91, False, 2048)])   # 2048: two images per chunk
def test_batched_nms_equals_reference_on_random_outputs(classes, coarse, candidates, clip_order):
    """Random boxes (some outside the image, some with no area, corners swapped), ties, tiny
    candidate counts that force the wider second pass, and a count past MAX_CANDIDATES; both clip orders."""
    nms = NmsSpec(score_threshold=1e-3 if coarse else 1e-8, iou_threshold=0.5, top_k=40, keep_top_k=100,
                  clip_order=clip_order)
    boxes, scores = _random_outputs(classes, 11, 600, classes, coarse)
    expected, expected_counts = multiclass_nms(boxes, scores, nms)
    got, got_counts = batched_multiclass_nms(boxes, scores, nms, candidates)
    np.testing.assert_array_equal(got_counts, expected_counts)
    np.testing.assert_array_equal(got, expected)


def test_clipping_before_nms_changes_what_nms_keeps():
    """The clip order matters on these outputs (boxes past the border): the two orders give different detections."""
    boxes, scores = _random_outputs(3, 4, 600, 5, False)
    after, _ = multiclass_nms(boxes, scores, NmsSpec(clip_order=CLIP_AFTER_NMS))
    before, _ = multiclass_nms(boxes, scores, NmsSpec(clip_order=CLIP_BEFORE_NMS))
    assert not np.array_equal(after, before)


@pytest.mark.parametrize("coarse", [False, True])
def test_nms_over_the_best_candidates_equals_nms_with_the_others_scored_zero(coarse):
    """max_candidates (NMS_TRT's topK) runs on each class's best K only: the same as NMS over every box with
    the scores outside those K set below the threshold."""
    boxes, scores = _random_outputs(7, 1, 900, 6, coarse)
    nms = NmsSpec(score_threshold=1e-3, iou_threshold=0.5, top_k=60)
    class_scores = scores[0, :, 1:].T
    limited = np.zeros_like(class_scores)
    best = np.argsort(-class_scores, axis=1, kind="stable")[:, :100]
    np.put_along_axis(limited, best, np.take_along_axis(class_scores, best, axis=1), axis=1)
    got = nms_per_class(boxes[0], class_scores, nms, max_candidates=100)
    expected = nms_per_class(boxes[0], limited, nms)
    for got_part, expected_part in zip(got, expected):
        np.testing.assert_array_equal(got_part, expected_part)


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


@pytest.mark.parametrize("check_every", [2, 3, 4, 7])
def test_greedy_keep_checked_every_few_steps_gives_the_same_answer(check_every):
    """Checking convergence only every few steps (as on the GPU, where a check waits for the device) keeps the
    answer bit for bit: random suppression patterns, and a chain as long as the boxes (every box suppresses the
    next), whose answer needs every step (boxes 0, 2, 4, ... kept)."""
    from utils.postprocess import _greedy_keep

    rng = np.random.default_rng(check_every)
    boxes = 64
    before = np.triu(np.ones((boxes, boxes), bool), 1)
    random = (rng.uniform(size=(9, boxes, boxes)) < 0.08) & before
    chain = np.eye(boxes, k=1, dtype=bool)[None]
    suppresses = np.concatenate([random, chain])
    alive = np.concatenate([rng.uniform(size=(9, boxes)) < 0.7, np.ones((1, boxes), bool)])
    expected = _greedy_keep(np, suppresses, alive, check_every=1)
    for image in range(len(alive)):                       # the greedy answer, box by box
        kept = []
        for box in np.flatnonzero(alive[image]):
            if not any(suppresses[image, earlier, box] for earlier in kept):
                kept.append(box)
        np.testing.assert_array_equal(np.flatnonzero(expected[image]), kept)
    np.testing.assert_array_equal(expected[-1], np.arange(boxes) % 2 == 0)
    np.testing.assert_array_equal(_greedy_keep(np, suppresses, alive, check_every=check_every), expected)
