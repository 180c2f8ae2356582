"""JPEG headers without decoding: which decoder takes a file, and its EXIF orientation.

Used by the GPU input paths (utils.gpu_input, utils.dali_input) to send the files nvJPEG cannot decode to the CPU
path; torch-free, so it is tested on any machine.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from utils.preprocess import MAX_PIXELS

_SOF_DECODABLE = {0xC0, 0xC1, 0xC2}                   # baseline, extended, progressive Huffman
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# EXIF orientation -> (swap height and width, then flip these axes of [C, H, W]), as ImageOps.exif_transpose.
ORIENTATIONS = {1: (False, ()), 2: (False, (2,)), 3: (False, (1, 2)), 4: (False, (1,)),
                5: (True, ()), 6: (True, (2,)), 7: (True, (1, 2)), 8: (True, (1,))}


@dataclass
class JpegHeader:
    """What decides the decoder of one file: None = nvJPEG, else why the CPU takes it."""

    cpu_reason: str | None
    orientation: int = 1


def read_jpeg_header(data) -> JpegHeader:
    """Walk the JPEG markers of ``data`` (bytes or a uint8 buffer) up to the scan: frame type,
    components, precision, EXIF orientation.

    A few microseconds per file, reading only the markers (Pillow's lazy open costs ~80 us held
    under the GIL, which caps the reader threads that feed the GPU). Pillow reads the EXIF block
    when there is one.
    """
    data = memoryview(data).cast("B")
    if bytes(data[:2]) != b"\xff\xd8":
        return JpegHeader("not a JPEG")
    if bytes(data[-64:]).find(b"\xff\xd9") < 0:
        return JpegHeader("no JPEG end-of-image marker (truncated?)")
    position, orientation, frame, adobe_untransformed = 2, 1, None, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return JpegHeader("malformed JPEG markers")
        marker = data[position + 1]
        if marker == 0xFF:                                  # fill byte
            position += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7:        # markers without a length
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        segment = data[position + 4:position + 2 + length]
        start = bytes(segment[:12])
        if marker in _SOF_OTHER:
            return JpegHeader("lossless, hierarchical or arithmetic-coded JPEG")
        if marker in _SOF_DECODABLE and len(segment) >= 6:
            frame = segment
        elif marker == 0xE1 and start.startswith(b"Exif\x00\x00"):
            exif = Image.Exif()
            try:
                exif.load(bytes(segment))
                orientation = int(exif.get(0x0112, 1))
            except (OSError, ValueError, SyntaxError, struct.error):
                return JpegHeader("unreadable EXIF block")
        elif marker == 0xEE and start.startswith(b"Adobe") and len(start) >= 12:
            adobe_untransformed = start[11] == 0
        elif marker == 0xDA:
            break
        position += 2 + length
    if frame is None:
        return JpegHeader("no JPEG frame header")
    precision, components = frame[0], frame[5]   # frame: a memoryview of bytes, items are ints
    height, width = struct.unpack_from(">HH", frame, 1)
    if width * height > MAX_PIXELS:
        return JpegHeader("over the pixel limit (refused there)")
    if precision != 8:
        return JpegHeader(f"{precision}-bit JPEG")
    if components not in (1, 3):
        return JpegHeader(f"{components}-channel (CMYK?) JPEG")
    if components == 3 and adobe_untransformed:
        return JpegHeader("RGB-coded (Adobe, no YCbCr) JPEG")
    return JpegHeader(None, orientation if orientation in ORIENTATIONS else 1)


def orient(image, orientation: int, channels_last: bool = False):
    """Apply an EXIF orientation to one image, [C, H, W] or (``channels_last``) [H, W, C], numpy
    array or torch tensor, as ImageOps.exif_transpose does to the decoded picture."""
    swap, flips = ORIENTATIONS[orientation]
    order, flips = ((1, 0, 2), tuple(axis - 1 for axis in flips)) if channels_last else ((0, 2, 1), flips)
    if isinstance(image, np.ndarray):
        image = image.transpose(order) if swap else image
        return np.flip(image, flips) if flips else image
    image = image.permute(order) if swap else image
    return image.flip(flips) if flips else image


def read_encoded(path) -> tuple[np.ndarray | None, JpegHeader]:
    """A file's bytes (a fresh uint8 buffer, read with ``readinto``: the copy and its page faults happen with
    the GIL released) and its header; (None, "unreadable file") when it cannot be read whole."""
    try:
        with open(path, "rb") as file:
            data = np.empty(os.fstat(file.fileno()).st_size, np.uint8)
            complete = file.readinto(memoryview(data)) == len(data)
    except OSError:
        return None, JpegHeader("unreadable file")
    return (data, read_jpeg_header(data)) if complete else (None, JpegHeader("unreadable file"))
