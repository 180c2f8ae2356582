"""Image file -> network input tensor: the one place where images are read and preprocessed.

Steps, in this order: RGB (EXIF orientation applied), TF's legacy bilinear resize to
``INPUT_SIZE``, ``x * 2/255 - 1`` in float32, HWC -> CHW. utils.gpu_input does the same steps on
the GPU with the same taps (``legacy_taps``) and arithmetic.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import ImageError

INPUT_SIZE = (300, 300)  # (width, height)

PIXEL_SCALE = np.float32(2 / 255)   # network input = pixel x PIXEL_SCALE - 1
_WHITE = (255, 255, 255, 255)

# The largest image read, in pixels (Pillow's own limit, about 9459 x 9459): larger ones are refused in
# one line before they are decoded. Pillow's DecompressionBombWarning is replaced by this check.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# A JPEG at least 2 x DRAFT_MARGIN times the network input on both sides (3600 pixels for 300 x 300) is
# decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, Pillow's draft), never below DRAFT_MARGIN
# times the network input: a 9000 x 9000 photo is decoded at 2250 x 2250. Its network input is then a
# little smoother than TensorFlow's (the DCT scaling averages what the bilinear resize would sample);
# detections agree within the tests' tolerance. Smaller images (VOC, COCO, 12 MP photos) are decoded at
# full size: their network input is exactly TensorFlow's.
DRAFT_MARGIN = 6
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _read_failure(path: str | os.PathLike, error: Exception) -> str:
    """One line saying why ``path`` could not be read."""
    if isinstance(error, FileNotFoundError):
        reason = "no such file"
    elif isinstance(error, IsADirectoryError):
        reason = "it is a folder, not a file"
    elif isinstance(error, PermissionError):
        reason = "permission denied"
    elif isinstance(error, UnidentifiedImageError):
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        reason = "the file is empty" if empty else "not an image format Pillow recognises"
    elif isinstance(error, Image.DecompressionBombError):
        reason = f"larger than the limit of {MAX_PIXELS / 1e6:.0f} megapixels"
    elif isinstance(error, MemoryError):
        reason = "not enough memory to decode it"
    else:
        reason = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (OSError, ValueError, SyntaxError)):
            reason = f"broken image data ({type(error).__name__}: {reason})"
    return f"cannot read image {os.fspath(path)!r}: {reason}; give a JPEG or PNG file"


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """Mode I;16*, I or F -> L.

    I;16* is scaled from 0..65535. I is taken as 16-bit when any value exceeds 255, else
    as 8-bit. F is taken as 0..1 when no value exceeds 1, else as 0..255.
    """
    values = np.asarray(image, dtype=np.float64)
    peak = values.max(initial=0)
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        values = values * (255 / 65535)
    elif image.mode == "F" and peak <= 1:
        values = values * 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparent pixels are composited onto white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _grey_to_8bit(image)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class DecodedImage:
    """A decoded image file: RGB and upright, at full size or reduced (a large image, ``network_size``)."""

    image: Image.Image
    size: tuple[int, int]       # the original's upright (width, height)

    @property
    def reduced(self) -> bool:
        return self.image.size != self.size


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}   # EXIF orientation -> what ImageOps.exif_transpose does


def _orientation(image: Image.Image) -> int:
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001  (a broken EXIF block: exif_transpose ignores it too)
        return 1
    return orientation if orientation in _TRANSPOSE else 1


def reduction(size: tuple[int, int], network_size: tuple[int, int]) -> int:
    """1, or the factor (2, 4, 8) an image of ``size`` is decoded smaller by for ``network_size`` (DRAFT_MARGIN)."""
    side = DRAFT_MARGIN * max(network_size)
    fits = min(size[0] // side, size[1] // side)
    return next((factor for factor in (8, 4, 2) if fits >= factor), 1)


def read_image(path: str | os.PathLike, network_size: tuple[int, int] | None = None,
               before_decode: Callable[[tuple[int, int], bool], None] | None = None) -> DecodedImage:
    """Read an image file as RGB, upright per its EXIF orientation.

    With ``network_size``, an image much larger than it is decoded smaller (DRAFT_MARGIN: a JPEG by
    libjpeg's DCT scaling, another format reduced right after decoding). ``before_decode(size,
    reduced)`` is called once the header is read (the pipeline's memory budget). Raises ImageError
    (one line) when the file is missing, not an image, broken or larger than MAX_PIXELS; never another
    exception for what the file holds.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"cannot read image {os.fspath(path)!r}: it is {width} x {height} "
                                 f"({width * height / 1e6:.0f} megapixels), larger than the limit of "
                                 f"{MAX_PIXELS / 1e6:.0f} megapixels; give a smaller image")
            factor = reduction(image.size, network_size) if network_size is not None else 1
            if factor > 1 and image.format == "JPEG":
                side = DRAFT_MARGIN * max(network_size)
                image.draft(image.mode, (side, side))
            if before_decode is not None:
                before_decode((width, height), factor > 1)
            image.load()
            if factor == 1:
                upright = to_rgb(ImageOps.exif_transpose(image))
                return DecodedImage(upright, upright.size)
            orientation = _orientation(image)
            size = (height, width) if orientation >= 5 else (width, height)
            if image.size != (width, height):                     # drafted by libjpeg
                return DecodedImage(to_rgb(ImageOps.exif_transpose(image)), size)
            # Another format: reduced at once, so that no full-size copy is made of it.
            reduced = (image if image.mode in ("L", "RGB", "CMYK", "YCbCr") else to_rgb(image)).reduce(factor)
            if orientation != 1:
                reduced = reduced.transpose(_TRANSPOSE[orientation])
            return DecodedImage(to_rgb(reduced), size)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001  (Pillow's parsers raise many types on hostile files)
        raise ImageError(_read_failure(path, error)) from error


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB, upright per its EXIF orientation, at full size.

    Raises ImageError (one line) when the file is missing, not an image, broken or too large.
    """
    return read_image(path).image


def resize_for_network(image: Image.Image, size: tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """RGB image -> float32 [H, W, 3] pixel values (0..255) resized to ``size`` (width, height).

    This is the resize of the TF Object Detection API graphs themselves (``ResizeBilinear`` with
    align_corners=False and half_pixel_centers=False, on float pixels): source coordinate =
    output index x in_size / out_size, the neighbour below and to the right clamped to the edge, a
    horizontal then a vertical linear interpolation, in float32. Reproducing it (rather than
    Pillow's filtered resize) keeps the converted model's detections those of TensorFlow.
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    pixels = np.asarray(image)
    in_height, in_width = pixels.shape[:2]
    width, height = size
    (rows0,), (rows1,), (y_lerp,) = legacy_taps([in_height], height)
    (cols0,), (cols1,), (x_lerp,) = legacy_taps([in_width], width)
    # Work on [rows, width * 3] so that column taps are plain 2-D takes (much faster than 3-D fancy indexing).
    flat = pixels.reshape(in_height, in_width * 3)
    channel = np.arange(3)
    cols0, cols1 = (cols0[:, None] * 3 + channel).ravel(), (cols1[:, None] * 3 + channel).ravel()
    x_lerp = np.repeat(x_lerp, 3)[None, :]
    top_rows = flat.take(rows0, axis=0).astype(np.float32)
    bottom_rows = flat.take(rows1, axis=0).astype(np.float32)
    top_left, top_right = top_rows.take(cols0, axis=1), top_rows.take(cols1, axis=1)
    bottom_left, bottom_right = bottom_rows.take(cols0, axis=1), bottom_rows.take(cols1, axis=1)
    top = top_left + (top_right - top_left) * x_lerp
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return (top + (bottom - top) * y_lerp[:, None]).reshape(height, width, 3)


def legacy_taps(in_sizes: list[int], out_size: int, xp=np, device=None):
    """Source indices (lower, upper) [N, out] and weights [N, out] of TF's legacy bilinear resize
    along one axis, for N input lengths at once; ``xp`` is numpy or an array-API namespace (torch).

    source = index x float32(in / out), lower = floor(source), upper = min(lower + 1, in - 1),
    weight = source - lower, all in float32.
    """
    ratios = xp.asarray([size / out_size for size in in_sizes], dtype=xp.float32, device=device)
    source = xp.arange(out_size, dtype=xp.float32, device=device)[None, :] * ratios[:, None]
    lower_float = xp.floor(source)
    lower = xp.astype(lower_float, xp.int64)
    last = xp.asarray(in_sizes, dtype=xp.int64, device=device)[:, None] - 1
    return lower, xp.minimum(lower + 1, last), source - lower_float


def to_network_input(pixels: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] pixel values (uint8 or float, 0..255) -> float32 [N, 3, H, W] = x * float32(2/255) - 1."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected [N, H, W, 3] pixels, got {list(pixels.shape)}")
    scaled = pixels.astype(np.float32) * PIXEL_SCALE - np.float32(1)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def to_pixel_values(network_input: np.ndarray) -> np.ndarray:
    """Inverse of ``to_network_input``: float32 [N, 3, H, W] -> float32 [N, H, W, 3] pixel values."""
    if network_input.ndim != 4 or network_input.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W], got {list(network_input.shape)}")
    pixels = (network_input.astype(np.float32) + np.float32(1)) / PIXEL_SCALE
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def preprocess(image: Image.Image, size: tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """One RGB image -> float32 [3, H, W] network input."""
    return to_network_input(resize_for_network(image, size)[None])[0]
