"""The receptive-field lattice: for one spatial axis of a tensor, which LR pixels each element
depends on, and how ops transform that.

Each tensor with spatial extent keeps, per spatial axis, ``(a, lo, hi, ext)``: element ``j``
depends on (at most) the LR pixels in ``[a·j + lo, a·j + hi]``; ``a`` is the tensor's stride in
LR pixels per element. The input has ``(1, 0, 0, 0)``.

- Conv / pooling with kernel ``k``, dilation ``d``, stride ``s`` and leading pad ``p``: output
  ``i`` reads inputs ``s·i − p + t·d`` (``0 ≤ t < k``), so ``a' = a·s``, ``lo' = lo − a·p``,
  ``hi' = hi + a·((k − 1)·d − p)`` (:meth:`Reach.window`).
- DepthToSpace by ``b`` (and the Reshape→Transpose→Reshape pixel shuffle,
  :func:`reshape_spatial`): output ``o`` reads input ``⌊o/b⌋``, so ``a' = a/b``,
  ``lo' = lo − a·(b − 1)/b``. SpaceToDepth: ``a' = a·b``, ``hi' = hi + a·(b − 1)``.
- Resize / Upsample by ``f`` (:func:`resample`): output ``i`` samples input coordinate
  ``x = i/f + c`` (``c`` from the coordinate transformation mode) and reads the inputs ``j`` of
  its mode: nearest the rounded ``x``; linear ``|j − x| < 1``; cubic ``|j − x| < 2`` (``/f``
  with antialias when downscaling). Over all phases of ``i`` the offsets ``δ = j − i/f`` lie
  in ``[δmin, δmax]``: ``a' = a/f``, ``lo' = lo + a·δmin``, ``hi' = hi + a·δmax``.
- Windows: a window's tensors start at the window's start and have about
  ``(window length + ext)/a`` elements (``ext`` is tracked per tensor: valid convs and crops
  shrink it, padding grows it). Elements a window lacks are read as padding, so they must count
  as reaching outside the window: :meth:`Reach.settled` keeps ``lo < a`` and ``hi ≥ −ext``.

The HR output has ``a = 1/s``. HR pixel ``i`` belongs to LR pixel ``q = ⌊i/s⌋`` and
``a·i ∈ [q, q + 1 − 1/s]``, so it needs the LR pixels ``q − ⌊−lo⌋ … q + ⌊1 − 1/s + hi⌋``; the
radius of an axis (:func:`radius`) is the larger of the two reaches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from fractions import Fraction

from esr_deploy.runtime.tiling.ops import MAX_PHASES, Unsupported
from esr_deploy.runtime.tiling.symbolic import F0, ONE, Val, Vals


@dataclass(frozen=True)
class Reach:
    """One axis of a tensor: element ``j`` depends on LR pixels ``[stride·j + lo, stride·j +
    hi]``; in a window ``[w0, w1)`` the tensor has (at least) ``(w1 − w0 + ext)/stride``
    elements, starting at global element ``w0/stride``.

    Elements outside a window's tensor (cropped, or never computed) are read as padding; the
    field stays sound when every such element still counts as reaching outside the window:
    ``lo < stride`` (before its start) and ``hi ≥ −ext`` (after its end). :meth:`settled`
    widens ``lo``/``hi`` to keep that true after crops.
    """

    stride: Fraction
    lo: Fraction
    hi: Fraction
    ext: Fraction = F0

    def union(self, other: Reach) -> Reach:
        return Reach(
            self.stride,
            min(self.lo, other.lo),
            max(self.hi, other.hi),
            min(self.ext, other.ext),
        )

    def settled(self) -> Reach:
        lo = self.lo if self.lo < self.stride else F0
        return Reach(self.stride, lo, max(self.hi, -self.ext), self.ext)

    def window(self, s: int, begins: Iterable[int], totals: Iterable[int], k: int, d: int) -> Reach:
        """Conv / pool: ``k`` taps ``d`` apart, stride ``s``, leading pads ``begins`` and total
        pads ``totals`` (several when they depend on the size): output size
        ``⌊(n + total − span)/s⌋ + 1 ≥ (n + total − span + 1)/s``."""
        begins, a, span = list(begins), self.stride, (k - 1) * d + 1
        return Reach(
            a * s,
            self.lo - a * max(begins),
            self.hi + a * (span - 1 - min(begins)),
            self.ext + a * (min(totals) - span + 1),
        )

    def depth_to_space(self, b: int) -> Reach:
        a = self.stride
        return Reach(a / b, self.lo - a * (b - 1) / b, self.hi, self.ext)

    def space_to_depth(self, b: int) -> Reach:
        a = self.stride
        return Reach(a * b, self.lo, self.hi + a * (b - 1), self.ext)


#: One axis of a spatial tensor: ``("y" | "x", None)`` or ``("c", size)`` for any other axis
#: (batch, channels, sub-pixel digits, ...), size known or None.
Dim = tuple[str, "Val | None"]


@dataclass(frozen=True)
class Spatial:
    dims: tuple[Dim, ...]
    y: Reach
    x: Reach

    @property
    def rank(self) -> int:
        return len(self.dims)

    def pos(self, kind: str) -> int:
        return next(i for i, (k, _) in enumerate(self.dims) if k == kind)

    @property
    def canonical(self) -> bool:
        """Rows on axis 2 and columns on axis 3 (NCHW; NCHWc blocked layouts too)."""
        return self.rank >= 4 and self.dims[2][0] == "y" and self.dims[3][0] == "x"

    def reach(self, kind: str) -> Reach:
        return self.y if kind == "y" else self.x

    def with_reach(self, kind: str, r: Reach) -> Spatial:
        return replace(self, y=r) if kind == "y" else replace(self, x=r)

    def size(self, i: int, src: str = "") -> Val | None:
        kind, size = self.dims[i]
        srcs = frozenset([src]) if src else frozenset()
        if kind == "y":
            return Val(1 / self.y.stride, (0, 1, 0), F0, srcs)
        if kind == "x":
            return Val(1 / self.x.stride, (0, 0, 1), F0, srcs)
        return None if size is None else replace(size, srcs=size.srcs | srcs)

    def spatial_axes(self) -> tuple[int, int]:
        return self.pos("y"), self.pos("x")


def set_dim(dims: tuple[Dim, ...], axis: int, dim: Dim) -> tuple[Dim, ...]:
    return (*dims[:axis], dim, *dims[axis + 1 :])


def reshape_spatial(state: Spatial, target: Vals, allowzero: bool) -> Spatial:
    """Reshape of a spatial tensor: rows/columns may be split off as inner digits
    (SpaceToDepth) or merged with an inner digit (DepthToSpace); anything else is unknown."""
    sizes = [state.size(i) for i in range(state.rank)]
    tgt: list[Val] = []
    for k, t in enumerate(target):
        if t is None:
            raise Unsupported
        if t.is_const and t.coef == 0 and not allowzero:
            src = sizes[k] if k < len(sizes) else None
            if src is None:
                raise Unsupported
            t = src
        tgt.append(t)
    minus = [k for k, t in enumerate(tgt) if t.is_const and t.coef == -1]
    if len(minus) > 1:
        raise Unsupported
    if minus:
        total: Val | None = ONE
        for s in sizes:
            total = None if total is None or s is None else total.mul(s)
        for k, t in enumerate(tgt):
            if k != minus[0]:
                total = None if total is None else total.div(t, floor=False)
        if total is None or not total.is_size_factor:
            raise Unsupported
        tgt[minus[0]] = total
    queue: deque[tuple[str, Val]] = deque()
    for (kind, _), size in zip(state.dims, sizes, strict=True):
        if size is None:
            raise Unsupported
        queue.append((kind, size))
    reach = {"y": state.y, "x": state.x}
    out: list[Dim] = []
    for t in tgt:
        group: list[tuple[str, Val]] = []
        need = t
        while not need.same(ONE):
            if not queue:
                raise Unsupported
            kind, size = queue.popleft()
            if size.same(ONE):
                continue
            q = size.div(need, floor=False)
            if q is None:
                raise Unsupported
            if q.same(ONE):
                group.append((kind, size))
                break
            if q.is_size_factor:  # split the atom: ``need`` outer, ``q`` inner
                if kind != "c":
                    if not (q.is_const and q.coef.denominator == 1):
                        raise Unsupported  # split into blocks of the image, not digits
                    reach[kind] = reach[kind].space_to_depth(int(q.coef))
                group.append((kind, need))
                queue.appendleft(("c", q))
                break
            rest = need.div(size, floor=False)
            if rest is None or not rest.is_size_factor:
                raise Unsupported
            group.append((kind, size))
            need = rest
        out.append(merge(group, reach))
    if any(not size.same(ONE) for _, size in queue):
        raise Unsupported
    if sorted(k for k, _ in out if k != "c") != ["x", "y"]:
        raise Unsupported
    return Spatial(tuple(out), reach["y"], reach["x"])


def merge(group: list[tuple[str, Val]], reach: dict[str, Reach]) -> Dim:
    """One output axis of a Reshape from the input atoms it groups (outer to inner)."""
    kinds = [k for k, _ in group]
    spatial = [k for k in kinds if k != "c"]
    if not spatial:
        size: Val | None = ONE
        for _, s in group:
            size = None if size is None else size.mul(s)
        return ("c", size)
    if len(spatial) > 1 or kinds[0] == "c":
        raise Unsupported  # rows and columns merged, or images stacked
    kind = spatial[0]
    digits: Val | None = ONE
    for _, s in group[1:]:
        digits = None if digits is None else digits.mul(s)
    if digits is None or not (digits.is_const and digits.coef.denominator == 1):
        raise Unsupported
    if digits.coef > 1:
        reach[kind] = reach[kind].depth_to_space(int(digits.coef))
    return (kind, None)


def resample(r: Reach, f: Fraction, mode: str, coord: str, nearest: str, antialias: bool) -> Reach:
    """Reach of a Resize output (module docstring): offsets ``j − i/f`` over all phases."""
    if coord in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
        shift = Fraction(1, 2) / f - Fraction(1, 2)
    elif coord == "tf_half_pixel_for_nn":
        shift = Fraction(1, 2) / f
    else:  # asymmetric; align_corners approximately
        shift = F0
    support = {"nearest": 0, "linear": 1, "bilinear": 1, "cubic": 2}.get(mode)
    if support is None:
        raise Unsupported
    if antialias and f < 1 and support:
        support_f = Fraction(support) / f
    else:
        support_f = Fraction(support)
    phases = f.numerator
    if phases > MAX_PHASES:
        offs = [shift - support_f - 1, shift + support_f + 1]
    else:
        offs = []
        for i in range(phases):
            base = Fraction(i) / f
            x = base + shift
            offs.extend(j - base for j in reads(x, support_f, mode, nearest))
    a = r.stride
    # floor(n·f) output elements
    return Reach(a / f, r.lo + a * min(offs), r.hi + a * max(offs), r.ext - a / f)


def reads(x: Fraction, support: Fraction, mode: str, nearest: str) -> list[int]:
    if mode == "nearest":
        modes = ("floor", "round_prefer_floor") if nearest == "upsample" else (nearest,)
        picks = []
        for m in modes:
            if m == "floor":
                picks.append(math.floor(x))
            elif m == "ceil":
                picks.append(math.ceil(x))
            elif m == "round_prefer_ceil":
                picks.append(math.floor(x + Fraction(1, 2)))
            else:
                picks.append(math.ceil(x - Fraction(1, 2)))
        return picks
    if x.denominator == 1:
        return [int(x)]  # linear and cubic weights vanish at the other integers
    return list(range(math.floor(x - support) + 1, math.ceil(x + support)))


def radius(r: Reach) -> int:
    """LR pixels an output pixel needs beyond its own LR pixel (module docstring)."""
    top = 1 - Fraction(1, r.stride.denominator) if r.stride < 1 else F0
    left = math.floor(-r.lo)
    right = math.floor(top + r.hi)
    return max(0, left, right)
