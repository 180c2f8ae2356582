"""Image file -> network input tensor: the one place where images are read and preprocessed.

Steps, in this order: RGB (EXIF orientation applied), TF's legacy bilinear resize to
``INPUT_SIZE``, ``x * 2/255 - 1`` in float32, HWC -> CHW. utils.gpu_input does the same steps on
the GPU with the same taps (``legacy_taps``) and arithmetic.
"""

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import ImageError

INPUT_SIZE = (300, 300)  # (width, height)

PIXEL_SCALE = np.float32(2 / 255)   # network input = pixel x PIXEL_SCALE - 1
_WHITE = (255, 255, 255, 255)


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
    else:
        reason = " ".join(str(error).split()) or type(error).__name__
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


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB, upright per its EXIF orientation.

    Raises ImageError (one line) when the file is missing, not an image or broken.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(_read_failure(path, error)) from error


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
