"""Image files -> network input on the GPU: nvJPEG decode (torchvision), TF's legacy resize and the
scaling in a few batched kernels, the batch left on the device for the engine.

Imported only when ``--decode gpu`` is chosen (it needs torch and torchvision built with CUDA).
Files are read and their headers checked in worker threads, ahead of the GPU. A file nvJPEG cannot
take (not a JPEG, CMYK / 4-channel, 12-bit, lossless or arithmetic-coded, no end-of-image marker,
or refused by nvJPEG itself) goes through the CPU path of utils.pipeline for that image alone; the
batch keeps the input order. The arithmetic is utils.preprocess's, so the only difference from the
CPU path is nvJPEG's decoding (its 4:2:0 chroma upsampling differs from libjpeg's by ~1.5 grey
levels on average; see README).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Iterator, Sequence

import array_api_compat
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from utils.jpeg import JpegHeader, orient, read_jpeg_header
from utils.pipeline import PREFETCH_BATCHES, InputBatch, LoadedImage, load_one
from utils.preprocess import legacy_taps

_SCALE = np.float32(2 / 255)
# Reader threads: more only add GIL contention with the thread that feeds the engine (measured on the
# 16-core H100 machine: 4 threads read 4 700 files/s, 16 threads 3 200).
READ_WORKERS = 4
# Decode processes: nvJPEG's batched decode does its Huffman stage on the CPU under the caller's GIL,
# so decoding in the process that runs the engine starves it; each process has its own GIL and
# writes its batches into GPU buffers shared with the caller (CUDA IPC).
DECODE_PROCESSES = int(os.environ.get("SSD_DECODE_PROCESSES", "2"))
def resize_to_network(images: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H_i, W_i] images on the GPU -> float32 [N, 3, height, width] network input.

    utils.preprocess.resize_for_network + to_network_input for a whole batch of different sizes:
    the images are concatenated into one flat buffer and each output pixel's four taps are
    gathered from it, with the same float32 operations in the same order.
    """
    width, height = size
    device = images[0].device
    xp = array_api_compat.array_namespace(images[0])
    heights, widths = [int(image.shape[1]) for image in images], [int(image.shape[2]) for image in images]
    flat = torch.cat([image.reshape(-1) for image in images])
    plane = torch.tensor([h * w for h, w in zip(heights, widths)], dtype=torch.int64, device=device)
    starts = torch.cumsum(plane * 3, 0) - plane * 3
    rows0, rows1, y_lerp = legacy_taps(heights, height, xp, device)
    cols0, cols1, x_lerp = legacy_taps(widths, width, xp, device)
    row_width = torch.tensor(widths, dtype=torch.int64, device=device)[:, None]
    base = (starts[:, None] + torch.arange(3, device=device)[None, :] * plane[:, None])[:, :, None, None]
    top, bottom = (base + (rows * row_width)[:, None, :, None] for rows in (rows0, rows1))
    left, right = cols0[:, None, None, :], cols1[:, None, None, :]

    def tap(rows, cols):
        return flat[rows + cols].to(torch.float32)

    top_left, top_right, bottom_left, bottom_right = tap(top, left), tap(top, right), tap(bottom, left), tap(bottom, right)
    x_lerp = x_lerp[:, None, None, :]
    upper = top_left + (top_right - top_left) * x_lerp
    lower = bottom_left + (bottom_right - bottom_left) * x_lerp
    pixels = upper + (lower - upper) * y_lerp[:, None, :, None]
    return pixels * torch.tensor(_SCALE, device=device) - torch.tensor(np.float32(1), device=device)


@dataclass
class _Read:
    """A file read and classified by a worker thread; ``loaded`` is set once it is decoded."""

    path: Path
    header: JpegHeader
    encoded: torch.Tensor | None = None      # the file's bytes, for nvJPEG
    loaded: LoadedImage | None = None        # set by the CPU path right away when it takes the file


class GpuImageLoader:
    """Batches of files -> InputBatch with the tensor on the GPU, in input order."""

    def __init__(self, input_size: tuple[int, int], workers: int = 4, keep_images: bool = False,
                 device: str = "cuda", processes: int | None = None):
        self.input_size = input_size
        self.workers = max(1, min(workers, READ_WORKERS))
        self.keep_images = keep_images
        self.processes = DECODE_PROCESSES if processes is None else processes
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def _read(self, path: Path) -> _Read:
        """Read a file straight into a fresh uint8 buffer (readinto: the copy and its page faults
        happen with the GIL released) and check its header."""
        try:
            with open(path, "rb") as file:
                data = np.empty(os.fstat(file.fileno()).st_size, np.uint8)
                complete = file.readinto(memoryview(data)) == len(data)
        except OSError:
            data, complete = None, False
        header = read_jpeg_header(data) if complete else JpegHeader("unreadable file")
        if header.cpu_reason is None:
            return _Read(path, header, encoded=torch.from_numpy(data))
        return _Read(path, header, loaded=load_one(path, self.input_size, self.keep_images))

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """nvJPEG on every file at once; one by one if the batch fails (None = refused)."""
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            decoded = []
            for data in encoded:
                try:
                    decoded.append(decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)[0])
                except RuntimeError:
                    decoded.append(None)
            return decoded

    def _to_batch(self, reads: list[_Read]) -> InputBatch | None:
        """Decode + resize the GPU-bound files, add the CPU-decoded ones, keep the order."""
        decoded: dict[int, torch.Tensor] = {}
        on_gpu = [index for index, read in enumerate(reads) if read.loaded is None]
        images = self._decode([reads[index].encoded for index in on_gpu]) if on_gpu else []
        for index, image in zip(on_gpu, images):
            read = reads[index]
            if image is None:
                read.header = JpegHeader("nvJPEG could not decode it")
                read.loaded = load_one(read.path, self.input_size, self.keep_images)
                continue
            image = orient(image, read.header.orientation)
            decoded[index] = image
            kept = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) if self.keep_images else None
            read.loaded = LoadedImage(read.path, size=(int(image.shape[2]), int(image.shape[1])), image=kept)
        items = [read.loaded for read in reads]
        for read in reads:
            read.loaded.cpu_reason = read.header.cpu_reason
        good = [index for index, item in enumerate(items) if item.error is None]
        cpu_reasons = [read.header.cpu_reason for read in reads if read.header.cpu_reason is not None]
        tensor = resize_to_network([decoded[index] for index in sorted(decoded)], self.input_size) if decoded else None
        if len(decoded) < len(good):
            width, height = self.input_size
            mixed = torch.empty((len(good), 3, height, width), dtype=torch.float32, device=self.device)
            gpu_slots = [slot for slot, index in enumerate(good) if index in decoded]
            cpu_slots = [slot for slot, index in enumerate(good) if index not in decoded]
            if gpu_slots:
                mixed[torch.tensor(gpu_slots, device=self.device)] = tensor
            host = np.stack([items[good[slot]].tensor for slot in cpu_slots])
            mixed[torch.tensor(cpu_slots, device=self.device)] = torch.from_numpy(host).to(self.device)
            tensor = mixed
        for item in items:
            item.tensor = None                   # the batch tensor holds the pixels
        return InputBatch(items, tensor, cpu_decoded=len(cpu_reasons), cpu_reasons=cpu_reasons)

    def batches(self, paths: Sequence[Path], batch_size: int) -> Iterator[InputBatch]:
        """Yield InputBatch of up to ``batch_size`` files, in input order.

        Without ``keep_images`` the work runs in ``processes`` decode processes (see
        _batches_from_processes); with it (drawing needs the decoded pictures on the host), or with
        processes=0, in one producer thread of this process.
        """
        if self.processes > 0 and not self.keep_images and len(paths) > batch_size:
            return self._batches_from_processes(list(paths), batch_size)
        return self._batches_from_thread(list(paths), batch_size)

    def _batches_from_thread(self, paths: list[Path], batch_size: int) -> Iterator[InputBatch]:
        """Reading runs ahead in threads and the GPU work of the next batch overlaps the caller's
        work on this one (a producer thread, its own stream). Measured on the H100 machine: the
        threads share one GIL with the caller, so this feeds an engine at ~750-2 800 images/s."""
        ready: Queue = Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.workers, thread_name_prefix="read") as pool, torch.cuda.stream(self.stream):
                    window = [pool.submit(self._read, path) for path in paths[:batch_size * PREFETCH_BATCHES]]
                    submitted = len(window)
                    while window and not stop.is_set():
                        batch, window = window[:batch_size], window[batch_size:]
                        more = paths[submitted:submitted + len(batch)]
                        window.extend(pool.submit(self._read, path) for path in more)
                        submitted += len(more)
                        built = self._to_batch([future.result() for future in batch])
                        self.stream.synchronize()
                        ready.put(built)
                ready.put(None)
            except BaseException as error:      # noqa: BLE001  (handed to the consumer)
                ready.put(error)

        producer = threading.Thread(target=produce, name="gpu-decode", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item.tensor is not None:
                    item.tensor.record_stream(torch.cuda.current_stream(self.device))
                yield item
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    ready.get(timeout=0.1)
                except Exception:  # noqa: BLE001  (queue.Empty)
                    pass

    def _batches_from_processes(self, paths: list[Path], batch_size: int) -> Iterator[InputBatch]:
        """Batches decoded by worker processes into GPU buffers owned by this process.

        Each worker takes (batch number, buffer slot, files), reads and decodes them exactly as the
        thread path does, writes the network input into the slot, waits for its GPU work and answers
        with the items' metadata. Slots are handed out again once the caller has moved past the
        batch; batches are yielded in input order whatever order the workers finish in.
        """
        context = torch.multiprocessing.get_context("spawn")
        width, height = self.input_size
        slots = [torch.empty((batch_size, 3, height, width), dtype=torch.float32, device=self.device)
                 for _ in range(self.processes * 2 + 1)]
        tasks, answers = context.Queue(), context.Queue()
        workers = [context.Process(target=_decode_worker, name=f"gpu-decode-{number}", daemon=True,
                                   args=(self.input_size, self.workers, slots, tasks, answers))
                   for number in range(self.processes)]
        for worker in workers:
            worker.start()
        chunks = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
        free, sent, done = list(range(len(slots))), 0, {}
        try:
            for wanted in range(len(chunks)):
                while free and sent < len(chunks):
                    tasks.put((sent, free.pop(), [str(path) for path in chunks[sent]]))
                    sent += 1
                while wanted not in done:
                    try:
                        number, slot, count, info = answers.get(timeout=1.0)
                    except Exception:  # noqa: BLE001  (queue.Empty: check that the workers live)
                        dead = [worker.name for worker in workers if not worker.is_alive()]
                        if dead:
                            raise RuntimeError(f"GPU decode worker {dead[0]} died; use --decode cpu") from None
                        continue
                    if count < 0:
                        raise RuntimeError(f"GPU decode worker failed: {info}")
                    done[number] = (slot, count, info)
                slot, count, info = done.pop(wanted)
                items = [LoadedImage(Path(path), size=size, error=error, cpu_reason=reason)
                         for path, size, error, reason in info]
                reasons = [item.cpu_reason for item in items if item.cpu_reason is not None]
                yield InputBatch(items, slots[slot][:count] if count else None, cpu_decoded=len(reasons),
                                 cpu_reasons=reasons)
                free.append(slot)                     # the caller is done with it
        finally:
            for _ in workers:
                tasks.put(None)
            for worker in workers:
                worker.join(timeout=5)
                if worker.is_alive():
                    worker.terminate()


def _decode_worker(input_size: tuple[int, int], read_workers: int, slots: list[torch.Tensor], tasks, answers) -> None:
    """A decode process: (batch number, slot, file names) in, network input written into the slot."""
    torch.cuda.set_device(slots[0].device)
    loader = GpuImageLoader(input_size, read_workers, processes=0, device=str(slots[0].device))
    with ThreadPoolExecutor(loader.workers, thread_name_prefix="read") as pool:
        while (task := tasks.get()) is not None:
            number, slot, names = task
            try:
                batch = loader._to_batch(list(pool.map(loader._read, map(Path, names))))
                count = 0 if batch.tensor is None else len(batch.tensor)
                if count:
                    slots[slot][:count].copy_(batch.tensor)
                torch.cuda.synchronize()
                answers.put((number, slot, count, [(str(item.path), item.size, item.error, item.cpu_reason)
                                                   for item in batch.items]))
            except Exception as error:  # noqa: BLE001  (reported to the caller, which raises it)
                answers.put((number, slot, -1, f"{type(error).__name__}: {error}"))
