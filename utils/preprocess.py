"""Image file -> network input tensor: the one place where images are read and preprocessed.

Steps, in this order: RGB, Pillow bilinear resize to ``INPUT_SIZE``, ``x * 2/255 - 1`` in
float32, HWC -> CHW.
"""

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import ImageError

INPUT_SIZE = (300, 300)  # (width, height)

_SCALE = np.float32(2 / 255)
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
    """RGB image -> uint8 [H, W, 3] resized to ``size`` (width, height) with Pillow BILINEAR."""
    if image.mode != "RGB":
        image = to_rgb(image)
    resized = image.resize(tuple(size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8)


def to_network_input(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1], computed as ``x * float32(2/255) - 1``."""
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {images_uint8.dtype} {list(images_uint8.shape)}")
    scaled = images_uint8.astype(np.float32) * _SCALE - np.float32(1)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def to_uint8_images(network_input: np.ndarray) -> np.ndarray:
    """Exact inverse of ``to_network_input``: float32 [N, 3, H, W] -> uint8 [N, H, W, 3]."""
    if network_input.ndim != 4 or network_input.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W], got {list(network_input.shape)}")
    values = np.rint((network_input.astype(np.float64) + 1) * (255 / 2))
    return np.ascontiguousarray(np.clip(values, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def preprocess(image: Image.Image, size: tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """One RGB image -> float32 [3, H, W] network input."""
    return to_network_input(resize_for_network(image, size)[None])[0]
