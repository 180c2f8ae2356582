"""COCO: image ids of results, results entries, COCO AP through pycocotools, and a VOC2007 -> COCO
annotation converter (for tests and examples).

    python -m utils.coco voc2coco VOC_DIR OUT.json [--split test] [--limit N]

Image ids (``ImageIds``, the one place that decides them): the id the COCO annotation file gives the
input's file name when one is passed; else the file stem when it is all digits (COCO ``000000397133.jpg``
-> 397133, VOC ``000004.jpg`` -> 4); else a stable integer (from the sha256 of the path as given) with
a ``file_name`` field beside it in each entry. Two inputs never share an id: the later one of a clash
(same name in another folder, or ``01.jpg`` after ``1.jpg``) gets a stable integer of its own.

Box conventions: COCO boxes are [x, y, width, height] in continuous pixel coordinates, so a detection
in normalised coordinates becomes ``x * W``. VOC boxes are 1-based pixel indices; the converter writes
``[xmin - 1, ymin - 1, xmax - xmin, ymax - ymin]`` (mmdetection's converter), the inverse of the +1
that utils.voc's result files add (py-faster-rcnn's writer).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Container, Iterable, Mapping, Sequence

import numpy as np

from utils.errors import EXIT_OK, UserError
from utils.files import write_text_atomic
from utils.labels import COCO_LABELS, COCO_TO_VOC

log = logging.getLogger(__name__)

# VOC class -> COCO category id (by the COCO name the class has).
VOC_TO_COCO_ID: dict[str, int] = {COCO_TO_VOC[name]: coco_id for coco_id, name in COCO_LABELS.items()
                                  if name in COCO_TO_VOC}

# The 12 numbers of COCOeval.summarize(), in its order.
SUMMARY_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                  "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_HASHED_BASE = 1_000_000_000   # stable ids lie in [1e9, 2e9): clear of VOC / COCO numbers, below 2**31


# --- image ids ----------------------------------------------------------------------------------------

def digit_id(path: os.PathLike | str) -> int | None:
    """The file stem as an integer when it is all (ASCII) digits, else None."""
    stem = PurePosixPath(Path(path).as_posix()).stem
    return int(stem) if stem.isascii() and stem.isdigit() else None


def stable_id(name: str, taken: Container[int] = frozenset()) -> int:
    """An integer in [1e9, 2e9) from the sha256 of ``name``; the next free one when it is in ``taken``."""
    value = _HASHED_BASE + int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % _HASHED_BASE
    while value in taken:
        value = _HASHED_BASE + (value + 1 - _HASHED_BASE) % _HASHED_BASE
    return value


@dataclass(frozen=True)
class ImageId:
    """The COCO id of one input; ``file_name`` is set when the id says nothing of the file (a stable integer)."""

    id: int
    file_name: str | None = None


def _name(path: os.PathLike | str) -> str:
    """The path as given, normalised (``./a//b.jpg`` -> ``a/b.jpg``), with forward slashes."""
    return posixpath.normpath(Path(path).as_posix())


def _read_json(path: Path):
    """The JSON of a COCO annotation file (one-line UserError when it cannot be read or is not JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read COCO annotation file {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not a COCO annotation file: not JSON ({error})") from None


def read_annotation_ids(path: Path) -> dict[str, int]:
    """file_name -> id of the images of a COCO annotation file (one-line UserError when it is not one)."""
    path = Path(path)
    data = _read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"{path} is not a COCO annotation file: no 'images' list")
    ids: dict[str, int] = {}
    for number, image in enumerate(images):
        if not (isinstance(image, dict) and isinstance(image.get("file_name"), str)
                and isinstance(image.get("id"), int) and not isinstance(image.get("id"), bool)):
            raise UserError(f"{path}: images[{number}] needs an integer 'id' and a string 'file_name'")
        ids.setdefault(_name(image["file_name"]), image["id"])
    return ids


def _annotated(name: str, by_name: Mapping[str, int]) -> int | None:
    """The annotation id of the longest trailing part of ``name`` that is a file_name of the file."""
    parts = PurePosixPath(name).parts
    for start in range(len(parts)):
        found = by_name.get("/".join(parts[start:]))
        if found is not None:
            return found
    return None


class ImageIds:
    """The COCO image id of each input path (see the module's docstring for the rules).

    ``annotations`` is a COCO annotation file (its images' file names -> ids) or such a mapping. The
    ids depend on the whole input list (clashes are settled in input order), so build this once from
    all the inputs; a path not in the list gets an id by the same rules when it is first asked for.
    """

    def __init__(self, paths: Sequence[os.PathLike | str] = (),
                 annotations: Path | str | Mapping[str, int] | None = None):
        if isinstance(annotations, (str, os.PathLike)):
            self.source: str | None = str(annotations)
            annotations = read_annotation_ids(Path(annotations))
        else:
            self.source = "the annotations" if annotations is not None else None
        self._by_name = {_name(key): value for key, value in (annotations or {}).items()}
        self._taken: set[int] = set()
        self._blocked = set(self._by_name.values())     # taken, and the ids of annotated images (theirs alone)
        self._ids: dict[str, ImageId] = {}
        names = list(dict.fromkeys(_name(path) for path in paths))
        pending = []
        for name in names:              # 1. the annotation file's id of the file name
            found = _annotated(name, self._by_name) if self._by_name else None
            if found is not None and found not in self._taken:
                self._claim(name, ImageId(found))
            else:
                pending.append((name, found))
        for name, found in pending:     # 2. an all-digit stem (not for the loser of an annotated name)
            if found is None and self._free(digit_id(name)):
                self._claim(name, ImageId(digit_id(name)))
        clashes = []
        for name, found in pending:     # 3. a stable integer, with the file name beside it
            if name not in self._ids:
                if found is not None or digit_id(name) in self._taken:   # another input has its id
                    clashes.append(name)
                self._claim(name, ImageId(stable_id(name, self._blocked), name))
        if clashes:
            log.warning("%d inputs have the id of an earlier one by name (e.g. %s): they get ids of their own, "
                        "with file_name", len(clashes), clashes[0])
        if self.source:
            missing = [name for name in names if _annotated(name, self._by_name) is None]
            if missing:
                log.warning("%d of %d inputs are not in %s (e.g. %s): their ids come from their names",
                            len(missing), len(names), self.source, missing[0])

    def _claim(self, name: str, image_id: ImageId) -> None:
        self._ids[name] = image_id
        self._taken.add(image_id.id)
        self._blocked.add(image_id.id)

    def _free(self, number: int | None) -> bool:
        return number is not None and number not in self._blocked

    def __getitem__(self, path: os.PathLike | str) -> ImageId:
        name = _name(path)
        if name not in self._ids:
            found = _annotated(name, self._by_name) if self._by_name else None
            if found is not None and found not in self._taken:
                self._claim(name, ImageId(found))
            elif found is None and self._free(digit_id(name)):
                self._claim(name, ImageId(digit_id(name)))
            else:
                self._claim(name, ImageId(stable_id(name, self._blocked), name))
        return self._ids[name]


# --- results --------------------------------------------------------------------------------------------

def result_entries(image_id: ImageId | int, rows: np.ndarray, size: tuple[int, int],
                   threshold: float = 0.0) -> list[dict]:
    """COCO results entries of one image: rows [M, 7] (normalised, label = the model's class id),
    size = the original (width, height); bbox [x, y, width, height] in pixels, clipped to the image."""
    from utils.draw import box_to_pixels  # noqa: PLC0415

    if not isinstance(image_id, ImageId):
        image_id = ImageId(int(image_id))
    width, height = size
    rows = np.asarray(rows).reshape(-1, 7)
    entries = []
    for row in rows[rows[:, 2] >= threshold]:
        xmin, ymin, xmax, ymax = box_to_pixels(row, width, height)
        entry = {"image_id": image_id.id}
        if image_id.file_name is not None:
            entry["file_name"] = image_id.file_name
        entry.update({"category_id": int(row[1]),
                      "bbox": [round(xmin, 2), round(ymin, 2), round(xmax - xmin, 2), round(ymax - ymin, 2)],
                      "score": round(float(row[2]), 5)})
        entries.append(entry)
    return entries


# --- ground truth and evaluation ---------------------------------------------------------------------------

def _quiet():
    """pycocotools prints progress to stdout; keep stdout for the report."""
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(path: Path):
    """A pycocotools COCO object of an annotation file (one-line UserError when it is not one)."""
    from pycocotools.coco import COCO  # noqa: PLC0415

    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO annotation file: it needs 'images', 'annotations' and "
                        f"'categories' lists")
    read_annotation_ids(path)   # the images' fields
    for number, annotation in enumerate(data["annotations"]):
        if not (isinstance(annotation, dict) and isinstance(annotation.get("bbox"), list)
                and len(annotation["bbox"]) == 4 and {"image_id", "category_id"} <= set(annotation)):
            raise UserError(f"{path}: annotations[{number}] needs 'image_id', 'category_id' and a 4-number 'bbox'")
    for annotation in data["annotations"]:   # as pycocotools' own loader expects them
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", float(annotation["bbox"][2]) * float(annotation["bbox"][3]))
    data.setdefault("info", {})
    ground_truth = COCO()
    ground_truth.dataset = data
    with _quiet():
        ground_truth.createIndex()
    return ground_truth


def detectable_categories(ground_truth, labels: Mapping[int, str]) -> list[int]:
    """Category ids of the annotation file that the model detects: same id and same name as one of its
    labels (COCO ids for COCO models); every category when the model has no label names."""
    categories = ground_truth.dataset["categories"]
    if not labels:
        return sorted(category["id"] for category in categories)
    return sorted(category["id"] for category in categories
                  if str(labels.get(category["id"], "")).lower() == str(category.get("name", "")).lower())


@dataclass
class CocoSummary:
    """pycocotools' 12-number summary of one run, and its printed lines."""

    stats: list[float]        # SUMMARY_NAMES order; -1 where pycocotools has no ground truth for it
    lines: list[str]
    images: int
    categories: list[int]

    def value(self, name: str) -> float:
        """A summary number; NaN where pycocotools gives -1 (nothing to measure)."""
        value = self.stats[SUMMARY_NAMES.index(name)]
        return float("nan") if value < 0 or math.isnan(value) else value


def evaluate(ground_truth, results: list[dict], image_ids: Iterable[int], category_ids: Iterable[int]) -> CocoSummary:
    """COCOeval (bbox) of ``results`` on ``image_ids`` and ``category_ids``; the standard summary."""
    from pycocotools.coco import COCO  # noqa: PLC0415
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

    image_ids, category_ids = sorted(set(image_ids)), sorted(set(category_ids))
    with _quiet():
        if results:
            detections = ground_truth.loadRes(results)
        else:                                       # loadRes refuses an empty list: no detections at all
            detections = COCO()
            detections.dataset = {"images": list(ground_truth.dataset["images"]),
                                  "categories": list(ground_truth.dataset["categories"]), "annotations": []}
            detections.createIndex()
        evaluation = COCOeval(ground_truth, detections, "bbox")
        evaluation.params.imgIds, evaluation.params.catIds = image_ids, category_ids
        evaluation.evaluate()
        evaluation.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluation.summarize()
    return CocoSummary([float(value) for value in evaluation.stats], printed.getvalue().splitlines(),
                       len(image_ids), category_ids)


# --- VOC2007 -> COCO ------------------------------------------------------------------------------------------

def voc_to_coco(dataset) -> dict:
    """A COCO annotation dict of a utils.voc VocDataset: file names relative to JPEGImages, ids by ImageIds
    (the number of a VOC name), categories the 20 VOC classes under their COCO ids and names, difficult
    objects as iscrowd 1 (ignored, as the devkit ignores them), bbox [xmin - 1, ymin - 1, w, h]."""
    ids = ImageIds([image.path.name for image in dataset.images])
    images, annotations = [], []
    for image in dataset.images:
        image_id = ids[image.path.name].id
        images.append({"id": image_id, "file_name": image.path.name, "width": image.width, "height": image.height})
        for obj in image.objects:
            if obj.name not in VOC_TO_COCO_ID:
                continue
            xmin, ymin, xmax, ymax = obj.box
            box = [xmin - 1.0, ymin - 1.0, xmax - xmin, ymax - ymin]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": VOC_TO_COCO_ID[obj.name], "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(obj.difficult)})
    categories = [{"id": coco_id, "name": COCO_LABELS[coco_id], "supercategory": voc_name}
                  for voc_name, coco_id in sorted(VOC_TO_COCO_ID.items(), key=lambda item: item[1])]
    return {"info": {"description": f"VOC2007 {dataset.split} ({dataset.root}) converted by utils.coco"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def main(argv: list[str] | None = None) -> int:
    from utils.cli import setup_logging, user_errors  # noqa: PLC0415
    from utils.voc import load_dataset  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m utils.coco", description="COCO helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("voc2coco", help="write a COCO annotation file of a VOC2007 folder")
    convert.add_argument("voc_dir", type=Path, help="the VOCdevkit/VOC2007 folder")
    convert.add_argument("output", type=Path, help="the COCO annotation JSON to write")
    convert.add_argument("--split", default="test", help="ImageSets/Main/<split>.txt (default test)")
    convert.add_argument("--limit", type=int, default=None, help="the first N image ids only")
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors():
        dataset = load_dataset(args.voc_dir, args.split, args.limit)
        for reason in dataset.skipped:
            log.warning("skipped %s", reason)
        data = voc_to_coco(dataset)
        write_text_atomic(args.output, json.dumps(data, indent=1))
        print(f"Saved {len(data['images'])} images and {len(data['annotations'])} objects "
              f"({sum(a['iscrowd'] for a in data['annotations'])} difficult, as iscrowd) to: {args.output}")
        print(f"Images: {args.voc_dir / 'JPEGImages'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
