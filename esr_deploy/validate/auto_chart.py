"""The ``--target auto`` chart: latency and PSNR-Y drop of every candidate, side by side.

Two horizontal bar charts, one row per candidate: median latency on ``[0, 1.4 × slowest]``
and worst PSNR-Y drop over the validation sets on ``[min(0, drops, budget), max(0, drops,
budget)]`` widened by 40 % (5 % below a negative minimum), the drop budget dashed; ticks at
1, 2 or 5 × 10^k, about four per axis. Candidates that failed validation or could not run here
are listed with the reason across both charts, not plotted as numbers. The record returned
goes to ``manifest["report_figures"]`` like the other figures (:mod:`figures`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from esr_deploy.validate.drawing import (
    BACKGROUND,
    FAILED,
    FONT_SIZE,
    INK,
    MUTED,
    PAD,
    SMALL_FONT_SIZE,
    Font,
    ascii_text,
    fit,
    load_font,
    text_width,
)

LATENCY_BAR = (70, 110, 180)
DROP_BAR = (225, 135, 40)
CHOSEN_BAND = (222, 245, 222)
FAILED_BAND = (252, 234, 236)
UNAVAILABLE_BAND = (242, 242, 242)
GRID = (225, 225, 225)


def _nice_step(span: float, parts: int = 4) -> float:
    raw = span / parts
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)
    return step * magnitude


def _ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    first = math.ceil(lo / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def short_failure(text: str) -> str:
    """The measured part of a compile failure ("Validation of m on t failed — <what> — ...")."""
    parts = text.split(" — ")
    return parts[1] if len(parts) > 2 else text


def _drop(value: Any) -> float:
    """A PSNR drop as drawn: 0 when it rounds to 0.0000 (no "-0.0000")."""
    d = float(value)
    return 0.0 if round(d, 4) == 0 else d


def targets_figure(
    out_dir: Path,
    candidates: Sequence[Mapping[str, Any]],
    chosen: str | None = None,
    max_psnr_drop: float | None = None,
    latency_label: str = "median latency (ms)",
    file: str = "targets.png",
) -> dict[str, Any] | None:
    """Latency and PSNR-Y drop per candidate of ``--target auto`` (entries of
    ``manifest["auto"]["candidates"]``: ``target``, ``available``, ``passed``, ``median_ms``,
    ``psnr_drop``, ``failure`` or ``reason``); None when fewer than two were built.

    Two bar charts side by side, one row per candidate: latency on ``[0, 1.4 × slowest]``,
    PSNR-Y drop on ``[min(0, drops, budget), max(0, drops, budget)]`` widened by 40 % (5 %
    below a negative minimum), the budget dashed; a failed or unavailable candidate gets a
    note across both charts instead of bars."""
    built = [c for c in candidates if c.get("available")]
    if len(built) < 2:
        return None
    font, small = load_font(FONT_SIZE), load_font(SMALL_FONT_SIZE)
    plotted = [c for c in built if c.get("passed") and c.get("median_ms") is not None]
    names = [c["target"] + (" (chosen)" if c["target"] == chosen else "") for c in candidates]
    name_w = max(text_width(n, font) for n in names) + 2 * PAD
    chart = _TargetsChart.fit(plotted, max_psnr_drop, name_w, len(candidates))
    canvas = Image.new("RGB", (chart.width, chart.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), "--target auto: candidates", fill=INK, font=font)
    budget = f"; PSNR-Y drop budget {max_psnr_drop:g} dB" if max_psnr_drop is not None else ""
    sub = f"chosen: {chosen or '-'}{budget}; failed or unavailable targets are not plotted"
    line = chart.line
    draw.text((PAD, PAD + line), fit(sub, small, chart.width - 2 * PAD), fill=MUTED, font=small)
    draw.text(
        (chart.lat_x, PAD + 2 * line), fit(latency_label, small, chart.w), fill=INK, font=small
    )
    draw.text((chart.drop_x, PAD + 2 * line), "PSNR-Y drop (dB, worst set)", fill=INK, font=small)
    chart.draw_axes(draw, small, max_psnr_drop)
    for i, (c, name) in enumerate(zip(candidates, names, strict=True)):
        chart.draw_row(draw, i, c, name, c["target"] == chosen, (font, small))
    canvas.save(out_dir / file, format="PNG")
    return {
        "file": file,
        "kind": "targets",
        "image": None,
        "caption": _targets_caption(candidates, chosen, max_psnr_drop, latency_label),
        "targets": [c["target"] for c in candidates],
    }


@dataclass(frozen=True)
class _TargetsChart:
    """Geometry and scales of :func:`targets_figure`'s two bar charts."""

    name_w: int
    rows: int
    lat_hi: float  # latency axis: 0 .. lat_hi
    lo: float  # drop axis: lo .. hi
    hi: float
    w: int = 320  # each chart's width
    gap: int = 40
    row_h: int = 30
    bar_h: int = 16
    line: int = FONT_SIZE + 8

    @classmethod
    def fit(
        cls,
        plotted: Sequence[Mapping[str, Any]],
        max_psnr_drop: float | None,
        name_w: int,
        rows: int,
    ) -> _TargetsChart:
        lat_values = [float(c["median_ms"]) for c in plotted]
        lat_hi = max(lat_values, default=1.0) * 1.4 or 1.0
        drops = [float(c["psnr_drop"]) for c in plotted if c.get("psnr_drop") is not None]
        marks = drops + ([max_psnr_drop] if max_psnr_drop is not None else [])
        lo = min([0.0, *marks])
        hi = max([0.0, *marks])
        span = (hi - lo) or 0.01
        lo, hi = (lo - 0.05 * span if lo < 0 else 0.0), hi + 0.4 * span
        return cls(name_w=name_w, rows=rows, lat_hi=lat_hi, lo=lo, hi=hi)

    @property
    def top(self) -> int:
        return PAD + 3 * self.line  # title, subtitle, axis titles

    @property
    def bottom(self) -> int:
        return self.top + self.row_h * self.rows

    @property
    def width(self) -> int:
        return PAD + self.name_w + self.w + self.gap + self.w + PAD

    @property
    def height(self) -> int:
        return self.bottom + 2 * self.line + PAD

    @property
    def lat_x(self) -> int:
        return PAD + self.name_w

    @property
    def drop_x(self) -> int:
        return self.lat_x + self.w + self.gap

    def lat_pos(self, v: float) -> int:
        return self.lat_x + round(v / self.lat_hi * self.w)

    def drop_pos(self, v: float) -> int:
        return self.drop_x + round((v - self.lo) / (self.hi - self.lo) * self.w)

    def draw_axes(
        self, draw: ImageDraw.ImageDraw, small: Font, max_psnr_drop: float | None
    ) -> None:
        """Grid lines, tick labels and axes of both charts; zero and the dashed budget."""
        top, bottom = self.top, self.bottom
        for axis_x, pos, tick_values in (
            (self.lat_x, self.lat_pos, _ticks(0.0, self.lat_hi)),
            (self.drop_x, self.drop_pos, _ticks(self.lo, self.hi)),
        ):
            for t in tick_values:
                tx = pos(t)
                draw.line([(tx, top), (tx, bottom)], fill=GRID)
                label = f"{t:g}"
                draw.text(
                    (tx - text_width(label, small) // 2, bottom + 4), label, fill=INK, font=small
                )
            draw.line([(axis_x, bottom), (axis_x + self.w, bottom)], fill=INK)
        zero = self.drop_pos(0.0)
        draw.line([(zero, top), (zero, bottom)], fill=INK)
        if max_psnr_drop is not None:
            bx = self.drop_pos(max_psnr_drop)
            for yy in range(top, bottom, 8):
                draw.line([(bx, yy), (bx, min(yy + 4, bottom))], fill=FAILED, width=2)
            label = f"budget {max_psnr_drop:g} dB"
            lx = min(
                bx - text_width(label, small) // 2, self.width - PAD - text_width(label, small)
            )
            draw.text((lx, bottom + 4 + self.line), label, fill=FAILED, font=small)

    def draw_row(
        self,
        draw: ImageDraw.ImageDraw,
        i: int,
        c: Mapping[str, Any],
        name: str,
        chosen: bool,
        fonts: tuple[Font, Font],
    ) -> None:
        """Row ``i``: the candidate's name, its latency and drop bars, or why it has none."""
        font, small = fonts
        y = self.top + i * self.row_h
        mid = y + (self.row_h - self.bar_h) // 2
        lat_x, drop_x = self.lat_x, self.drop_x
        if chosen:
            draw.rectangle([PAD, y + 1, self.width - PAD, y + self.row_h - 1], fill=CHOSEN_BAND)
        draw.text((PAD, mid - 1), ascii_text(name), fill=INK, font=font)
        if not c.get("available") or not c.get("passed") or c.get("median_ms") is None:
            # a note over both charts, on a band that hides the grid: not a number to plot
            available = bool(c.get("available"))
            why = (
                f"FAILED: {short_failure(str(c.get('failure', '')))}"
                if available
                else f"not available here: {c.get('reason', '')}"
            )
            band = FAILED_BAND if available else UNAVAILABLE_BAND
            draw.rectangle([lat_x, y + 3, drop_x + self.w, y + self.row_h - 3], fill=band)
            draw.text(
                (lat_x + 4, mid),
                fit(why, small, 2 * self.w + self.gap - 8),
                fill=FAILED if available else MUTED,
                font=small,
            )
            return
        ms = float(c["median_ms"])
        bar_h = self.bar_h
        draw.rectangle(
            [lat_x, mid, max(lat_x, self.lat_pos(ms) - 1), mid + bar_h], fill=LATENCY_BAR
        )
        draw.text((self.lat_pos(ms) + 4, mid), f"{ms:.1f} ms", fill=INK, font=small)
        if c.get("psnr_drop") is not None:
            d = _drop(c["psnr_drop"])
            zero = self.drop_pos(0.0)
            left, right = sorted((zero, self.drop_pos(d)))
            draw.rectangle([left, mid, max(left, right - 1), mid + bar_h], fill=DROP_BAR)
            draw.text((max(zero, self.drop_pos(d)) + 4, mid), f"{d:.4f}", fill=INK, font=small)


def _targets_caption(
    candidates: Sequence[Mapping[str, Any]],
    chosen: str | None,
    max_psnr_drop: float | None,
    latency_label: str,
) -> str:
    def describe(c: Mapping[str, Any]) -> str:
        if not c.get("available"):
            return f"{c['target']}: not available here ({c.get('reason', '')})"
        if not c.get("passed"):
            return f"{c['target']}: failed ({short_failure(str(c.get('failure', '')))})"
        drop = (
            f", PSNR-Y drop {_drop(c['psnr_drop']):.4f} dB"
            if c.get("psnr_drop") is not None
            else ""
        )
        return f"{c['target']}: {c['median_ms']:.1f} ms{drop}"

    return (
        f"--target auto: {latency_label} and worst PSNR-Y drop over the validation sets of "
        "each candidate that passed"
        + (f" (drop budget {max_psnr_drop:g} dB, dashed)" if max_psnr_drop is not None else "")
        + f"; chosen: {chosen or '—'}. "
        + "; ".join(describe(c) for c in candidates)
        + "."
    )
