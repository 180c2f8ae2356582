"""Image files -> network input on the GPU, the batch left on the device for the engine.

With NVIDIA DALI installed, ``GpuImageLoader`` hands the work to utils.dali_input (decode on the hardware
JPEG engines, resize and scaling in DALI's C++ threads; $SSD_GPU_DECODER=nvjpeg keeps the path below).
Without it: nvJPEG decode, TF's legacy resize and the scaling in a few batched torch kernels.

Decoders: nvImageCodec on the GPU's hardware JPEG engines (NVJPG; no SMs used, pixels as libjpeg's)
when it is installed; torchvision's nvJPEG on CUDA (another 4:2:0 chroma upsampling) for what it
refuses (progressive files, say) or without it. Their speed and accuracy: benchmarks/README.md.

Imported only when ``--decode gpu`` is chosen (it needs torch and torchvision built with CUDA).
Files are read and their headers checked in worker threads, ahead of the GPU. A file nvJPEG cannot
take (not a JPEG, CMYK / 4-channel, 12-bit, lossless or arithmetic-coded, no end-of-image marker,
or refused by both GPU decoders) goes through the CPU path of utils.pipeline for that image alone;
the batch keeps the input order. The resize arithmetic is utils.preprocess's, so the only difference
from the CPU path is the decoder's.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import array_api_compat
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from utils.jpeg import JpegHeader, orient, read_encoded, read_jpeg_header
from utils.pipeline import (KEEP_PIXELS, PREFETCH_BATCHES, InputBatch, LoadedImage, chunked, load_one, produced_ahead,
                            read_ahead)
from utils.preprocess import PIXEL_SCALE, legacy_taps

# Reader threads: more only add GIL contention with the decode thread and the caller (benchmarks/README.md).
READ_WORKERS = int(os.environ.get("SSD_GPU_READ_THREADS", "1"))    # 0: read in the decode thread
GPU_DECODERS = ("auto", "dali", "nvjpeg")


def gpu_decoder() -> str:
    """The GPU input path: "dali" (utils.dali_input) when DALI is installed, else "nvjpeg" (this module);
    $SSD_GPU_DECODER (auto | dali | nvjpeg) overrides auto."""
    from utils.dali_input import dali_installed  # noqa: PLC0415

    choice = os.environ.get("SSD_GPU_DECODER", "auto")
    if choice not in GPU_DECODERS:
        raise ValueError(f"SSD_GPU_DECODER must be one of {', '.join(GPU_DECODERS)}, not {choice!r}")
    if choice == "dali" and not dali_installed():
        raise RuntimeError("SSD_GPU_DECODER=dali but nvidia-dali is not installed (see requirements-gpu.txt)")
    return "dali" if choice == "dali" or (choice == "auto" and dali_installed()) else "nvjpeg"


def decoder_description() -> str:
    """One line naming the GPU input path in use (the scripts' settings)."""
    if gpu_decoder() == "dali":
        from utils.dali_input import DALI_THREADS, HW_DECODER_LOAD  # noqa: PLC0415

        return (f"GPU (NVIDIA DALI: hardware JPEG engines for about {HW_DECODER_LOAD:.0%} of each batch's baseline "
                f"JPEGs, nvJPEG for the rest, TF's resize on the GPU, {DALI_THREADS} DALI threads)")
    return ("GPU (nvJPEG: hardware engines via nvImageCodec" + (" " if hardware_decoder() else " not installed, ")
            + "CUDA via torchvision; TF's resize on the GPU)")


def hardware_decoder():
    """nvImageCodec's decoder on the GPU's hardware JPEG engines (NVJPG), or None when
    nvImageCodec (or the libnvjpeg it loads) is not installed, the GPU has no such engine, or
    $SSD_NVJPEG_HARDWARE is 0."""
    if os.environ.get("SSD_NVJPEG_HARDWARE", "1") == "0":
        return None
    try:
        from nvidia import nvimgcodec  # noqa: PLC0415
    except ImportError:
        return None
    try:
        decoder = nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        return decoder, nvimgcodec.DecodeParams(apply_exif_orientation=False)
    except Exception:  # noqa: BLE001  (no hardware engine, no libnvjpeg: torchvision's nvJPEG instead)
        return None


def resize_to_network(images: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """uint8 [H_i, W_i, 3] images on the GPU -> float32 [N, 3, height, width] network input.

    utils.preprocess.resize_for_network + to_network_input for a whole batch of different sizes:
    the images are concatenated into one flat buffer and each output pixel's four taps are
    gathered from it, with the same float32 operations in the same order.
    """
    width, height = size
    device = images[0].device
    xp = array_api_compat.array_namespace(images[0])
    heights, widths = [int(image.shape[0]) for image in images], [int(image.shape[1]) for image in images]
    flat = torch.cat([image.reshape(-1) for image in images])
    pixels = torch.tensor([h * w * 3 for h, w in zip(heights, widths)], dtype=torch.int64, device=device)
    starts = torch.cumsum(pixels, 0) - pixels
    rows0, rows1, y_lerp = legacy_taps(heights, height, xp, device)
    cols0, cols1, x_lerp = legacy_taps(widths, width, xp, device)
    row_stride = torch.tensor(widths, dtype=torch.int64, device=device)[:, None] * 3
    base = (starts[:, None] + torch.arange(3, device=device)[None, :])[:, :, None, None]     # [N, 3, 1, 1]
    top, bottom = (base + (rows * row_stride)[:, None, :, None] for rows in (rows0, rows1))
    left, right = (cols0 * 3)[:, None, None, :], (cols1 * 3)[:, None, None, :]

    def tap(rows, cols):
        return flat[rows + cols].to(torch.float32)

    top_left, top_right, bottom_left, bottom_right = tap(top, left), tap(top, right), tap(bottom, left), tap(bottom, right)
    x_lerp = x_lerp[:, None, None, :]
    upper = top_left + (top_right - top_left) * x_lerp
    lower = bottom_left + (bottom_right - bottom_left) * x_lerp
    values = upper + (lower - upper) * y_lerp[:, None, :, None]
    return values * torch.tensor(PIXEL_SCALE, device=device) - torch.tensor(np.float32(1), device=device)


@dataclass
class _Read:
    """A file read and classified by a worker thread; ``loaded`` is set once it is decoded."""

    path: Path
    header: JpegHeader
    encoded: np.ndarray | None = None        # the file's bytes, for nvJPEG
    loaded: LoadedImage | None = None        # set by the CPU path right away when it takes the file


class GpuImageLoader:
    """Batches of files (``batches``) or of encoded images already read (``encoded_batches``,
    ``decode_encoded``) -> InputBatch with the tensor on the GPU, in input order: DALI's pipeline when
    installed (gpu_decoder), else nvJPEG + torch kernels."""

    def __init__(self, input_size: tuple[int, int], workers: int = 4, keep_images: bool = False,
                 device: str = "cuda"):
        self.input_size = input_size
        self.workers = max(0, min(workers, READ_WORKERS))
        self.keep_images = keep_images
        self.device = torch.device(device)
        self.decoder = gpu_decoder()
        self.dali = None
        if self.decoder == "dali":
            from utils.dali_input import DaliImageLoader  # noqa: PLC0415

            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.dali = DaliImageLoader(input_size, max(1, workers), keep_images, device="gpu", device_id=index)
            return
        self.stream = torch.cuda.Stream(self.device)
        self.hardware = hardware_decoder()

    def _read(self, path: Path) -> _Read:
        """Read a file (utils.jpeg.read_encoded) and route it by its header."""
        data, header = read_encoded(path)
        return self._routed(path, data, header)

    def _routed(self, path: Path, data: np.ndarray | None, header: JpegHeader) -> _Read:
        if header.cpu_reason is None:
            return _Read(path, header, encoded=data)
        return _Read(path, header, loaded=load_one(path, self.input_size, self.keep_images))

    def _decode(self, encoded: list[np.ndarray]) -> tuple[list[torch.Tensor | None], int]:
        """uint8 [H, W, 3] GPU images (None = refused) and how many the hardware engines decoded: the
        hardware decoder first, torchvision's nvJPEG (CUDA) for what it refuses (or for everything
        without it), one by one if a batch fails."""
        decoded: list[torch.Tensor | None] = [None] * len(encoded)
        if self.hardware is not None:
            decoder, params = self.hardware
            try:
                images = decoder.decode(encoded, params=params,
                                        cuda_stream=torch.cuda.current_stream(self.device).cuda_stream)
            except Exception:  # noqa: BLE001  (a broken batch: torchvision below, one by one)
                images = [None] * len(encoded)
            for index, image in enumerate(images):
                if image is not None:
                    decoded[index] = torch.as_tensor(image, device=self.device)
        rest = [index for index, image in enumerate(decoded) if image is None]
        on_hardware = len(decoded) - len(rest)
        if rest:
            for index, image in zip(rest, self._decode_torchvision([encoded[index] for index in rest])):
                decoded[index] = image
        return [image if image is None or image.shape[2] == 3 else image.expand(-1, -1, 3)
                for image in decoded], on_hardware

    def _decode_torchvision(self, encoded: list[np.ndarray]) -> list[torch.Tensor | None]:
        tensors = [torch.from_numpy(data) for data in encoded]
        try:
            images = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            images = []
            for data in tensors:
                try:
                    images.append(decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)[0])
                except RuntimeError:
                    images.append(None)
        return [None if image is None else image.permute(1, 2, 0) for image in images]

    def _to_batch(self, reads: list[_Read]) -> InputBatch:
        """Decode + resize the GPU-bound files, add the CPU-decoded ones, keep the order."""
        decoded: dict[int, torch.Tensor] = {}
        on_gpu = [index for index, read in enumerate(reads) if read.loaded is None]
        images, on_hardware = self._decode([reads[index].encoded for index in on_gpu]) if on_gpu else ([], 0)
        for index, image in zip(on_gpu, images):
            read = reads[index]
            if image is None:
                read.header = JpegHeader("nvJPEG could not decode it")
                read.loaded = load_one(read.path, self.input_size, self.keep_images)
                continue
            image = orient(image, read.header.orientation, channels_last=True)
            decoded[index] = image
            large = int(image.shape[0]) * int(image.shape[1]) > KEEP_PIXELS   # read again when drawn
            kept = Image.fromarray(image.cpu().numpy()) if self.keep_images and not large else None
            read.loaded = LoadedImage(read.path, size=(int(image.shape[1]), int(image.shape[0])), image=kept)
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
        return InputBatch(items, tensor, cpu_decoded=len(cpu_reasons), cpu_reasons=cpu_reasons,
                          hardware_decoded=on_hardware)

    def encoded_batches(self, batches, batch_size: int) -> Iterator[InputBatch]:
        """InputBatch of each list of (name, encoded bytes) pairs in ``batches`` (images already read, e.g. by
        a Ray actor), in order; the name is the item's path (the CPU path reads that file if the bytes are
        refused; with DALI, bytes without a file are read from memory). See DaliImageLoader.encoded_batches."""
        if self.dali is not None:
            return self.dali.encoded_batches(batches, batch_size)

        def reads(_pool) -> Iterator[list[_Read]]:
            for batch in batches:
                arrays = [(Path(name), np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data)
                          for name, data in batch]
                yield [self._routed(path, data, read_jpeg_header(data)) for path, data in arrays]

        return self._produced(reads)

    def decode_encoded(self, items) -> InputBatch:
        """One InputBatch of (name, encoded bytes) pairs, decoded now."""
        return next(iter(self.encoded_batches([items], max(1, len(items)))))

    def batches(self, paths: Sequence[Path], batch_size: int) -> Iterator[InputBatch]:
        """Yield InputBatch of up to ``batch_size`` files, in input order.

        Reading runs ahead and one producer thread (its own CUDA stream) decodes and resizes the
        next batch while the caller works on this one (threads, not decode processes: without MPS the
        GPU time-slices between processes; benchmarks/README.md). With DALI: DaliImageLoader's.
        """
        return self.grouped_batches(chunked(list(paths), batch_size), batch_size)

    def grouped_batches(self, groups: Iterable[Sequence[Path]], batch_size: int) -> Iterator[InputBatch]:
        """InputBatch of each group of up to ``batch_size`` files, in order, as ``batches``; ``groups`` may be a
        stream that grows while it is read (a Ray actor's blocks: utils.distributed), so that one pipeline runs
        across them without draining in between."""
        if self.dali is not None:
            return self.dali.grouped_batches(groups, batch_size)

        def reads(pool) -> Iterator[list[_Read]]:
            return read_ahead(groups, self._read, pool if self.workers else None, PREFETCH_BATCHES)

        return self._produced(reads)

    def _produced(self, reads) -> Iterator[InputBatch]:
        """The nvJPEG path's producer thread over ``reads(pool)`` (lists of _Read, the pool: reader threads), on
        this loader's CUDA stream; each batch complete before it is handed out."""
        def produce() -> Iterator[InputBatch]:
            with ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="read") as pool, \
                    torch.cuda.stream(self.stream):
                for group in reads(pool):
                    built = self._to_batch(group)
                    self.stream.synchronize()
                    yield built

        with contextlib.closing(produced_ahead(produce, PREFETCH_BATCHES, "gpu-decode")) as batches:
            for item in batches:
                if item.tensor is not None:
                    item.tensor.record_stream(torch.cuda.current_stream(self.device))
                yield item
