"""Images on disk -> batches -> detections: the loop behind detect_objects.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from utils.backends.base import Backend, valid_rows
from utils.draw import box_to_pixels
from utils.pipeline import input_batches

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class ImageResult:
    """What happened to one input image."""

    path: Path
    image: Image.Image | None = None       # the RGB, EXIF-corrected original
    rows: np.ndarray | None = None         # [M, 7] all detections of this image (normalised)
    error: str | None = None
    inference_ms: float = 0.0              # the batch's inference time
    batch_size: int = 1
    total_ms: float = 0.0                  # read + preprocess + inference for the batch
    cpu_reason: str | None = None          # decode gpu: why the CPU decoded it instead


@dataclass
class InputList:
    """Image files found in the arguments, and the arguments that were not usable."""

    files: list[Path] = field(default_factory=list)
    errors: list[ImageResult] = field(default_factory=list)


def collect_images(arguments: list[str]) -> InputList:
    """Expand files and folders (images in a folder sorted by name, not recursive)."""
    found = InputList()
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                found.errors.append(ImageResult(path, error=f"folder '{path}' holds no images "
                                                            f"({', '.join(sorted(IMAGE_SUFFIXES))})"))
            found.files.extend(images)
        else:
            found.files.append(path)  # a missing file is reported when it is read
    return found


def detect_images(backend: Backend, files: list[Path], batch_size: int, decode: str = "cpu",
                  workers: int = 0) -> Iterator[ImageResult]:
    """Yield one ImageResult per file, in input order; unreadable files carry an error.

    ``decode`` (cpu | gpu) and ``workers`` choose the input path (utils.pipeline.input_batches).
    """
    began = time.perf_counter()
    for batch in input_batches(files, batch_size, backend.spec.input_size, workers, decode, keep_images=True):
        results = [ImageResult(item.path, image=item.image, error=item.error, cpu_reason=item.cpu_reason)
                   for item in batch.items]
        loaded = [r for r in results if r.error is None]
        if loaded:
            infer_start = time.perf_counter()
            detections, counts = backend.detect(batch.tensor)
            inference_ms = (time.perf_counter() - infer_start) * 1000
            total_ms = (time.perf_counter() - began) * 1000
            for index, result in enumerate(loaded):
                result.rows = valid_rows(detections[index], counts[index])
                result.inference_ms, result.total_ms, result.batch_size = inference_ms, total_ms, len(loaded)
        yield from results
        began = time.perf_counter()


def coco_results(path: Path, rows: np.ndarray, size: tuple[int, int], threshold: float) -> list[dict]:
    """COCO results-style entries of one image (rows [M, 7], size = original (width, height)):
    bbox [x, y, width, height] in original pixels."""
    width, height = size
    entries = []
    for row in rows[rows[:, 2] >= threshold]:
        xmin, ymin, xmax, ymax = box_to_pixels(row, width, height)
        entries.append({"image_id": Path(path).name, "category_id": int(row[1]),
                        "bbox": [round(xmin, 2), round(ymin, 2), round(xmax - xmin, 2), round(ymax - ymin, 2)],
                        "score": round(float(row[2]), 5)})
    return entries
