"""utils.voc: devkit AP on hand-worked cases, result files, the VOC2007 folder, COCO -> VOC."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from utils.errors import UserError
from utils.labels import COCO_LABELS, VOC_CLASSES
from utils.voc import (GroundTruth, VocDataset, VocImage, average_precision_11pt,
                       default_voc_dir, detections_to_voc, evaluate, evaluate_class, load_dataset,
                       mean_ap, read_results, write_results)


def image(image_id: str, *objects: GroundTruth) -> VocImage:
    return VocImage(image_id, Path(f"{image_id}.jpg"), 500, 400, objects)


def gt(box: tuple[float, float, float, float], name: str = "dog", difficult: bool = False) -> GroundTruth:
    return GroundTruth(name, box, difficult)


A, B, C, D = (10, 10, 59, 59), (100, 100, 199, 149), (300, 50, 399, 249), (20, 200, 119, 299)
# Image "a" has dogs A, B, C; image "b" has dog D; image "c" only a cat.
IMAGES = [image("a", gt(A), gt(B), gt(C)), image("b", gt(D)), image("c", gt(A, "cat"))]


def shifted(box: tuple[float, float, float, float], dx: float = 2.0) -> tuple[float, ...]:
    return tuple(value + dx for value in box)


def test_perfect_detector_has_ap_1():
    result = evaluate_class("dog", IMAGES, [("a", 0.9, *A), ("a", 0.8, *B), ("a", 0.7, *C), ("b", 0.6, *D)])
    assert result.ap == 1.0
    assert result.num_positives == 4 and result.num_detections == 4
    np.testing.assert_allclose(result.recall, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(result.precision, 1.0)


def test_mixed_tp_fp_by_hand():
    # Sorted by score (the input order is shuffled):
    #   0.9 A      TP  rec 1/4  prec 1/1
    #   0.8 b, D shifted far (IoU 0) FP  rec 1/4  prec 1/2
    #   0.7 B      TP  rec 2/4  prec 2/3
    #   0.6 A'     FP (second hit on A)  rec 2/4  prec 2/4
    #   0.5 D      TP  rec 3/4  prec 3/5
    # C is never found. 11-point: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6, .7 -> 3/5;
    # t = .8, .9, 1 -> 0.  AP = (3 * 1 + 3 * 2/3 + 2 * 3/5) / 11 = 6.2 / 11.
    detections = [("b", 0.5, *D), ("a", 0.7, *B), ("a", 0.9, *A), ("b", 0.8, *shifted(D, 150)),
                  ("a", 0.6, *shifted(A))]
    result = evaluate_class("dog", IMAGES, detections)
    np.testing.assert_allclose(result.recall, [0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(result.precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    assert result.ap == pytest.approx(6.2 / 11)


def test_duplicate_is_a_false_positive():
    images = [image("a", gt(A), gt(B))]
    # 0.9 A TP (rec .5, prec 1); 0.8 A again FP (.5, .5); 0.7 B TP (1, 2/3).
    # t = 0 .. .5 -> 1 (6 points); t = .6 .. 1 -> 2/3 (5 points): AP = (6 + 10/3) / 11 = 28/33.
    result = evaluate_class("dog", images, [("a", 0.9, *A), ("a", 0.8, *shifted(A)), ("a", 0.7, *B)])
    np.testing.assert_allclose(result.precision, [1, 1 / 2, 2 / 3])
    assert result.ap == pytest.approx(28 / 33)


def test_best_overlap_already_taken_is_a_false_positive_as_in_the_devkit():
    # Two overlapping dogs; the second detection overlaps the matched one most, the other by > 0.5.
    left, right = (0, 0, 99, 99), (20, 0, 119, 99)
    images = [image("a", gt(left), gt(right))]
    result = evaluate_class("dog", images, [("a", 0.9, *left), ("a", 0.8, 5, 0, 104, 99)])
    np.testing.assert_allclose(result.recall, [0.5, 0.5])
    np.testing.assert_allclose(result.precision, [1.0, 0.5])


def test_detection_on_a_difficult_object_is_ignored():
    images = IMAGES + [image("d", gt(B, difficult=True))]
    detections = [("b", 0.5, *D), ("a", 0.7, *B), ("a", 0.9, *A), ("b", 0.8, *shifted(D, 150))]
    plain = evaluate_class("dog", images, detections)
    with_difficult = evaluate_class("dog", images, detections + [("d", 0.95, *B), ("d", 0.6, *B)])
    assert plain.num_positives == with_difficult.num_positives == 4  # the difficult dog is no positive
    assert with_difficult.ap == plain.ap
    assert with_difficult.recall.max() == plain.recall.max()
    # Ignored rows keep the running values: nothing is counted at 0.95, and nothing extra at 0.6.
    np.testing.assert_allclose(with_difficult.precision, [0, 1, 1 / 2, 2 / 3, 2 / 3, 3 / 4])


def test_detection_on_image_without_the_class_is_fp_and_unknown_image_ignored():
    perfect = [("a", 0.9, *A), ("a", 0.8, *B), ("a", 0.7, *C), ("b", 0.6, *D)]
    # Image "c" has no dog: a FP ranked first. The best precision at any recall is then 4/5 (at recall 1).
    on_cat_image = evaluate_class("dog", IMAGES, [("c", 0.95, *A)] + perfect)
    np.testing.assert_allclose(on_cat_image.recall, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(on_cat_image.precision, [0, 1 / 2, 2 / 3, 3 / 4, 4 / 5])
    assert on_cat_image.ap == pytest.approx(4 / 5)
    # Image "zzz" is not in the set: its ground truth is unknown, so its detection does not count.
    unknown = evaluate_class("dog", IMAGES, [("zzz", 0.95, *A)] + perfect)
    assert unknown.ap == 1.0 and unknown.num_detections == 4


def test_class_without_ground_truth_is_none_and_left_out_of_mean_ap():
    images = IMAGES + [image("d", gt(B, "bird", difficult=True))]
    dataset = VocDataset(Path("."), "test", images, [])
    detections = {"dog": [("a", 0.9, *A), ("a", 0.8, *B), ("b", 0.6, *D)], "bird": [("d", 0.9, *B)],
                  "horse": [("a", 0.5, *A)]}
    results = {result.name: result for result in evaluate(dataset, detections)}
    assert list(results) == list(VOC_CLASSES)
    assert results["bird"].ap is None and results["horse"].ap is None and results["sheep"].ap is None
    assert results["dog"].ap == pytest.approx((8 * 1.0) / 11)  # recall reaches 3/4
    assert results["cat"].ap == 0.0
    assert mean_ap(list(results.values())) == pytest.approx((8 / 11 + 0.0) / 2)
    assert mean_ap(list(results.values()), detectable={"dog", "bird"}) == pytest.approx(8 / 11)
    assert np.isnan(mean_ap([]))


def test_average_precision_11pt_edges():
    assert average_precision_11pt(np.array([]), np.array([])) == 0.0
    assert average_precision_11pt(np.array([1.0]), np.array([0.5])) == pytest.approx(0.5)
    # Recall 0.3 reaches t = 0.3 only with the devkit's floating thresholds (0.30000000000000004 > 0.3).
    assert average_precision_11pt(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11)


def test_results_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    detections = {
        "dog": [(image_id, float(rng.random()), *(np.array(box) + rng.uniform(-0.04, 0.04, 4)))
                for image_id, box in [("a", A), ("a", B), ("a", shifted(A)), ("b", D), ("c", C)]],
        "cat": [("c", 0.123456789, *A)],
    }
    paths = write_results(tmp_path, "test", detections)
    assert sorted(paths) == sorted(tmp_path.iterdir())  # 20 complete files and no temporary ones
    assert [path.name for path in paths] == [f"det_test_{name}.txt" for name in VOC_CLASSES]
    assert (tmp_path / "det_test_bird.txt").read_text() == ""
    assert (tmp_path / "det_test_cat.txt").read_text() == "c 0.123457 10.0 10.0 59.0 59.0\n"

    back = read_results(tmp_path, "test")
    assert set(back) == set(VOC_CLASSES) and back["bird"] == []
    for name, entries in detections.items():
        assert [entry[0] for entry in back[name]] == [entry[0] for entry in entries]
        read = np.array([entry[1:] for entry in back[name]])
        written = np.array([entry[1:] for entry in entries])
        np.testing.assert_allclose(read[:, 0], written[:, 0], atol=5e-7)  # scores: 6 decimals
        np.testing.assert_allclose(read[:, 1:], written[:, 1:], atol=0.05)  # boxes: 1 decimal
    dataset = VocDataset(tmp_path, "test", IMAGES, [])
    assert [r.ap for r in evaluate(dataset, back)] == [r.ap for r in evaluate(dataset, detections)]


def test_read_results_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="det_test_aeroplane.txt"):
        read_results(tmp_path, "test")


def test_write_results_refuses_unknown_class(tmp_path):
    with pytest.raises(ValueError, match="zebra"):
        write_results(tmp_path, "test", {"zebra": []})


def test_detections_to_voc_maps_coco_names():
    rows = np.array([
        [0, 1, 0.9, 0.1, 0.2, 0.5, 0.6],    # person
        [0, 5, 0.8, 0.0, 0.0, 1.0, 1.0],    # airplane -> aeroplane
        [0, 64, 0.7, 0.25, 0.5, 0.75, 1.0],  # potted plant -> pottedplant
        [0, 10, 0.6, 0.1, 0.1, 0.2, 0.2],   # traffic light: no VOC class
        [0, 1, 0.5, 0.0, 0.0, 0.5, 0.5],    # person
    ])
    voc = detections_to_voc(rows, width=200, height=100, label_map=COCO_LABELS)
    assert set(voc) == {"person", "aeroplane", "pottedplant"}
    # The devkit's 1-based pixels: x * width + 1 (py-faster-rcnn's writer adds 1 to every coordinate).
    np.testing.assert_allclose(voc["person"], [[0.9, 21, 21, 101, 61], [0.5, 1, 1, 101, 51]])
    np.testing.assert_allclose(voc["aeroplane"], [[0.8, 1, 1, 201, 101]])
    np.testing.assert_allclose(voc["pottedplant"], [[0.7, 51, 51, 151, 101]])
    assert detections_to_voc(np.zeros((0, 7)), 200, 100, COCO_LABELS) == {}


def test_result_files_are_in_the_devkits_one_based_pixels(tmp_path):
    # A detector whose continuous box is the ground truth's less one pixel (0-based, as py-faster-rcnn and
    # mmdetection read the XML) lands exactly on the ground truth in the result file.
    width, height = 353, 500
    truth = (48.0, 240.0, 195.0, 371.0)                     # 000001's dog, 1-based as in its XML
    normalised = [(truth[0] - 1) / width, (truth[1] - 1) / height, (truth[2] - 1) / width, (truth[3] - 1) / height]
    voc = detections_to_voc(np.array([[0, 18, 0.9, *normalised]]), width, height, COCO_LABELS)
    write_results(tmp_path, "test", {"dog": [("000001", *map(float, row)) for row in voc["dog"]]})
    assert (tmp_path / "det_test_dog.txt").read_text() == "000001 0.900000 48.0 240.0 195.0 371.0\n"
    back = read_results(tmp_path, "test")["dog"]
    result = evaluate_class("dog", [image("000001", gt(truth))], back)
    assert result.ap == 1.0


def test_without_drops_the_images_and_their_ground_truth():
    dataset = VocDataset(Path("."), "test", IMAGES, ["x: missing image"])
    perfect = {"dog": [("a", 0.9, *A), ("a", 0.8, *B), ("a", 0.7, *C)]}   # misses b's dog D
    assert evaluate(dataset, perfect)[VOC_CLASSES.index("dog")].num_positives == 4
    less = dataset.without(["b"])
    assert [item.image_id for item in less.images] == ["a", "c"] and less.skipped == dataset.skipped
    dog = evaluate(less, perfect)[VOC_CLASSES.index("dog")]
    assert dog.num_positives == 3 and dog.ap == 1.0
    assert [item.image_id for item in dataset.images] == ["a", "b", "c"]   # unchanged


def test_default_voc_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("VOC_DIR", raising=False)
    assert default_voc_dir(tmp_path) == tmp_path / "VOCdevkit" / "VOC2007"
    monkeypatch.setenv("VOC_DIR", "/data/voc")
    assert default_voc_dir(tmp_path) == Path("/data/voc")


def test_missing_folder_is_a_one_line_user_error(tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):  # no folder; a folder without ImageSets/Main/test.txt
        with pytest.raises(UserError) as error:
            load_dataset(root)
        message = str(error.value)
        assert "\n" not in message and "VOC_DIR" in message and "--voc-dir" in message
        assert str(root) in message


@pytest.fixture(scope="module")
def voc_root(shared_dir) -> Path:
    return shared_dir / "data" / "VOCdevkit" / "VOC2007"


def test_shared_dataset_loads(voc_root):
    dataset = load_dataset(voc_root)
    assert len(dataset.images) == 300 and dataset.skipped == []
    objects = [obj for item in dataset.images for obj in item.objects]
    assert sum(obj.name == "person" and not obj.difficult for obj in objects) == 258
    assert sum(not obj.difficult for obj in objects) == 701
    assert sum(obj.difficult for obj in objects) == 174
    first = dataset.images[0]
    assert (first.image_id, first.width, first.height) == ("000001", 353, 500)
    assert first.objects[0] == GroundTruth("dog", (48.0, 240.0, 195.0, 371.0), False)
    assert len(load_dataset(voc_root, limit=10).images) == 10


def test_ground_truth_as_detections_gives_ap_1(voc_root):
    dataset = load_dataset(voc_root)
    detections = {name: [] for name in VOC_CLASSES}
    for item in dataset.images:
        for obj in item.objects:  # difficult ones included: they must be ignored
            detections[obj.name].append((item.image_id, 1.0, *obj.box))
    results = evaluate(dataset, detections)
    assert all(result.num_positives > 0 for result in results)
    assert [result.ap for result in results] == [1.0] * len(VOC_CLASSES)
    assert mean_ap(results) == 1.0


def test_broken_images_are_skipped_with_reasons(voc_root, tmp_path):
    ids = ["000001", "000002", "000003", "000006", "000008", "000010"]
    for folder, suffix in (("Annotations", "xml"), ("JPEGImages", "jpg")):
        (tmp_path / folder).mkdir()
        for image_id in ids:
            shutil.copy(voc_root / folder / f"{image_id}.{suffix}", tmp_path / folder)
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    xml = tmp_path / "Annotations" / "000002.xml"
    xml.write_text(xml.read_text()[:200])  # malformed: cut short
    (tmp_path / "Annotations" / "000003.xml").unlink()
    (tmp_path / "JPEGImages" / "000006.jpg").unlink()
    xml = tmp_path / "Annotations" / "000008.xml"
    xml.write_text(xml.read_text().replace("<xmax>", "<xmaxx>").replace("</xmax>", "</xmaxx>"))

    dataset = load_dataset(tmp_path)
    assert [item.image_id for item in dataset.images] == ["000001", "000010"]
    assert len(dataset.skipped) == 4
    reasons = dict(reason.split(": ", 1) for reason in dataset.skipped)
    assert reasons["000002"].startswith("malformed annotation (")
    assert reasons["000003"].startswith("missing annotation") and "000003.xml" in reasons["000003"]
    assert reasons["000006"].startswith("missing image") and "000006.jpg" in reasons["000006"]
    assert reasons["000008"] == "incomplete annotation (no bndbox/xmax)"
    assert all("\n" not in reason for reason in dataset.skipped)


def test_image_list_that_is_not_utf8_is_one_line(tmp_path):
    """Issue 16, item 6: a split list that is not UTF-8 is a one-line UserError, not a traceback."""
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_bytes(b"000001\n\xff\xfe\x00garbage\n")
    with pytest.raises(UserError, match="is not UTF-8 text") as info:
        load_dataset(tmp_path, "test")
    assert "\n" not in str(info.value)
