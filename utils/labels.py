"""Class names: COCO (as in the TF Object Detection API's mscoco_label_map), person-only, VOC2007; label
map files (--labels, label_map.pbtxt beside a graph) and where a model's names come from (resolve_labels).

Where a model's label map comes from, first found wins:
  1. --labels FILE: a TF OD API label_map.pbtxt (``item { id: 1 name: 'person' display_name: 'person' }``)
     or a text file with one name per line (line 1 = class 1; a first line ``background`` is skipped);
  2. beside the graph: label_map.pbtxt, else the one *label_map*.pbtxt, else the file that pipeline.config's
     label_map_path names (looked for as written, then by its file name beside the graph);
  3. the registry's label set ("coco" / "person");
  4. COCO for a 91-class graph;
  5. none: class_N, with one warning line saying how to give names (warn_unnamed).
The map travels inside the converted file (utils.artifact), so a deployed file prints names alone.
"""

import logging
import re
from pathlib import Path
from typing import Mapping

from utils.errors import UserError

log = logging.getLogger(__name__)
LABELS_HINT = "give --labels FILE (a label_map.pbtxt or a text file with one name per line)"

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


# --- label map files --------------------------------------------------------------------------------

def load_label_file(path: Path) -> dict[int, str]:
    """{id: name} of a label_map.pbtxt (display_name preferred) or of a text file with one name per line; a
    one-line UserError (exit 2) for a file that is missing, malformed or names nothing."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the label file '{path}': {getattr(exc, 'strerror', None) or exc}; "
                        f"{LABELS_HINT}") from None
    if path.suffix.lower() == ".pbtxt" or re.match(r"(\s|#[^\n]*\n)*item\s*:?\s*[{<]", text):
        labels = _pbtxt_labels(path)
    else:
        labels = _text_labels(text)
    if not labels:
        raise UserError(f"the label file '{path}' names no class; {LABELS_HINT}")
    return labels


def _pbtxt_labels(path: Path) -> dict[int, str]:
    from utils import pbtxt  # noqa: PLC0415

    document = pbtxt.load(path, "label map")
    unknown = sorted(set(document) - {"item"})
    if unknown:
        raise UserError(f"'{path}' is not a label map: it has {', '.join(unknown)} where only item {{ ... }} "
                        f"entries are expected")
    labels: dict[int, str] = {}
    for item in document.get("item", []):
        if not isinstance(item, dict):
            raise UserError(f"'{path}': item is {item!r}, not an item {{ id: N name: '...' }} block")
        number = pbtxt.last(item, "id")
        name = pbtxt.last(item, "display_name") or pbtxt.last(item, "name")
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise UserError(f"'{path}': item id is {number!r}, must be an integer >= 1 (0 is the background)")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"'{path}': item {number} has no name (name: '...' or display_name: '...')")
        if number in labels:
            raise UserError(f"'{path}': item id {number} is given twice ({labels[number]!r} and {name!r})")
        if number > 0:   # id 0 is the background, never a detection
            labels[number] = name.strip()
    return labels


def _text_labels(text: str) -> dict[int, str]:
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if names and names[0].lower() == "background":
        names = names[1:]
    return {number: name for number, name in enumerate(names, start=1) if name}


def label_file_beside(graph_path: Path, config_label_map: str | None = None) -> Path | None:
    """The label map that belongs to a user's graph (see the module docstring, step 2), or None; a UserError
    when several *label_map*.pbtxt files make it ambiguous."""
    folder = Path(graph_path).parent
    if (folder / "label_map.pbtxt").is_file():
        return folder / "label_map.pbtxt"
    candidates = sorted(path for path in folder.glob("*label_map*.pbtxt") if path.is_file())
    if len(candidates) > 1:
        raise UserError(f"{len(candidates)} label maps beside {graph_path} ({', '.join(p.name for p in candidates)}); "
                        f"name the right one with --labels FILE")
    if candidates:
        return candidates[0]
    if config_label_map:
        written = Path(config_label_map).expanduser()
        for candidate in (written if written.is_absolute() else folder / written, folder / written.name):
            if candidate.is_file():
                return candidate
    return None


def resolve_labels(num_classes: int, labels_file: Path | None = None, graph_path: Path | None = None,
                   config_path: Path | None = None, registry: str | None = None) -> dict[int, str]:
    """The label map of a model, from the first source of the module docstring's list that has one ({} = none)."""
    explicit = model_labels(labels_file, graph_path, config_path, registry)
    if explicit is not None:
        return explicit
    return label_map_for(None, num_classes)


def model_labels(labels_file: Path | None = None, graph_path: Path | None = None, config_path: Path | None = None,
                 registry: str | None = None) -> dict[int, str] | None:
    """Steps 1 to 3 of the module docstring (what a conversion's cache key records); None when none applies."""
    if labels_file is not None:
        return load_label_file(labels_file)
    if graph_path is not None:
        config_label_map = None
        if config_path is not None:
            from utils.spec_reader import read_config  # noqa: PLC0415

            config_label_map = read_config(config_path).get("label_map_path")
        beside = label_file_beside(graph_path, config_label_map)
        if beside is not None:
            return load_label_file(beside)
    if registry is not None:
        return dict(label_map_for(registry, 0))
    return None


def warn_unnamed(labels: Mapping[int, str], num_classes: int, model: str) -> None:
    """The one warning line for a model whose classes have no names."""
    if not labels:
        last = f" ... class_{num_classes - 1}" if num_classes > 2 else ""
        log.warning(f"{model} has no class names (its classes print as class_1{last}); {LABELS_HINT}, or put a "
                    f"label_map.pbtxt beside the graph")


# --- VOC names --------------------------------------------------------------------------------------

def voc_class(name: str) -> str | None:
    """The VOC2007 class a model's class name stands for (case-insensitive; COCO's renames such as airplane ->
    aeroplane or tv -> tvmonitor kept), or None."""
    key = " ".join(re.split(r"[\s_-]+", str(name).strip().lower()))
    if key in COCO_TO_VOC:
        return COCO_TO_VOC[key]
    squeezed = key.replace(" ", "")
    return squeezed if squeezed in VOC_CLASSES else None
