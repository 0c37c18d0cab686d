"""Tile planning and the tiled runner.

:func:`plan_tiles` cuts the LR image into a grid of ``tile×tile`` cores and gives each core a
window: the core grown by the overlap (the receptive-field radius) on each side, clipped to the
image, its start moved down to a multiple of the alignment, and grown to at least ``min_hw``
(the smallest input the network accepts, e.g. 15 for RLFN). :func:`run_tiled` runs the network
on every window and copies each core's part of the window's output into one preallocated HR
image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from esr_deploy.errors import TilingError


@dataclass(frozen=True)
class Tile:
    """One tile: LR pixel ranges ``(y0, y1, x0, x1)``, end-exclusive."""

    #: The part of the output this tile provides (the cores partition the image).
    core: tuple[int, int, int, int]
    #: The LR region fed to the network (core plus overlap, clipped, start aligned).
    window: tuple[int, int, int, int]


def _window_1d(c0: int, c1: int, n: int, overlap: int, align: int, min_len: int) -> tuple[int, int]:
    w0 = max(0, c0 - overlap)
    w1 = min(n, c1 + overlap)
    w0 -= w0 % align
    if w1 - w0 < min_len:
        w1 = min(n, w0 + min_len)
        if w1 - w0 < min_len:
            w0 = max(0, w1 - min_len)
            w0 -= w0 % align
    return w0, w1


def plan_tiles(
    height: int,
    width: int,
    tile: int,
    overlap: tuple[int, int],
    alignment: tuple[int, int] = (1, 1),
    min_hw: tuple[int, int] = (1, 1),
) -> list[Tile]:
    """Cores: a grid of ``tile×tile`` LR blocks (the last row/column smaller when ``tile`` does
    not divide the size), row by row. Windows: the core grown by ``overlap`` (rows, cols) on
    each side, clipped to the image, the start moved down to a multiple of ``alignment`` and,
    if smaller than ``min_hw``, grown within the image to at least ``min_hw``.

    An image smaller than ``min_hw`` raises :class:`TilingError`: the caller pads it to
    ``min_hw`` first (and crops the output back).
    """
    checks = (
        (height >= 1 and width >= 1, f"image size {height}×{width}", "give a non-empty image"),
        (tile >= 1, f"tile size {tile}", "pass a tile size of at least 1 LR pixel"),
        (
            min(overlap) >= 0,
            f"overlap {overlap}",
            "pass a non-negative overlap (the receptive-field radius)",
        ),
        (
            min(alignment) >= 1,
            f"alignment {alignment}",
            "pass the alignment of receptive_field() (at least 1)",
        ),
        (min(min_hw) >= 1, f"minimum input {min_hw}", "pass a minimum input size of at least 1"),
        (
            tile >= max(alignment),
            f"tile size {tile} smaller than the alignment {alignment}",
            f"use a tile of at least {max(alignment)} LR pixels",
        ),
    )
    for ok, seen, fix in checks:
        if not ok:
            raise TilingError(f"Cannot plan tiles — {seen} — {fix}.")
    if height < min_hw[0] or width < min_hw[1]:
        raise TilingError(
            f"Cannot plan tiles — the image is {height}×{width} LR pixels but the network needs "
            f"at least {min_hw[0]}×{min_hw[1]} — pad the image to that size before tiling and "
            "crop the output."
        )
    tiles = []
    for y0 in range(0, height, tile):
        y1 = min(height, y0 + tile)
        wy = _window_1d(y0, y1, height, overlap[0], alignment[0], min_hw[0])
        for x0 in range(0, width, tile):
            x1 = min(width, x0 + tile)
            wx = _window_1d(x0, x1, width, overlap[1], alignment[1], min_hw[1])
            tiles.append(Tile(core=(y0, y1, x0, x1), window=(wy[0], wy[1], wx[0], wx[1])))
    return tiles


def run_tiled(
    run: Callable[[np.ndarray, Tile], np.ndarray],
    lr: np.ndarray,
    scale: int,
    tiles: Sequence[Tile],
    on_tile: Callable[[], None] | None = None,
) -> np.ndarray:
    """Run ``run`` on every tile's window of ``lr`` (N×C×H×W float32) and assemble the
    N×C'×(H·scale)×(W·scale) output from the cores.

    ``run(window, tile)`` must return N×C'×(h·scale)×(w·scale) for the h×w window of
    ``tile`` (the tile tells a runner where the window lies, for networks that need the
    whole image's geometry: :mod:`esr_deploy.runtime.resize_geometry`). The output is
    allocated once and each window's output is dropped after its core is copied;
    ``on_tile()`` is called after every tile (progress bars).
    """
    if lr.ndim != 4:
        raise TilingError(
            f"Cannot run tiled — the LR input has shape {lr.shape}, not N×C×H×W — add the "
            "batch axis (lr[None]) and use channels first."
        )
    if scale < 1:
        raise TilingError(f"Cannot run tiled — scale {scale} — pass the model's SR factor (≥ 1).")
    n, _, h, w = lr.shape
    covered = np.zeros((h, w), dtype=np.uint8)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        wy0, wy1, wx0, wx1 = t.window
        if not (0 <= wy0 <= y0 < y1 <= wy1 <= h and 0 <= wx0 <= x0 < x1 <= wx1 <= w):
            raise TilingError(
                f"Cannot run tiled — tile {t} does not fit a {h}×{w} image or its window does "
                "not contain its core — plan the tiles with plan_tiles() for this image."
            )
        covered[y0:y1, x0:x1] += 1
    if covered.min() != 1 or covered.max() != 1:
        raise TilingError(
            f"Cannot run tiled — the tile cores do not cover the {h}×{w} image exactly once "
            f"({int((covered == 0).sum())} pixels uncovered, {int((covered > 1).sum())} covered "
            "twice) — plan the tiles with plan_tiles() for this image."
        )
    out: np.ndarray | None = None
    for t in tiles:
        y0, y1, x0, x1 = t.core
        wy0, wy1, wx0, wx1 = t.window
        window = np.ascontiguousarray(lr[:, :, wy0:wy1, wx0:wx1])
        got = np.asarray(run(window, t))
        expect = (n, (wy1 - wy0) * scale, (wx1 - wx0) * scale)
        if got.ndim != 4 or (got.shape[0], got.shape[2], got.shape[3]) != expect:
            raise TilingError(
                f"Tiled run failed — the network returned shape {got.shape} for a "
                f"{wy1 - wy0}×{wx1 - wx0} window, expected "
                f"{n}×C×{expect[1]}×{expect[2]} — check the scale ({scale}) and that the "
                "engine accepts this window size."
            )
        if out is None:
            out = np.empty((n, got.shape[1], h * scale, w * scale), dtype=got.dtype)
        out[:, :, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = got[
            :,
            :,
            (y0 - wy0) * scale : (y1 - wy0) * scale,
            (x0 - wx0) * scale : (x1 - wx0) * scale,
        ]
        del got, window
        if on_tile is not None:
            on_tile()
    assert out is not None  # tiles cover a non-empty image
    return out
