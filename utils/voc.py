"""PASCAL VOC2007: the devkit's folder layout, result files and AP (``voc_eval`` with the 11-point metric)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from defusedxml import DefusedXmlException, ElementTree

from utils.errors import UserError
from utils.files import write_text_atomic
from utils.labels import VOC_CLASSES, voc_class

# One detection of a class: image id, score, xmin, ymin, xmax, ymax (the devkit's 1-based pixels).
Detection = tuple[str, float, float, float, float, float]

_HOW_TO_SET = "pass -d/--voc-dir or set $VOC_DIR to a VOCdevkit/VOC2007 folder"


@dataclass(frozen=True)
class GroundTruth:
    """One annotated object; ``box`` is xmin, ymin, xmax, ymax as in the XML (1-based pixels)."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VocImage:
    """One image of the split with its annotation."""

    image_id: str
    path: Path
    width: int
    height: int
    objects: tuple[GroundTruth, ...]


@dataclass
class VocDataset:
    """The loaded images of a split, and a one-line reason for each image that was skipped."""

    root: Path
    split: str
    images: list[VocImage]
    skipped: list[str]

    def without(self, image_ids: Iterable[str]) -> VocDataset:
        """The same split less the given images (e.g. those that could not be read): their ground truth
        leaves the AP's denominator too."""
        drop = set(image_ids)
        return VocDataset(self.root, self.split, [image for image in self.images if image.image_id not in drop],
                          self.skipped)


@dataclass(frozen=True)
class ClassAp:
    """AP of one class; ``ap`` is None when the class has no non-difficult ground truth."""

    name: str
    ap: float | None
    precision: np.ndarray
    recall: np.ndarray
    num_positives: int
    num_detections: int


def default_voc_dir(workspace: Path) -> Path:
    """``$VOC_DIR`` if set, else ``workspace/VOCdevkit/VOC2007``."""
    value = os.environ.get("VOC_DIR")
    return Path(value) if value else Path(workspace) / "VOCdevkit" / "VOC2007"


class _Incomplete(Exception):
    """An annotation lacks a required field."""


def _text(element: Element, path: str) -> str:
    text = element.findtext(path)
    if text is None or not text.strip():
        raise _Incomplete(f"no {path}")
    return text.strip()


def _number(element: Element, path: str, kind: type) -> float | int:
    text = _text(element, path)
    try:
        return kind(text)
    except ValueError:
        raise _Incomplete(f"{path} is {text!r}") from None


def _parse_object(obj: Element) -> GroundTruth:
    """One ``object`` element; a missing ``difficult`` means 0, as in the devkit."""
    box = tuple(_number(obj, f"bndbox/{key}", float) for key in ("xmin", "ymin", "xmax", "ymax"))
    difficult = obj.find("difficult") is not None and bool(_number(obj, "difficult", int))
    return GroundTruth(name=_text(obj, "name"), box=box, difficult=difficult)


def _parse_annotation(xml_path: Path) -> tuple[int, int, tuple[GroundTruth, ...]]:
    """Width, height and objects of one annotation file."""
    root = ElementTree.parse(xml_path).getroot()
    width, height = _number(root, "size/width", int), _number(root, "size/height", int)
    if width <= 0 or height <= 0:
        raise _Incomplete(f"image size {width}x{height}")
    return width, height, tuple(_parse_object(obj) for obj in root.findall("object"))


def _load_image(root: Path, image_id: str) -> VocImage | str:
    """The image with its annotation, or the reason it cannot be used."""
    xml_path = root / "Annotations" / f"{image_id}.xml"
    jpeg_path = root / "JPEGImages" / f"{image_id}.jpg"
    if not xml_path.is_file():
        return f"{image_id}: missing annotation {xml_path}"
    try:
        width, height, objects = _parse_annotation(xml_path)
    except (ParseError, DefusedXmlException) as error:
        return f"{image_id}: malformed annotation ({error})"
    except _Incomplete as error:
        return f"{image_id}: incomplete annotation ({error})"
    if not jpeg_path.is_file():
        return f"{image_id}: missing image {jpeg_path}"
    return VocImage(image_id, jpeg_path, width, height, objects)


def load_dataset(root: Path, split: str = "test", limit: int | None = None) -> VocDataset:
    """The first ``limit`` images listed in ``ImageSets/Main/<split>.txt``; unusable images are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"VOC2007 folder not found: {root} ({_HOW_TO_SET})")
    list_path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_path.is_file():
        raise UserError(f"image list not found: {list_path} ({_HOW_TO_SET})")
    try:
        ids = list_path.read_text(encoding="utf-8").split()[:limit]
    except (UnicodeDecodeError, OSError) as exc:
        reason = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"cannot be read ({exc.strerror})"
        raise UserError(f"image list {list_path} {reason}; it should hold one image id per line") from None
    images, skipped = [], []
    for image_id in ids:
        loaded = _load_image(root, image_id)
        (skipped if isinstance(loaded, str) else images).append(loaded)
    return VocDataset(root, split, images, skipped)


# The devkit's pixel convention: 1-based pixel indices (the ground truth's, and its voc_eval's +1 widths).
# A detector's boxes are continuous coordinates from 0 (x * width); the community's writers
# (py-faster-rcnn, Detectron: "the VOCdevkit expects 1-based indices") add 1 to every coordinate.
DEVKIT_OFFSET = 1.0


def detections_to_voc(rows: np.ndarray, width: int, height: int,
                      label_map: Mapping[int, str]) -> dict[str, np.ndarray]:
    """One image's [M, 7] rows (normalised boxes) by VOC class, as [K, 5] (score, xmin, ymin, xmax, ymax).

    Boxes become the devkit's 1-based pixels: ``x * width + 1`` and ``y * height + 1`` (DEVKIT_OFFSET).
    Labels are named by ``label_map`` (model id -> name) and mapped to VOC by name (utils.labels.voc_class);
    those with no VOC class are dropped.
    """
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    labels = rows[:, 1].astype(np.int64)
    scaled = np.column_stack([rows[:, 2], rows[:, 3:7] * np.array([width, height, width, height]) + DEVKIT_OFFSET])
    by_class: dict[str, list[int]] = {}
    for label in np.unique(labels):
        voc_name = voc_class(label_map.get(int(label), ""))
        if voc_name is not None:
            by_class.setdefault(voc_name, []).append(label)
    return {name: scaled[np.isin(labels, ids)] for name, ids in by_class.items()}


def _results_path(folder: Path, split: str, name: str) -> Path:
    return Path(folder) / f"det_{split}_{name}.txt"


def result_paths(folder: Path, split: str) -> list[Path]:
    """The 20 devkit result files of a split, in VOC_CLASSES order."""
    return [_results_path(folder, split, name) for name in VOC_CLASSES]


def write_results(folder: Path, split: str, detections: dict[str, list[Detection]]) -> list[Path]:
    """Write the devkit result file ``det_<split>_<class>.txt`` per VOC class, atomically; returns the paths.

    Lines are ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` with the boxes as given (the devkit's
    1-based pixels: see :func:`detections_to_voc`); a class with none gets an empty file.
    """
    unknown = sorted(set(detections) - set(VOC_CLASSES))
    if unknown:
        raise ValueError(f"not VOC classes: {', '.join(unknown)}")
    paths = []
    for name in VOC_CLASSES:
        lines = [f"{image_id} {score:.6f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n"
                 for image_id, score, x1, y1, x2, y2 in detections.get(name, [])]
        path = _results_path(folder, split, name)
        write_text_atomic(path, "".join(lines))
        paths.append(path)
    return paths


def read_results(folder: Path, split: str,
                 classes: Iterable[str] = VOC_CLASSES) -> dict[str, list[Detection]]:
    """Parse the devkit result files written by :func:`write_results` (boxes in 1-based pixels, as the
    ground truth they are matched against)."""
    results = {}
    for name in classes:
        path = _results_path(folder, split, name)
        if not path.is_file():
            raise UserError(f"result file not found: {path}")
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            try:
                if len(fields) != 6:
                    raise ValueError(f"{len(fields)} fields, expected 6")
                entries.append((fields[0], *map(float, fields[1:])))
            except ValueError as error:
                raise UserError(f"bad line in {path}:{number}: {error}") from None
        results[name] = entries
    return results


def average_precision_11pt(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t = 0, 0.1, ..., 1 of the max precision at recall >= t (0 if none)."""
    thresholds = np.arange(0.0, 1.1, 0.1)  # the devkit's exact values
    reached = np.asarray(recall)[None, :] >= thresholds[:, None]
    best = np.max(np.where(reached, np.asarray(precision)[None, :], 0.0), axis=1, initial=0.0)
    return float(best.mean())


def _iou(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """[N, G] overlaps with the devkit's +1 pixel convention for widths and heights."""
    low = np.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
    high = np.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
    inter = np.prod(np.maximum(high - low + 1.0, 0.0), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2] + 1.0, axis=1)
    gt_area = np.prod(gt_boxes[:, 2:] - gt_boxes[:, :2] + 1.0, axis=1)
    return inter / (area[:, None] + gt_area[None, :] - inter)


def evaluate_class(name: str, images: list[VocImage], detections: list[Detection],
                   iou_threshold: float = 0.5) -> ClassAp:
    """The devkit's ``voc_eval`` (use_07_metric=True) for one class.

    Detections are taken by descending score (stable). Each is matched to the ground truth of its
    image with the highest IoU; above ``iou_threshold`` it is a TP the first time that object is
    matched, a FP (duplicate) after that, and ignored when the object is difficult. Otherwise it is
    a FP, also on an image with no object of the class. Detections on images not in ``images``
    are ignored (their ground truth is unknown; the devkit refuses them).
    """
    gt_by_image = {image.image_id: [obj for obj in image.objects if obj.name == name] for image in images}
    offsets = dict(zip(gt_by_image, np.cumsum([0] + [len(objs) for objs in gt_by_image.values()])))
    gt_objects = [obj for objs in gt_by_image.values() for obj in objs]
    gt_boxes = np.array([obj.box for obj in gt_objects], dtype=np.float64).reshape(-1, 4)
    gt_difficult = np.array([obj.difficult for obj in gt_objects], dtype=bool)
    num_positives = int(np.count_nonzero(~gt_difficult))

    known = [det for det in detections if det[0] in gt_by_image]
    scores = np.array([det[1] for det in known], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ids = np.array([det[0] for det in known], dtype=str)[order]
    boxes = np.array([det[2:] for det in known], dtype=np.float64).reshape(-1, 4)[order]

    best_iou = np.full(len(known), -np.inf)
    best_gt = np.zeros(len(known), dtype=np.int64)
    unique_ids, inverse = np.unique(ids, return_inverse=True)
    groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    for image_id, rows in zip(unique_ids, groups):
        start, count = offsets[image_id], len(gt_by_image[image_id])
        if count:
            overlaps = _iou(boxes[rows], gt_boxes[start:start + count])
            best = np.argmax(overlaps, axis=1)
            best_iou[rows] = overlaps[np.arange(len(rows)), best]
            best_gt[rows] = start + best

    matched = best_iou > iou_threshold
    ignored = np.zeros(len(known), dtype=bool)
    ignored[matched] = gt_difficult[best_gt[matched]]
    candidates = np.flatnonzero(matched & ~ignored)
    tp = np.zeros(len(known))
    tp[candidates[np.unique(best_gt[candidates], return_index=True)[1]]] = 1.0
    fp = (1.0 - tp) * ~ignored
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(num_positives, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = average_precision_11pt(recall, precision) if num_positives else None
    return ClassAp(name, ap, precision, recall, num_positives, len(known))


def evaluate(dataset: VocDataset, detections: dict[str, list[Detection]],
             classes: Iterable[str] = VOC_CLASSES) -> list[ClassAp]:
    """AP of each class over the dataset's loaded images."""
    return [evaluate_class(name, dataset.images, detections.get(name, [])) for name in classes]


def mean_ap(results: list[ClassAp], detectable: set[str] | None = None) -> float:
    """Mean AP over classes with ground truth (and in ``detectable`` if given); NaN when there are none."""
    aps = [result.ap for result in results
           if result.ap is not None and (detectable is None or result.name in detectable)]
    return float(np.mean(aps)) if aps else float("nan")
