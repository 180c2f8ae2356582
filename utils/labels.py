"""Class names: COCO (as in the TF Object Detection API's mscoco_label_map), person-only, VOC2007."""

from typing import Mapping

# The 80 COCO categories keyed by their ids in 1..90; ids 12, 26, 29, 30, 45, 66, 68, 69, 71
# and 83 are unused.
COCO_LABELS: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

PERSON_LABELS: dict[int, str] = {1: "person"}

# The 20 PASCAL VOC2007 classes in the devkit's order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# COCO name -> VOC2007 name, for the 20 COCO categories that are VOC classes.
COCO_TO_VOC: dict[str, str] = {
    "airplane": "aeroplane", "motorcycle": "motorbike", "couch": "sofa",
    "dining table": "diningtable", "potted plant": "pottedplant", "tv": "tvmonitor",
    **{name: name for name in ("bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                               "cow", "dog", "horse", "person", "sheep", "train")},
}

_NAMED_MAPS = {"coco": COCO_LABELS, "person": PERSON_LABELS}


def label_map_for(labels: str | None, num_classes: int) -> dict[int, str]:
    """The label map named by ``labels`` ("coco" or "person"); None guesses COCO for 91 classes, else {}."""
    if labels is None:
        return COCO_LABELS if num_classes == 91 else {}
    if labels not in _NAMED_MAPS:
        raise ValueError(f"unknown label set {labels!r}; use one of: {', '.join(_NAMED_MAPS)}")
    return _NAMED_MAPS[labels]


def label_name(label_map: Mapping[int, str], label: int) -> str:
    """The class name of ``label``, or ``class_<id>`` when the map has none."""
    label = int(label)
    return label_map.get(label, f"class_{label}")
