"""The input pipeline: image files -> preprocessed batches, decoded and resized in parallel workers.

Workers are threads running ``utils.preprocess`` (the one preprocessing function): Pillow's JPEG
decoder and numpy's array operations release the GIL, so they run in parallel without copying
every decoded tensor between processes (pickling 1 MB per image made worker processes slower;
benchmarks/README.md). Results keep the input order.

``input_batches`` is the one entry point of the scripts: ``decode="cpu"`` is this module's path,
``decode="gpu"`` is utils.gpu_input's (nvJPEG; imported only then).

Memory is bounded whatever the inputs: an image over utils.preprocess.MAX_PIXELS is refused, a large JPEG
is decoded at a reduced size (utils.preprocess.DRAFT_MARGIN), a decoded original is kept for drawing only
up to KEEP_PIXELS (larger ones are read again when drawn), and what the workers hold ahead of the batch
in use stays under PREFETCH_BYTES.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from utils.errors import ImageError, UserError
from utils.preprocess import preprocess, read_image

PREFETCH_BATCHES = 2
PREFETCH_BYTES = 256 << 20     # decoded data held ahead of the batch in use (tensors and kept originals)
KEEP_PIXELS = 4096 * 4096      # larger originals are not kept for drawing (LoadedImage.image is None)
DECODE_CHOICES = ("auto", "cpu", "gpu")
DECODE_NAMES = {"cpu": "CPU (Pillow, TF's resize in numpy)",
                "gpu": "GPU (NVIDIA DALI when installed, else nvJPEG via nvImageCodec / torchvision; TF's resize "
                       "on the GPU)"}


@dataclass
class LoadedImage:
    """One input, preprocessed, or the one-line reason it could not be read."""

    path: Path
    tensor: np.ndarray | None = None        # float32 [3, H, W]
    size: tuple[int, int] | None = None     # original (width, height), after EXIF rotation
    image: Image.Image | None = None        # the RGB original, when asked for (for drawing)
    error: str | None = None
    cpu_reason: str | None = None           # decode gpu: why the CPU decoded this file instead


def load_one(path: Path, input_size: tuple[int, int], keep_image: bool = False,
             admit: Callable[[int], None] | None = None) -> LoadedImage:
    """Read and preprocess one file; never raises for a bad image.

    ``keep_image`` keeps the RGB original (for drawing) when it was decoded at full size and has at
    most KEEP_PIXELS. ``admit(nbytes)`` is called before decoding with what the result will hold.
    """
    width, height = input_size
    keep = False

    def before_decode(size: tuple[int, int], reduced: bool) -> None:
        nonlocal keep
        keep = keep_image and not reduced and size[0] * size[1] <= KEEP_PIXELS
        if admit is not None:
            admit(3 * width * height * 4 + (3 * size[0] * size[1] if keep else 0))

    try:
        decoded = read_image(path, input_size, before_decode)
    except ImageError as exc:
        return LoadedImage(path, error=str(exc))
    return LoadedImage(path, tensor=preprocess(decoded.image, input_size), size=decoded.size,
                       image=decoded.image if keep else None)


def default_workers() -> int:
    """Decode workers: one per core."""
    return os.cpu_count() or 1


class _Budget:
    """Bytes the decode workers hold ahead of the consumer: a worker about to decode an input past the
    batch in use waits while that would exceed ``limit`` (and something is held); the batch in use is
    never held back, so the consumer cannot wait on a waiting worker."""

    def __init__(self, limit: int):
        self.limit, self.held, self.needed = limit, 0, 0
        self.costs: dict[int, int] = {}
        self.condition = threading.Condition()

    def admit(self, index: int, nbytes: int) -> None:
        with self.condition:
            while index >= self.needed and self.held and self.held + nbytes > self.limit:
                if not threading.main_thread().is_alive():   # the interpreter is exiting: do not hold it
                    break
                self.condition.wait(0.5)
            self.held += nbytes
            self.costs[index] = nbytes

    def need(self, end: float) -> None:
        """The consumer waits for the inputs before ``end`` now."""
        with self.condition:
            self.needed = end
            self.condition.notify_all()

    def release(self, indices: range) -> None:
        with self.condition:
            self.held -= sum(self.costs.pop(index, 0) for index in indices)
            self.condition.notify_all()


def load_batches(paths: Sequence[Path], batch_size: int, input_size: tuple[int, int], workers: int = 0,
                 keep_images: bool = False) -> Iterator[list[LoadedImage]]:
    """Yield lists of up to ``batch_size`` LoadedImage in input order.

    ``workers`` = 0 loads in the calling thread; otherwise that many worker threads decode ahead
    (up to PREFETCH_BATCHES batches and PREFETCH_BYTES), overlapping with whatever the caller does
    with a batch.
    """
    paths = list(paths)
    if workers <= 0 or len(paths) <= 1:
        for part in chunked(paths, batch_size):
            yield [load_one(path, input_size, keep_images) for path in part]
        return
    budget = _Budget(PREFETCH_BYTES)

    def load(index: int) -> LoadedImage:
        return load_one(paths[index], input_size, keep_images, lambda nbytes: budget.admit(index, nbytes))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    try:
        window = batch_size * PREFETCH_BATCHES
        pending = [pool.submit(load, index) for index in range(min(window, len(paths)))]
        submitted, start = len(pending), 0
        while pending:
            batch, pending = pending[:batch_size], pending[batch_size:]
            more = range(submitted, min(submitted + len(batch), len(paths)))
            pending.extend(pool.submit(load, index) for index in more)
            submitted += len(more)
            budget.need(start + len(batch))
            yield [future.result() for future in batch]
            budget.release(range(start, start + len(batch)))
            start += len(batch)
    finally:
        budget.need(math.inf)                      # let waiting workers finish
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class InputBatch:
    """One batch of inputs: every file (in order, unreadable ones with .error) and the tensor of the
    readable ones."""

    items: list[LoadedImage]
    tensor: object = None                 # float32 [n_readable, 3, H, W]: numpy, or a CUDA torch tensor
    cpu_decoded: int = 0                  # decode gpu: files the CPU path decoded instead
    cpu_reasons: list[str] = field(default_factory=list)
    # decode gpu: files the GPU's hardware JPEG engines decoded; None where the decoder does not say (DALI: the
    # nvImageCodec inside it picks the engine of each image and reports none of it; see count_total)
    hardware_decoded: int | None = 0


def count_total(total: int | None, count: int | None) -> int | None:
    """``total + count`` for a count that a decoder may not report (None): unknown once any part is."""
    return None if total is None or count is None else total + count


def produced_ahead(produce: Callable[[], Iterator], depth: int, name: str) -> Iterator:
    """The items of the generator ``produce()``, made in a producer thread (``name``) up to ``depth`` ahead of
    the caller. An error in the producer is raised here, in its turn; when the caller stops early the producer
    stops after the item in hand and ``produce()`` is closed there (its ``with`` blocks exit in its thread)."""
    ready: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            with contextlib.closing(produce()) as produced:
                for built in produced:
                    if stop.is_set():
                        break
                    ready.put(built)
            ready.put(None)
        except BaseException as error:      # noqa: BLE001  (handed to the consumer)
            ready.put(error)

    producer = threading.Thread(target=run, name=name, daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while producer.is_alive():          # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.1)
            except Empty:
                pass


def chunked(items: Sequence, size: int) -> list:
    """``items`` in consecutive slices of ``size`` (the last one shorter)."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def read_ahead(groups: Iterable[Sequence], read: Callable, pool: ThreadPoolExecutor | None, depth: int) -> Iterator[list]:
    """``[read(x) for x in group]`` for each group, in order. With a pool, the reads of ``depth`` groups (the one
    handed out and those after it) run in its threads ahead of the caller; ``groups`` may be a stream that is
    still growing (a Ray actor's blocks), as long as asking it for the next group never waits long (group k is
    handed out only once group k + depth - 1 has been asked for)."""
    if pool is None:
        for group in groups:
            yield [read(item) for item in group]
        return
    window: deque = deque()
    for group in groups:
        window.append([pool.submit(read, item) for item in group])
        if len(window) >= depth:
            yield [future.result() for future in window.popleft()]
    while window:
        yield [future.result() for future in window.popleft()]


def gpu_decoder_installed() -> bool:
    """torch and torchvision are installed and torch sees a CUDA GPU (imports torch: call only when needed)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return False
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def resolve_decode(choice: str, takes_cuda: bool, backend: str) -> str:
    """"auto" | "cpu" | "gpu" -> "cpu" or "gpu"; UserError when gpu cannot be had.

    ``takes_cuda``: the backend runs on CUDA and takes GPU input. auto = gpu when it does and a GPU
    decoder is installed; without CUDA torch is never imported.
    """
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        return "gpu" if takes_cuda and gpu_decoder_installed() else "cpu"
    if choice != "gpu":
        raise UserError(f"unknown --decode '{choice}'; choose one of {', '.join(DECODE_CHOICES)}")
    if not takes_cuda:
        raise UserError(f"--decode gpu needs a backend that runs on CUDA and takes GPU input (onnxruntime with "
                        f"its CUDA provider, or tensorrt); {backend} does not here; use --decode cpu")
    if not gpu_decoder_installed():
        raise UserError("--decode gpu needs torch and torchvision built with CUDA (nvJPEG) and a GPU; "
                        "install them or use --decode cpu")
    return "gpu"


def input_batches(paths: Sequence[Path], batch_size: int, input_size: tuple[int, int], workers: int = 0,
                  decode: str = "cpu", keep_images: bool = False) -> Iterator[InputBatch]:
    """Files -> InputBatch of up to ``batch_size``, in input order, decoded on the CPU or the GPU."""
    if decode == "gpu":
        from utils.gpu_input import GpuImageLoader  # noqa: PLC0415

        yield from GpuImageLoader(input_size, workers or 1, keep_images).batches(paths, batch_size)
        return
    for batch in load_batches(paths, batch_size, input_size, workers, keep_images):
        readable = [item.tensor for item in batch if item.tensor is not None]
        yield InputBatch(batch, np.stack(readable) if readable else None)
