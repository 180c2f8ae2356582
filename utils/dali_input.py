"""Image files (or their bytes) -> network input with NVIDIA DALI, in DALI's own C++ threads.

One pipeline definition (``build_pipeline``) for both devices: ``device="gpu"`` decodes with
``fn.decoders.image(device="mixed")`` (the GPU's hardware JPEG engines for about ``HW_DECODER_LOAD`` of each
batch's baseline JPEGs, nvJPEG on CUDA for the rest; DALI does not report which image went where, so
InputBatch.hardware_decoded is None) and resizes on the GPU; ``device="cpu"`` runs the same graph on the
CPU (libjpeg-turbo; no GPU needed), which is how the tests check it against utils.preprocess.

The steps are utils.preprocess's: RGB with the EXIF orientation applied (``adjust_orientation``), TF's
legacy bilinear resize (align_corners=False, half_pixel_centers=False: output index i samples input
i x in/out), ``x * 2/255 - 1`` in float32, CHW. DALI's ``fn.resize`` samples at pixel centres: output
pixel i (centre i + 1/2) maps to ``roi_start + (i + 1/2) * (roi_end - roi_start) / out`` in coordinates
where pixel j's centre is j + 1/2. With scale s = in/out, ``roi_start = (1 - s)/2`` and
``roi_end = roi_start + in`` put that centre at i x s + 1/2, i.e. at index i x s: TF's legacy source;
the edge is clamped as TF clamps its lower-right neighbour. Without antialiasing, a linear filter is
the same two-tap interpolation.

Files are read and their headers checked (utils.jpeg) in reader threads; what DALI should not take (not a
JPEG, CMYK, 12-bit, lossless, truncated, over the pixel limit) goes through the CPU path of
utils.pipeline for that image alone, in order, counted. A batch DALI fails on is decoded again one image at
a time, and the images that fail alone take the CPU path too.

Imported only when DALI is used (``--decode gpu`` with nvidia-dali installed, or the tests).
"""

from __future__ import annotations

import importlib.util
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from utils.jpeg import JpegHeader, read_encoded, read_jpeg_header
from utils.pipeline import (KEEP_PIXELS, PREFETCH_BATCHES, InputBatch, LoadedImage, chunked, load_one, produced_ahead,
                            read_ahead)
from utils.preprocess import PIXEL_SCALE

DALI_THREADS = int(os.environ.get("SSD_DALI_THREADS", "8"))    # DALI's CPU threads (decode setup, Huffman)
# share of each batch's images that DALI's nvImageCodec offers the hardware engines (of the baseline JPEGs they take,
# rounded up to whole engine cores; the rest: nvJPEG on CUDA); $SSD_DALI_HW_LOAD overrides
HW_DECODER_LOAD = float(os.environ.get("SSD_DALI_HW_LOAD", "0.9"))
# libjpeg's ("fancy") chroma upsampling, as Pillow decodes: the pixels of the CPU path; $SSD_DALI_FANCY=0 leaves the
# choice to nvJPEG (benchmarks/README.md: speed and AP of both)
FANCY_UPSAMPLING = os.environ.get("SSD_DALI_FANCY", "1") != "0"
DALI_PREFETCH = 2            # batches DALI works on ahead of the one handed out
ENCODED = "encoded"          # the external source's name


def dali_installed() -> bool:
    """nvidia-dali can be imported here (it is not imported by this check)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def legacy_resize(images, input_size: tuple[int, int]):
    """DALI graph: HWC uint8 images of any size -> float32 [height, width, 3], TF's legacy bilinear resize."""
    from nvidia.dali import fn, types  # noqa: PLC0415

    width, height = input_size
    shape = images.shape(dtype=types.FLOAT)                 # per sample (H, W, C), on the CPU
    in_height, in_width = shape[0], shape[1]
    scale_y, scale_x = in_height / height, in_width / width
    start_y, start_x = 0.5 - 0.5 * scale_y, 0.5 - 0.5 * scale_x
    return fn.resize(images, size=(height, width), roi_start=fn.stack(start_y, start_x),
                     roi_end=fn.stack(start_y + in_height, start_x + in_width), roi_relative=False,
                     interp_type=types.INTERP_LINEAR, antialias=False, dtype=types.FLOAT)


def network_input(images, input_size: tuple[int, int], layout: str = "CHW"):
    """DALI graph: decoded RGB images -> the network input (utils.preprocess.preprocess), ``layout`` CHW or HWC."""
    from nvidia.dali import fn, types  # noqa: PLC0415

    return fn.crop_mirror_normalize(legacy_resize(images, input_size), dtype=types.FLOAT, output_layout=layout,
                                    mean=0.0, std=1.0, scale=float(PIXEL_SCALE), shift=-1.0)


def build_pipeline(device: str, batch_size: int, input_size: tuple[int, int], *, layout: str = "CHW",
                   source=None, keep_decoded: bool = False, num_threads: int = DALI_THREADS, device_id: int = 0,
                   prefetch: int = DALI_PREFETCH, hw_decoder_load: float = HW_DECODER_LOAD):
    """A built DALI pipeline: encoded images (uint8 1-D arrays) -> (network input [n, 3, H, W] float32,
    upright sizes [n, 3] as (H, W, C), and with ``keep_decoded`` the decoded RGB images).

    ``device`` "gpu": mixed decoder on GPU ``device_id``, resize and scaling on the GPU; "cpu": all on the
    CPU, no GPU used. ``source``: a no-argument callable returning each batch (a list of arrays) and raising
    StopIteration at the end; None: fed with ``feed_input(ENCODED, ...)``.
    """
    from nvidia.dali import fn, pipeline_def, types  # noqa: PLC0415

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, not {device!r}")

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id if device == "gpu" else None,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(source=source, batch=True, name=ENCODED, dtype=types.UINT8, ndim=1)
        if device == "gpu":
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, adjust_orientation=True,
                                       hw_decoder_load=hw_decoder_load, jpeg_fancy_upsampling=FANCY_UPSAMPLING)
        else:
            images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=True)
        outputs = (network_input(images, input_size, layout), images.shape())
        return (*outputs, images) if keep_decoded else outputs

    built = pipeline()
    built.build()
    return built


@dataclass
class _Item:
    """One input: its bytes and header, or (``loaded``) already done by the CPU path."""

    path: Path
    data: np.ndarray | None
    header: JpegHeader
    loaded: LoadedImage | None = None


class DaliImageLoader:
    """Batches of files, or of encoded images already read, -> InputBatch in input order: the tensor on the
    GPU (a CUDA torch tensor; ``device="cpu"``: a numpy array), decoded and resized by DALI."""

    def __init__(self, input_size: tuple[int, int], workers: int = 1, keep_images: bool = False,
                 device: str = "gpu", device_id: int = 0, num_threads: int = DALI_THREADS,
                 prefetch: int = DALI_PREFETCH):
        self.input_size, self.keep_images, self.device, self.device_id = input_size, keep_images, device, device_id
        self.workers, self.num_threads, self.prefetch = max(1, workers), num_threads, prefetch
        self._pipelines: dict[int, tuple[object, deque, list]] = {}    # batch size -> (pipeline, pending, source)
        self._single = None
        self._stream = None          # the CUDA stream the GPU batches are assembled on (made on first use)

    # --- the public entry points --------------------------------------------------------------

    def batches(self, paths: Sequence[Path], batch_size: int) -> Iterator[InputBatch]:
        """InputBatch of up to ``batch_size`` files, in input order; files are read ahead by reader threads,
        DALI decodes ahead of the caller (DALI_PREFETCH batches) and a producer thread hands out
        PREFETCH_BATCHES finished batches while the caller runs the engine on the one before."""
        return self.grouped_batches(chunked([Path(path) for path in paths], batch_size), batch_size)

    def grouped_batches(self, groups: Iterable[Sequence[Path]], batch_size: int) -> Iterator[InputBatch]:
        """InputBatch of each group of up to ``batch_size`` files, in order, as ``batches``; ``groups`` may be a
        stream that grows while it is read, as long as asking it for the next group never waits long (DALI and
        the readers ask for groups ahead of the one they hand out: a stream should end rather than wait)."""
        def produce() -> Iterator[InputBatch]:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="read") as pool:
                yield from self._decode_groups(read_ahead(groups, self._read, pool, PREFETCH_BATCHES), batch_size)

        return produced_ahead(produce, PREFETCH_BATCHES, "dali")

    def encoded_batches(self, batches: Iterable[Sequence[tuple[str | os.PathLike, object]]],
                        batch_size: int) -> Iterator[InputBatch]:
        """Like ``batches`` for images already read: each element of ``batches`` is a list of up to
        ``batch_size`` (name, encoded bytes) pairs (bytes, bytearray, memoryview or a uint8 array); the name
        is the InputBatch item's path (and what the CPU path reads if the bytes are refused, so give the file's
        path where there is one). Decoding overlaps the caller's work on the batch before."""
        def produce() -> Iterator[InputBatch]:
            groups = ([self._item(Path(name), data) for name, data in batch] for batch in batches)
            yield from self._decode_groups(groups, batch_size)

        return produced_ahead(produce, PREFETCH_BATCHES, "dali")

    def decode_encoded(self, items: Sequence[tuple[str | os.PathLike, object]]) -> InputBatch:
        """One InputBatch of (name, encoded bytes) pairs, decoded now (encoded_batches of one batch)."""
        return next(iter(self.encoded_batches([items], max(1, len(items)))))

    # --- reading and routing ----------------------------------------------------------------------

    def _read(self, path: Path) -> _Item:
        data, header = read_encoded(path)
        return self._routed(_Item(path, data, header))

    def _item(self, path: Path, data) -> _Item:
        data = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
        return self._routed(_Item(path, data, read_jpeg_header(data)))

    def _routed(self, item: _Item) -> _Item:
        """An item DALI should not take is decoded by the CPU path now (in the reader thread)."""
        if item.header.cpu_reason is not None:
            item.loaded = self._cpu(item)
        return item

    def _cpu(self, item: _Item) -> LoadedImage:
        """The CPU path for one item: its file, or (bytes with no file behind them) the bytes in a temporary
        file named like it, so that the result and any error are those of the file itself."""
        if item.data is None or item.path.is_file():
            return load_one(item.path, self.input_size, self.keep_images)
        import tempfile  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="ssd-decode-") as folder:
            copy = Path(folder) / (item.path.name or "image")
            copy.write_bytes(item.data.tobytes())
            loaded = load_one(copy, self.input_size, self.keep_images)
        loaded.path = item.path
        if loaded.error:
            loaded.error = loaded.error.replace(repr(str(copy)), repr(str(item.path)))
        return loaded

    # --- DALI ---------------------------------------------------------------------------------

    def _pipeline(self, batch_size: int):
        """The pipeline for this batch size (built once), its FIFO of fed groups and its source slot."""
        if batch_size not in self._pipelines:
            pending: deque = deque()
            slot: list = [iter(())]

            def source():                       # called by DALI in the thread that runs the pipeline
                while True:
                    group = next(slot[0])       # StopIteration: the end of this run's inputs
                    pending.append(group)
                    encoded = [item.data for item in group if item.loaded is None]
                    if encoded:
                        return encoded

            pipe = build_pipeline(self.device, batch_size, self.input_size, source=source,
                                  keep_decoded=self.keep_images, num_threads=self.num_threads,
                                  device_id=self.device_id, prefetch=self.prefetch)
            self._pipelines[batch_size] = (pipe, pending, slot)
        return self._pipelines[batch_size]

    def _decode_groups(self, groups: Iterator[list[_Item]], batch_size: int) -> Iterator[InputBatch]:
        """Groups of items -> InputBatch, in order. A group with nothing for DALI is handed out in its turn."""
        pipe, pending, slot = self._pipeline(batch_size)
        slot[0] = iter(groups)
        finished = False
        try:
            while True:
                while pending and all(item.loaded is not None for item in pending[0]):
                    yield self._batch(pending.popleft(), None)
                try:
                    outputs = pipe.run()
                except StopIteration:
                    break
                except RuntimeError:            # DALI refused something in the oldest group: one at a time
                    group = pending.popleft()
                    yield self._batch(group, self._one_by_one(group))
                    continue
                yield self._batch(pending.popleft(), outputs)
            while pending:                      # inputs after the last DALI batch that the CPU path took
                yield self._batch(pending.popleft(), None)
            finished = True
        finally:
            if finished:
                pipe.reset()
            else:                               # stopped early: batches still in flight; start afresh next time
                del self._pipelines[batch_size]
                pending.clear()

    def _one_by_one(self, group: list[_Item]) -> list:
        """Per-sample outputs for the DALI items of a group DALI failed on as a batch: each alone, the ones
        DALI still refuses sent to the CPU path (None in the list)."""
        if self._single is None:
            self._single = build_pipeline(self.device, 1, self.input_size, keep_decoded=self.keep_images,
                                          num_threads=min(2, self.num_threads), device_id=self.device_id,
                                          prefetch=1)
        results = []
        for item in (item for item in group if item.loaded is None):
            try:
                self._single.feed_input(ENCODED, [item.data])
                outputs = self._single.run()
            except RuntimeError:
                item.header = JpegHeader("DALI could not decode it")
                item.loaded = self._cpu(item)
                continue
            results.append(outputs)
        return results

    def _batch(self, group: list[_Item], outputs) -> InputBatch:
        """``_assembled`` on the GPU: on this loader's own CUDA stream, waited for before the batch is handed
        out. Never on the legacy default stream: a consumer synchronising that stream would also wait for the
        next batch's decode queued on it (measured on the H200: the engine's run took twice its time)."""
        if self.device != "gpu":
            return self._assembled(group, outputs)
        import torch  # noqa: PLC0415

        if self._stream is None:
            self._stream = torch.cuda.Stream(device=f"cuda:{self.device_id}")     # a pool stream: non-blocking
        with torch.cuda.stream(self._stream):
            batch = self._assembled(group, outputs)     # DLPack makes this stream wait for DALI's
        self._stream.synchronize()                      # this producer thread waits, not the engine's
        return batch

    def _assembled(self, group: list[_Item], outputs) -> InputBatch:
        """The InputBatch of a group: DALI's outputs (one batch, or a list of one-image outputs) for its DALI
        items, the CPU path's tensors for the others, in input order."""
        on_dali = [item for item in group if item.loaded is None]
        if outputs is None or isinstance(outputs, list):
            parts = outputs or []
        else:
            parts = [outputs]
        tensors = [self._tensor(part[0]) for part in parts]
        sizes = [size for part in parts for size in self._sizes(part[1])]
        pictures = [picture for part in parts for picture in self._pictures(part)] if self.keep_images else None
        for index, item in enumerate(on_dali):
            height, width = sizes[index]
            kept = pictures[index] if pictures is not None else None
            item.loaded = LoadedImage(item.path, size=(width, height), image=kept)
        items = [item.loaded for item in group]
        for item, loaded in zip(group, items):
            loaded.cpu_reason = item.header.cpu_reason
        cpu_reasons = [item.header.cpu_reason for item in group if item.header.cpu_reason is not None]
        # DALI does not say which of its images the hardware JPEG engines took: with hw_decoder_load h, its
        # nvImageCodec gives them about h of each batch (rounded up to whole engine cores), of the baseline JPEGs
        # they can take, and nvJPEG on CUDA the rest; so the count is unknown (None) once DALI decoded any image
        # on the GPU, never a guess. 0 where it is known: no image went to DALI, or DALI ran on the CPU.
        hardware = None if on_dali and self.device == "gpu" else 0
        return InputBatch(items, self._assemble(group, on_dali, tensors), cpu_decoded=len(cpu_reasons),
                          cpu_reasons=cpu_reasons, hardware_decoded=hardware)

    def _tensor(self, output):
        """DALI's network-input batch as a CUDA torch tensor (no copy: DLPack) or, on the CPU, a numpy array."""
        if self.device == "cpu":
            return np.array(output.as_array())
        import torch  # noqa: PLC0415

        return torch.from_dlpack(output.as_tensor())

    @staticmethod
    def _sizes(shapes) -> list[tuple[int, int]]:
        return [(int(shape[0]), int(shape[1])) for shape in np.asarray(shapes.as_array())]

    def _pictures(self, part) -> list:
        from PIL import Image  # noqa: PLC0415

        decoded = part[2] if self.device == "cpu" else part[2].as_cpu()
        pictures = []
        for index in range(len(decoded)):
            pixels = np.asarray(decoded.at(index))
            large = pixels.shape[0] * pixels.shape[1] > KEEP_PIXELS      # read again when drawn
            pictures.append(None if large else Image.fromarray(pixels))
        return pictures

    def _assemble(self, group: list[_Item], on_dali: list[_Item], tensors: list):
        """One tensor of the readable items in input order: DALI's rows and the CPU path's."""
        readable = [item for item in group if item.loaded.error is None]
        cpu_rows = [item.loaded.tensor for item in readable if item.loaded.tensor is not None]
        for item in group:
            item.loaded.tensor = None               # the batch tensor holds the pixels
        if not readable:
            return None
        if self.device == "cpu":
            dali = np.concatenate(tensors) if tensors else None
            if not cpu_rows:
                return dali
            stacked = np.empty((len(readable), *np.shape(cpu_rows[0])), np.float32)
        else:
            import torch  # noqa: PLC0415

            dali = tensors[0] if len(tensors) == 1 else torch.cat(tensors) if tensors else None
            if not cpu_rows:
                return dali
            width, height = self.input_size
            stacked = torch.empty((len(readable), 3, height, width), dtype=torch.float32,
                                  device=f"cuda:{self.device_id}")
        on_dali_ids = {id(item) for item in on_dali}
        dali_slots = [slot for slot, item in enumerate(readable) if id(item) in on_dali_ids]
        cpu_slots = [slot for slot, item in enumerate(readable) if id(item) not in on_dali_ids]
        host = np.stack(cpu_rows)
        if self.device == "cpu":
            stacked[cpu_slots] = host
            if dali_slots:
                stacked[dali_slots] = dali
            return stacked
        import torch  # noqa: PLC0415

        stacked[torch.tensor(cpu_slots, device=stacked.device)] = torch.from_numpy(host).to(stacked.device)
        if dali_slots:
            stacked[torch.tensor(dali_slots, device=stacked.device)] = dali
        return stacked
