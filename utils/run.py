"""The one detection loop: files -> batches -> runner -> per-image results, in input order.

detect_objects.py, voc_evaluation.py, the Ray path and the benchmarks all go through ``Executor``:

    with open_executor(plan, artifact, workers=..., ray=None) as executor:
        print(executor.settings())
        for batch in executor.batches(files, keys):
            for result in batch.results: ...

The local executor opens one runner and reads, decodes and detects in this process
(``detect_batches``); the Ray executor (utils.distributed) runs the same loop (``overlapped`` over
``launch_batch`` / ``finish_batch``) in detector actors and yields the same results.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

from utils.pipeline import DECODE_NAMES, input_batches
from utils.runtime.base import Runner, valid_rows

if TYPE_CHECKING:
    from utils.coco import ImageIds

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class ImageResult:
    """What happened to one input image."""

    path: Path
    key: str                               # the caller's id of the input (default: the path)
    size: tuple[int, int] | None = None    # original (width, height), after EXIF rotation
    image: Image.Image | None = None       # the RGB, EXIF-corrected original, when asked for (drawing)
    rows: np.ndarray | None = None         # [M, 7] all detections of this image (normalised)
    error: str | None = None
    cpu_reason: str | None = None          # decode gpu: why the CPU decoded it instead


@dataclass
class BatchResult:
    """One batch of inputs, in order, and how long it took."""

    results: list[ImageResult]
    inference_seconds: float = 0.0         # the runner on the batch: launch + finish (overlapping other batches')
    seconds: float = 0.0                   # this thread, from the previous batch's end to this one's
    cpu_decoded: int = 0                   # decode gpu: files the CPU decoded instead
    hardware_decoded: int | None = 0       # decode gpu: files the GPU's hardware JPEG engines decoded (None: the
                                           # decoder does not say; utils.pipeline.InputBatch)
    # where this thread's time went (detect_batches; the rest of ``seconds`` is the caller's own work):
    input_seconds: float = 0.0             # waiting for the batch's input (read + decode not hidden)
    launch_seconds: float = 0.0            # runner.launch: the engine
    finish_wait_seconds: float = 0.0       # waiting for runner.finish (NMS, copies back) of a batch

    @property
    def detected(self) -> int:
        return sum(result.error is None for result in self.results)


@dataclass
class InputList:
    """Image files found in the arguments, and the arguments that were not usable."""

    files: list[Path] = field(default_factory=list)
    errors: list[ImageResult] = field(default_factory=list)


def collect_images(arguments: Sequence[str]) -> InputList:
    """Expand files and folders (images in a folder sorted by name, not recursive)."""
    found = InputList()
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                found.errors.append(ImageResult(path, str(path), error=f"folder '{path}' holds no images "
                                                                        f"({', '.join(sorted(IMAGE_SUFFIXES))})"))
            found.files.extend(images)
        else:
            found.files.append(path)  # a missing file is reported when it is read
    return found


def image_rows(detections: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """A runner's batch output -> the [M, 7] rows of each image."""
    return [valid_rows(detections[index], counts[index]) for index in range(len(detections))]


def launch_batch(runner: Runner, batch):
    """runner.launch on an InputBatch's tensor (None: the batch has no readable image)."""
    return runner.launch(batch.tensor) if batch.tensor is not None and len(batch.tensor) else None


def finish_batch(runner: Runner, handle) -> list[np.ndarray]:
    """The [M, 7] rows of each readable image of a launched batch."""
    return [] if handle is None else image_rows(*runner.finish(handle))


@dataclass
class _Timed:
    """One item through ``overlapped``: the item, finish's result and the seconds of each step."""

    item: object
    result: object = None
    input_seconds: float = 0.0
    launch_seconds: float = 0.0
    finish_seconds: float = 0.0
    finish_wait_seconds: float = 0.0


def overlapped(items: Iterable, launch: Callable, finish: Callable, in_flight: int) -> Iterator[_Timed]:
    """finish(launch(item)) of every item, in order: launch on this thread, finish on one worker thread, with at
    most ``in_flight`` items launched and not finished (1: both here, one item at a time). The first error,
    in item order, is raised here; on leaving early (an error, the caller stopping), every launched item is
    still finished, its result dropped, so that the runner holds nothing in flight afterwards."""
    def timed(done: _Timed, handle) -> _Timed:
        started = time.perf_counter()
        done.result = finish(handle)
        done.finish_seconds = time.perf_counter() - started
        return done

    def launched(item, waited: float) -> tuple[_Timed, object]:
        done = _Timed(item, input_seconds=waited)
        started = time.perf_counter()
        handle = launch(item)
        done.launch_seconds = time.perf_counter() - started
        return done, handle

    def arrivals() -> Iterator[tuple[object, float]]:
        source = iter(items)
        while True:
            started = time.perf_counter()
            try:
                item = next(source)
            except StopIteration:
                return
            yield item, time.perf_counter() - started

    if in_flight <= 1:
        for item, waited in arrivals():
            done = timed(*launched(item, waited))
            done.finish_wait_seconds = done.finish_seconds
            yield done
        return
    worker = ThreadPoolExecutor(1, thread_name_prefix="finish")
    pending: collections.deque = collections.deque()

    def oldest() -> _Timed:
        started = time.perf_counter()
        done = pending.popleft().result()
        done.finish_wait_seconds = time.perf_counter() - started
        return done

    try:
        for item, waited in arrivals():
            ready = oldest() if len(pending) == in_flight else None     # frees its slot for this launch
            done, handle = launched(item, waited)
            pending.append(worker.submit(timed, done, handle))
            if ready is not None:
                yield ready
        while pending:
            yield oldest()
    finally:
        worker.shutdown(wait=True)


def detect_batches(runner: Runner, files: Sequence[Path], batch_size: int, decode: str = "cpu", workers: int = 0,
                   keep_images: bool = False, keys: Sequence[str] | None = None) -> Iterator[BatchResult]:
    """Files -> BatchResult of up to ``batch_size`` inputs, in input order; unreadable files carry an error.

    ``decode`` (cpu | gpu) and ``workers`` choose the input path (utils.pipeline.input_batches). Where the runner
    allows (``max_in_flight`` > 1), its finish of batch k (NMS, copies back) overlaps the engine on batch k + 1.
    """
    keys = list(keys) if keys is not None else [str(path) for path in files]
    position = 0
    began = time.perf_counter()
    batches = input_batches(list(files), batch_size, runner.spec.input_size, workers, decode, keep_images)
    for done in overlapped(batches, functools.partial(launch_batch, runner), functools.partial(finish_batch, runner),
                           runner.max_in_flight):
        batch = done.item
        results = [ImageResult(item.path, keys[position + index], item.size, item.image, error=item.error,
                               cpu_reason=item.cpu_reason) for index, item in enumerate(batch.items)]
        position += len(results)
        for result, found in zip((r for r in results if r.error is None), done.result):
            result.rows = found
        yield BatchResult(results, done.launch_seconds + done.finish_seconds, time.perf_counter() - began,
                          batch.cpu_decoded, batch.hardware_decoded, done.input_seconds, done.launch_seconds,
                          done.finish_wait_seconds)
        began = time.perf_counter()


def decode_description(decode: str) -> str:
    """The input path of ``decode`` in words: for gpu, DALI's pipeline or nvJPEG's (utils.gpu_input.gpu_decoder)."""
    if decode == "gpu":
        from utils.gpu_input import decoder_description  # noqa: PLC0415  (imports torch: only for --decode gpu)

        return decoder_description()
    return DECODE_NAMES[decode]


class Executor(Protocol):
    name: str       # shown to the user, e.g. "ONNX Runtime"

    def settings(self) -> list[str]:
        """Lines about the engine and the input path, as the original sample printed them."""

    def batches(self, files: Sequence[Path], keys: Sequence[str] | None = None,
                keep_images: bool = False) -> Iterator[BatchResult]:
        """Results of every file, in input order."""


class LocalExecutor:
    """This process: one runner, decode workers as threads (or the GPU input path)."""

    def __init__(self, plan, runner: Runner, workers: int):
        self.plan, self.runner, self.workers = plan, runner, workers
        self.name = runner.name

    def settings(self) -> list[str]:
        return self.runner.settings() + [f"  * Image decode - {decode_description(self.plan.decode)}"]

    def batches(self, files, keys=None, keep_images=False) -> Iterator[BatchResult]:
        return detect_batches(self.runner, files, self.plan.batch_size, self.plan.decode, self.workers, keep_images,
                              keys)


@contextlib.contextmanager
def open_executor(plan, artifact, workers: int = 0, ray: str | None = None, ray_workers: int | None = None,
                  fresh: bool = False) -> Iterator[Executor]:
    """The executor of a plan's run on ``artifact``: local (``ray`` None) or a Ray cluster (``ray`` = "local"
    to start one, else its address). ``fresh`` ignores the shards of an earlier identical Ray run."""
    if ray is None:
        with plan.open(artifact) as runner:
            yield LocalExecutor(plan, runner, workers)
        return
    from utils.distributed import RayExecutor  # noqa: PLC0415

    executor = RayExecutor(plan, artifact, None if ray == "local" else ray, ray_workers, fresh)
    try:
        yield executor
    finally:
        executor.close()                 # the actor pool ends with the run (GPUs given back)


def coco_results(path: Path, rows: np.ndarray, size: tuple[int, int], threshold: float,
                 ids: ImageIds | None = None) -> list[dict]:
    """COCO results-style entries of one image (rows [M, 7], size = original (width, height)): integer
    image_id by ``ids`` (utils.coco.ImageIds, built once from all the inputs and, with --coco-annotations,
    the annotation file; without it, by the path alone), category_id = the model's class id, bbox
    [x, y, width, height] in original pixels, and file_name when the id is a stable integer."""
    from utils.coco import ImageIds, result_entries  # noqa: PLC0415

    ids = ids if ids is not None else ImageIds()
    return result_entries(ids[path], rows, size, threshold)
