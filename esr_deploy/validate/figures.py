"""Pictures for a bundle's report: validation crops, difference heat maps, auto candidates.

Drawn with Pillow alone (:mod:`esr_deploy.validate.drawing`): labelled image panels and a
colour bar need no plotting library. Text in the pictures is ASCII (``x`` for ×, ``-`` for
−); the captions in the report carry the exact wording.

Every function writes PNGs into a folder (the staged bundle) and returns one record per
picture for ``manifest["report_figures"]``, so that the report
(:mod:`esr_deploy.validate.report`) stays a pure function of the manifest::

    {"file": "compare-1-bird.png", "kind": "comparison" | "difference" | "targets",
     "image": "bird" | None, "caption": "...", ...}

**Comparison** (per validation image): the most detailed HR region — the
:data:`CROP_HR` × :data:`CROP_HR` window, on the LR pixel grid, with the largest sum of
squared BT.601 luma gradients — as four panels enlarged with nearest-neighbour so that
pixels show: MATLAB-bicubic upscaling of the LR crop (:func:`esr_deploy.data.imresize`),
PyTorch reference output, engine output, HR.

**Difference**: ``d = max over RGB of |e − r|`` in 0..255 units, where ``e`` and ``r`` are the
engine and reference outputs clamped to the data range (as parity measures them). It is
shown through a colour map at intensity ``min(255, g · d)``: the gain ``g`` is chosen from
the data so that the 99.9th percentile of ``d`` over the image maps to (just under) full
scale, ``g = floor(255 / p99.9)`` to two significant digits; so the brightest 0.1 % of
pixels saturate and an engine identical to float precision still shows its pattern. The
caption states ``g``, the value that maps to full scale, and the maximum of ``d``.

**Targets** (``--target auto``): median latency and worst PSNR-Y drop of every candidate
that was built, as horizontal bars (:mod:`esr_deploy.validate.auto_chart`; its
:func:`targets_figure` is importable from here too).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from esr_deploy.data import ImagePair, imresize, to_uint8
from esr_deploy.recipe import Recipe
from esr_deploy.validate.auto_chart import targets_figure
from esr_deploy.validate.drawing import (
    BACKGROUND,
    INK,
    PAD,
    SMALL_FONT_SIZE,
    compose,
    enlarge,
    fit,
    load_font,
    text_width,
)
from esr_deploy.validate.parity import EngineRun, ReferenceRun, model_input, model_output
from esr_deploy.validate.quality import rgb_to_y

__all__ = [
    "COMPARISON_IMAGES",
    "CROP_HR",
    "HEAT_LUT",
    "PERCENTILE",
    "abs_difference",
    "bicubic_crop",
    "comparison_figures",
    "detail_crop",
    "difference_gain",
    "targets_figure",
]

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # y, x, height, width (HR pixels)

#: Validation images drawn (the first ones of the first validation set).
COMPARISON_IMAGES = 2
#: Side of the HR crop (rounded down to a multiple of the scale).
CROP_HR = 64
#: Panels are enlarged by the largest integer factor that keeps them within this many pixels.
PANEL = 256
#: The percentile of |engine − reference| that the gain maps to full scale.
PERCENTILE = 99.9
#: LR pixels around the crop that the bicubic upscaling sees (its kernel reaches 2).
LR_MARGIN = 4

CROP_OUTLINE = (0, 200, 255)

#: Anchors of the heat colour map (close to matplotlib's "inferno"): dark = no difference.
_HEAT_ANCHORS = (
    (0.0, (0, 0, 4)),
    (0.25, (87, 16, 110)),
    (0.5, (188, 55, 84)),
    (0.75, (249, 142, 9)),
    (1.0, (252, 255, 164)),
)


def _heat_lut() -> np.ndarray:
    t = np.linspace(0.0, 1.0, 256)
    pos = [a[0] for a in _HEAT_ANCHORS]
    channels = [np.interp(t, pos, [a[1][c] for a in _HEAT_ANCHORS]) for c in range(3)]
    return np.stack(channels, axis=1).round().astype(np.uint8)


#: 256×3 uint8 colour map: intensity 0 (no difference) … 255 (full scale).
HEAT_LUT = _heat_lut()


# ------------------------------------------------------------------------------ data


def detail_crop(hr: np.ndarray, scale: int, size: int = CROP_HR) -> Box:
    """``(y, x, h, w)`` of the most detailed HR window: the largest sum of squared luma
    gradients over a ``size``×``size`` window (smaller for smaller images) whose corner and
    sides are multiples of ``scale``, so that it is an exact LR crop upscaled. Ties: the
    first window in row-major order."""
    height, width = hr.shape[:2]
    side = max(scale, size - size % scale)
    h, w = min(height, side), min(width, side)
    y = rgb_to_y(hr)
    energy = np.zeros_like(y)
    energy[:, :-1] += np.diff(y, axis=1) ** 2
    energy[:-1, :] += np.diff(y, axis=0) ** 2
    integral = np.zeros((height + 1, width + 1), dtype=np.float64)
    integral[1:, 1:] = energy.cumsum(axis=0).cumsum(axis=1)
    ys = np.arange(0, height - h + 1, scale)
    xs = np.arange(0, width - w + 1, scale)
    sums = (
        integral[np.ix_(ys + h, xs + w)]
        - integral[np.ix_(ys, xs + w)]
        - integral[np.ix_(ys + h, xs)]
        + integral[np.ix_(ys, xs)]
    )
    iy, ix = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(ys[iy]), int(xs[ix]), h, w


def bicubic_crop(lr: np.ndarray, scale: int, box: Box) -> np.ndarray:
    """MATLAB-bicubic ×``scale`` of the LR pixels under the HR ``box``: the LR crop with
    :data:`LR_MARGIN` pixels around it is upscaled and the margin cut off, which gives the
    same pixels as upscaling the whole image (the kernel reaches 2 LR pixels)."""
    y, x, h, w = box
    ly, lx, lh, lw = y // scale, x // scale, h // scale, w // scale
    top, left = min(LR_MARGIN, ly), min(LR_MARGIN, lx)
    bottom = min(LR_MARGIN, lr.shape[0] - ly - lh)
    right = min(LR_MARGIN, lr.shape[1] - lx - lw)
    part = np.ascontiguousarray(lr[ly - top : ly + lh + bottom, lx - left : lx + lw + right])
    up = imresize(part, scale)
    return up[top * scale : top * scale + h, left * scale : left * scale + w]


def abs_difference(
    engine_out: np.ndarray, reference_out: np.ndarray, data_range: float
) -> np.ndarray:
    """``max over RGB |e − r|`` in 0..255 units, H×W float64, of two 1×3×H×W outputs clamped
    to ``[0, data_range]``."""
    e = np.clip(engine_out[0].astype(np.float64), 0.0, data_range)
    r = np.clip(reference_out[0].astype(np.float64), 0.0, data_range)
    return np.asarray(np.abs(e - r).max(axis=0) * (255.0 / data_range))


def difference_gain(diff: np.ndarray) -> float:
    """The gain that maps the :data:`PERCENTILE` of ``diff`` (0..255 units) to full scale,
    rounded down to two significant digits (the maximum when the percentile is 0; 1 for
    identical outputs)."""
    p = float(np.percentile(diff, PERCENTILE))
    if p <= 0.0:
        p = float(diff.max())
    if p <= 0.0:
        return 1.0
    ideal = 255.0 / p
    k = math.floor(math.log10(ideal)) - 1
    gain = math.floor(ideal / 10.0**k) * 10.0**k
    return max(1.0, round(gain, max(0, -k)))


def _heat(diff: np.ndarray, gain: float) -> np.ndarray:
    idx = np.clip(np.rint(diff * gain), 0, 255).astype(np.uint8)
    return np.asarray(HEAT_LUT[idx])


def _format_gain(gain: float) -> str:
    return f"{gain:,.0f}" if gain >= 100 else f"{gain:g}"


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return safe[:40] or "image"


def _colour_bar(width: int, gain: float, lines: Sequence[str]) -> Image.Image:
    """Text lines, then the colour map as a bar with ticks in 0..255 units of |e − r|."""
    small = load_font(SMALL_FONT_SIZE)
    line = SMALL_FONT_SIZE + 6
    bar_h = 14
    full = 255.0 / gain
    bar_top = len(lines) * line + 4
    img = Image.new("RGB", (width, bar_top + bar_h + 6 + line), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, text in enumerate(lines):
        draw.text((0, i * line), fit(text, small, width), fill=INK, font=small)
    bar_w = width - 60  # room for the last tick label
    ramp = HEAT_LUT[np.linspace(0, 255, bar_w).round().astype(np.int64)]
    img.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (0, bar_top))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        tx = round(frac * (bar_w - 1))
        draw.line([(tx, bar_top + bar_h), (tx, bar_top + bar_h + 4)], fill=INK)
        label = "0" if frac == 0 else f"{frac * full:.2g}"
        if frac == 1.0:
            label = ">= " + label
        lw = text_width(label, small)
        lx = min(max(0, tx - lw // 2), width - lw)
        draw.text((lx, bar_top + bar_h + 6), label, fill=INK, font=small)
    return img


def _overview(diff: np.ndarray, gain: float, box: Box) -> tuple[np.ndarray, str]:
    """Heat map of the whole image within :data:`PANEL` pixels (block maximum when it is
    larger, so that isolated differences stay visible; nearest-neighbour when smaller), with
    the crop outlined."""
    height, width = diff.shape
    longest = max(height, width)
    y, x, h, w = box
    if longest > PANEL:
        k = math.ceil(longest / PANEL)
        padded = np.zeros((math.ceil(height / k) * k, math.ceil(width / k) * k))
        padded[:height, :width] = diff
        pooled = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k).max(axis=(1, 3))
        pixels, rect, how = _heat(pooled, gain), (y // k, x // k, h // k, w // k), f"max of {k}x{k}"
    else:
        z = PANEL // longest
        pixels = enlarge(_heat(diff, gain), z)
        rect, how = (y * z, x * z, h * z, w * z), f"x{z}"
    img = Image.fromarray(pixels)
    ry, rx, rh, rw = rect
    ImageDraw.Draw(img).rectangle(
        [rx, ry, rx + max(rw, 1) - 1, ry + max(rh, 1) - 1], outline=CROP_OUTLINE
    )
    return np.asarray(img), how


# ------------------------------------------------------------------------------ figures


def comparison_figures(
    out_dir: Path,
    pairs: Sequence[ImagePair],
    reference: ReferenceRun,
    engine: EngineRun,
    recipe: Recipe,
    engine_label: str = "engine",
    set_name: str | None = None,
) -> list[dict[str, Any]]:
    """Draw the comparison and the difference picture of each pair into ``out_dir``; see
    the module docstring. ``reference`` and ``engine`` are run on the whole LR image."""
    records: list[dict[str, Any]] = []
    for index, pair in enumerate(pairs, start=1):
        x = model_input(pair.lr, recipe)
        with torch.no_grad():
            ref = model_output(reference(x), recipe)
        eng = model_output(engine(x.numpy()), recipe)
        view = _CropView.of(pair, recipe.scale, index, set_name)
        records.append(_comparison(out_dir, view, pair, ref, eng, recipe, engine_label))
        records.append(_difference(out_dir, view, abs_difference(eng, ref, recipe.data_range)))
    return records


@dataclass(frozen=True)
class _CropView:
    """Where one pair's pictures look: the most detailed HR crop, its zoom, the file names."""

    image: str
    set_name: str | None
    box: tuple[int, int, int, int]  # y0, x0, h, w in HR pixels
    zoom: int
    stem: str  # "<index>-<safe name>"

    @classmethod
    def of(cls, pair: ImagePair, scale: int, index: int, set_name: str | None) -> _CropView:
        box = detail_crop(pair.hr, scale)
        zoom = max(1, PANEL // max(box[2], box[3]))
        return cls(pair.name, set_name, box, zoom, f"{index}-{_safe_name(pair.name)}")

    def crop(self, img: np.ndarray) -> Any:
        y0, x0, h, w = self.box
        return img[y0 : y0 + h, x0 : x0 + w]

    @property
    def where(self) -> str:
        return f" ({self.set_name})" if self.set_name else ""

    @property
    def where_crop(self) -> str:
        y0, x0, h, w = self.box
        return f"{w}×{h} HR crop at x={x0}, y={y0}"

    def record(self, file: str, kind: str, caption: str, **fields: Any) -> dict[str, Any]:
        """A figure's entry in the report: ``fields`` go between the caption and the crop."""
        y0, x0, h, w = self.box
        head = {"file": file, "kind": kind, "image": self.image, "set": self.set_name}
        crop = {"x": x0, "y": y0, "width": w, "height": h}
        return {**head, "caption": caption, **fields, "crop": crop, "zoom": self.zoom}


def _comparison(
    out_dir: Path,
    view: _CropView,
    pair: ImagePair,
    ref: np.ndarray,
    eng: np.ndarray,
    recipe: Recipe,
    engine_label: str,
) -> dict[str, Any]:
    """Bicubic, reference, engine and HR side by side on the crop, enlarged."""
    scale, data_range, zoom = recipe.scale, recipe.data_range, view.zoom
    panels = [
        (f"bicubic (LR x{scale})", bicubic_crop(pair.lr, scale, view.box)),
        ("PyTorch reference", view.crop(to_uint8(ref, data_range))),
        (engine_label, view.crop(to_uint8(eng, data_range))),
        ("HR", view.crop(pair.hr)),
    ]
    title = f"{pair.name}: {view.where_crop} (most detailed region), enlarged x{zoom}"
    picture, boxes = compose(title, [(label, enlarge(p, zoom)) for label, p in panels])
    compare_file = f"compare-{view.stem}.png"
    picture.save(out_dir / compare_file, format="PNG")
    caption = (
        f"{pair.name}{view.where}: {view.where_crop} (the most detailed region: largest "
        f"luma gradient energy), enlarged ×{zoom} with nearest-neighbour. "
        f"Left to right: MATLAB-bicubic ×{scale} upscaling of the LR crop, the "
        f"PyTorch reference (training form), the {engine_label}, HR."
    )
    return {**view.record(compare_file, "comparison", caption), "panels": boxes}


def _difference(out_dir: Path, view: _CropView, diff: np.ndarray) -> dict[str, Any]:
    """``|engine - reference|`` as a heat map: the crop enlarged, and the whole image with
    the crop outlined, at the gain of :func:`difference_gain`."""
    gain = difference_gain(diff)
    full = 255.0 / gain
    most, crop_most = float(diff.max()), float(view.crop(diff).max())
    overview, how = _overview(diff, gain, view.box)
    gain_text = _format_gain(gain)
    heat_panels = [
        (
            f"|engine - reference| x{gain_text}, crop",
            enlarge(_heat(view.crop(diff), gain), view.zoom),
        ),
        (f"whole image ({how}), crop outlined", overview),
    ]
    bar_width = max(PAD + sum(p.shape[1] + PAD for _, p in heat_panels) - 2 * PAD, 300)
    bar = _colour_bar(
        bar_width,
        gain,
        [
            f"colour = |engine - reference| (max over RGB, 0..255 units) x{gain_text}",
            f"max |engine - reference|: {most:.3g} (image), {crop_most:.3g} (crop)",
        ],
    )
    picture, boxes = compose(f"{view.image}: difference to the reference", heat_panels, bar)
    diff_file = f"difference-{view.stem}.png"
    picture.save(out_dir / diff_file, format="PNG")
    caption = (
        f"|engine − reference| on {view.image}{view.where} (maximum over RGB, 0..255 "
        f"units), amplified ×{gain_text} so that the {PERCENTILE:g}th percentile "
        f"maps to about full scale: black = 0, yellow-white ≥ {full:.3g} (colour "
        f"bar in the picture). Maximum abs difference {most:.3g} over the image, "
        f"{crop_most:.3g} in the crop (left, enlarged ×{view.zoom}); right: the whole "
        f"image ({how}) with the crop outlined."
    )
    log.debug("report figures for %s: gain %s, max |e - r| %.3g", view.image, gain, most)
    fields = {
        "gain": gain,
        "full_scale": full,
        "max_abs_difference": most,
        "crop_max_abs_difference": crop_most,
    }
    return {**view.record(diff_file, "difference", caption, **fields), "panels": boxes}
