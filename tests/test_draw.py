"""utils.draw: boxes, colours, tags and pixel boxes on a real photo."""

import numpy as np
import pytest
from PIL import Image

from conftest import IMAGES_DIR
from utils.draw import box_to_pixels, class_color, draw_detections
from utils.labels import COCO_LABELS


@pytest.fixture()
def dog() -> Image.Image:
    with Image.open(IMAGES_DIR / "dog.jpg") as image:
        return image.convert("RGB")


def detection(label: int, box: tuple[float, float, float, float], confidence: float = 0.9) -> list[float]:
    return [0, label, confidence, *box]


def test_draws_onto_a_copy(dog):
    before = np.asarray(dog).copy()
    drawn = draw_detections(dog, np.array([detection(18, (0.2, 0.3, 0.6, 0.9))]), COCO_LABELS)
    assert drawn is not dog
    assert np.array_equal(np.asarray(dog), before)
    assert drawn.size == dog.size and drawn.mode == "RGB"
    assert not np.array_equal(np.asarray(drawn), before)


def test_box_edges_have_the_class_colour(dog):
    width, height = dog.size
    drawn = np.asarray(draw_detections(dog, np.array([detection(18, (0.25, 0.25, 0.75, 0.75))]),
                                       COCO_LABELS))
    color = list(class_color(18))
    middle_y = height // 2
    left, right = round(0.25 * width), round(0.75 * width)
    assert drawn[middle_y, left].tolist() == color
    assert drawn[middle_y, left + 1].tolist() == color
    assert drawn[middle_y, right].tolist() == color
    assert drawn[round(0.75 * height), width // 2].tolist() == color
    # the tag sits above the box, filled with the class colour
    tag_pixels = drawn[round(0.25 * height) - 10: round(0.25 * height), left: left + 40].reshape(-1, 3)
    assert (tag_pixels == color).all(axis=1).mean() > 0.3


def test_two_labels_two_colours(dog):
    assert class_color(1) != class_color(2)
    width, height = dog.size
    rows = np.array([detection(1, (0.1, 0.2, 0.4, 0.8)), detection(2, (0.5, 0.2, 0.9, 0.8))])
    drawn = np.asarray(draw_detections(dog, rows, COCO_LABELS))
    middle_y = height // 2
    assert drawn[middle_y, round(0.1 * width)].tolist() == list(class_color(1))
    assert drawn[middle_y, round(0.5 * width)].tolist() == list(class_color(2))


def test_colours_are_deterministic_and_distinct():
    assert class_color(18) == class_color(18)
    assert len({class_color(label) for label in range(1, 91)}) == 90


def test_box_outside_the_image_draws_nothing(dog):
    drawn = draw_detections(dog, np.array([detection(3, (1.2, 0.1, 1.5, 0.5))]), COCO_LABELS)
    assert np.array_equal(np.asarray(drawn), np.asarray(dog))


def test_no_detections(dog):
    drawn = draw_detections(dog, np.zeros((0, 7), dtype=np.float32), {})
    assert drawn is not dog
    assert np.array_equal(np.asarray(drawn), np.asarray(dog))


def test_box_touching_the_edges_and_unknown_label(dog):
    drawn = np.asarray(draw_detections(dog, np.array([detection(200, (-0.1, -0.2, 1.3, 1.1))]), {}))
    color = list(class_color(200))
    height, width = drawn.shape[:2]
    assert drawn[height // 2, 0].tolist() == color
    assert drawn[height // 2, width - 1].tolist() == color
    assert drawn[height - 1, width // 2].tolist() == color


def test_grey_image_gives_rgb(dog):
    drawn = draw_detections(dog.convert("L"), np.array([detection(1, (0.1, 0.1, 0.5, 0.5))]), COCO_LABELS)
    assert drawn.mode == "RGB"


def test_box_to_pixels_clips():
    assert box_to_pixels(detection(1, (-0.1, 0.2, 1.5, 0.8)), 200, 100) == pytest.approx((0, 20, 200, 80))
    assert box_to_pixels(detection(1, (0.25, -1.0, 0.5, 2.0)), 200, 100) == pytest.approx((50, 0, 100, 100))
    assert box_to_pixels(np.array(detection(1, (0.1, 0.1, 0.2, 0.3))), 10, 10) == pytest.approx((1, 1, 2, 3))
