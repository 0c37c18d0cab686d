"""Pillow drawing primitives of the report's pictures: palette, fonts, text, panels.

Drawn with Pillow alone (``ImageDraw`` and its default font): labelled image panels, colour
bars and bar charts need no plotting library. The default font covers ASCII, so text drawn
is ASCII (:func:`ascii_text`: ``x`` for ×, ``-`` for −, ``>=`` for ≥; anything else ``?``)
and cut to the room it has with an ellipsis (:func:`fit`). :func:`compose` lays panels side
by side under their labels: ``PAD`` pixels between and around them, a title line and a label
line of ``FONT_SIZE + 8`` pixels above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

PAD = 10
FONT_SIZE = 15
SMALL_FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
MUTED = (110, 110, 110)
FAILED = (190, 20, 40)


def load_font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))
_ASCII = str.maketrans({"×": "x", "−": "-", "—": "-", "–": "-", "≥": ">=", "≤": "<="})


def ascii_text(text: str) -> str:
    """What the default font can draw: the usual non-ASCII signs spelled in ASCII, others
    replaced by ``?``."""
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")


def text_width(text: str, font: Font) -> int:
    return math.ceil(_MEASURE.textlength(text, font=font))


def fit(text: str, font: Font, width: int) -> str:
    """``text`` cut with an ellipsis to ``width`` pixels."""
    text = ascii_text(text)
    if text_width(text, font) <= width:
        return text
    while text and text_width(text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def enlarge(img: np.ndarray, zoom: int) -> np.ndarray:
    return np.repeat(np.repeat(img, zoom, axis=0), zoom, axis=1)


def compose(
    title: str, panels: Sequence[tuple[str, np.ndarray]], footer: Image.Image | None = None
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Panels side by side under their labels, a title above, ``footer`` below; the picture
    and each panel's label and box ``[x0, y0, x1, y1]`` (pixels of the picture)."""
    font, small = load_font(FONT_SIZE), load_font(SMALL_FONT_SIZE)
    line = FONT_SIZE + 8
    top = PAD + line + line  # title, then the labels
    width = PAD + sum(p.shape[1] + PAD for _, p in panels)
    height = top + max(p.shape[0] for _, p in panels) + PAD
    if footer is not None:
        width = max(width, footer.width + 2 * PAD)
        height += footer.height + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), fit(title, font, width - 2 * PAD), fill=INK, font=font)
    boxes = []
    x = PAD
    for label, pixels in panels:
        draw.text((x, PAD + line), fit(label, small, pixels.shape[1]), fill=INK, font=small)
        canvas.paste(Image.fromarray(pixels), (x, top))
        boxes.append({"label": label, "box": [x, top, x + pixels.shape[1], top + pixels.shape[0]]})
        x += pixels.shape[1] + PAD
    if footer is not None:
        canvas.paste(footer, (PAD, height - PAD - footer.height))
    return canvas, boxes
