"""Draw detections (boxes, class names, confidences) onto an image."""

import colorsys
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.labels import label_name

_GOLDEN_RATIO = 0.6180339887498949


def box_to_pixels(row: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Detection row (image_id, label, conf, xmin, ymin, xmax, ymax; normalised) -> pixel box.

    Returns (xmin, ymin, xmax, ymax) clipped to [0, width] x [0, height].
    """
    xmin, ymin, xmax, ymax = (float(v) for v in row[3:7])
    return (min(max(xmin * width, 0.0), float(width)), min(max(ymin * height, 0.0), float(height)),
            min(max(xmax * width, 0.0), float(width)), min(max(ymax * height, 0.0), float(height)))


def percent(confidence: float) -> int:
    """A confidence as the whole percent shown to the user, on the console and on the drawn label alike:
    truncated, as the original sample printed it (0.997 is 99 %, never a rounded-up 100 %)."""
    return int(float(confidence) * 100)


def class_color(label: int) -> tuple[int, int, int]:
    """A saturated RGB colour for ``label``; hues of neighbouring ids are far apart."""
    hue = (int(label) * _GOLDEN_RATIO) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background``."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def draw_detections(image: Image.Image, detections: np.ndarray,
                    label_map: Mapping[int, str], in_place: bool = False) -> Image.Image:
    """A copy of ``image`` (``image`` itself when ``in_place`` and RGB) with a box and a "<name> <NN>%"
    tag per detection row.

    ``detections`` is [K, 7] (image_id, label, confidence, xmin, ymin, xmax, ymax) with
    normalised coordinates, already filtered by confidence.
    """
    canvas = image.convert("RGB") if image.mode != "RGB" else (image if in_place else image.copy())
    width, height = canvas.size
    line_width = max(2, round(min(width, height) / 200))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(canvas)
    for row in np.asarray(detections, dtype=np.float64).reshape(-1, 7):
        x0, y0, x1, y1 = (round(v) for v in box_to_pixels(row, width, height))
        x1, y1 = min(x1, width - 1), min(y1, height - 1)
        if x1 <= x0 or y1 <= y0:
            continue
        label = int(row[1])
        color = class_color(label)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line_width)

        text = f"{label_name(label_map, label)} {percent(row[2])}%"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, line_width // 2)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        tag_x = max(0, min(x0, width - box_w))
        tag_y = y0 - box_h if y0 - box_h >= 0 else y0  # above the box, else just inside it
        draw.rectangle((tag_x, tag_y, tag_x + box_w - 1, tag_y + box_h - 1), fill=color)
        draw.text((tag_x + pad - left, tag_y + pad - top), text, fill=_text_color(color), font=font)
    return canvas
