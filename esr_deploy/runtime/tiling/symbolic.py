"""Symbolic sizes: shape arithmetic in the LR height and width.

A value is ``coef · n^e0 · h^e1 · w^e2 + off`` (``n`` the batch, ``h``/``w`` the LR input height
and width, rational ``coef`` and ``off``), closed under the operations SR graphs apply to sizes
read with ``Shape``: ``+``, ``−``, ``×`` and ``÷`` (floored for integer tensors) by constants,
and ``×``/``÷`` of pure monomials. Anything else evaluates to ``None`` (unknown), which the
rules treat as "cannot interpret". This lets the analysis read Resize sizes and Reshape
targets computed from the image's own shape (pixel-shuffle reshapes, attention maps resized
back to the input size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import onnx

from esr_deploy.runtime.tiling.ops import attr, int_attr, ints

F0 = Fraction(0)
F1 = Fraction(1)
_NO_EXPS = (0, 0, 0)


@dataclass(frozen=True)
class Val:
    """``coef · n^e0 · h^e1 · w^e2 + off``: a size or a number in shape arithmetic.

    ``n`` is the batch, ``h``/``w`` the LR input height/width; ``srcs`` are the tensors whose
    Shape the value was read from (ignored by :meth:`same`).
    """

    coef: Fraction
    exps: tuple[int, int, int] = _NO_EXPS
    off: Fraction = F0
    srcs: frozenset[str] = frozenset()

    @staticmethod
    def of(value: float | int | Fraction) -> Val:
        if isinstance(value, float):
            return Val(Fraction(value).limit_denominator(1 << 16))
        return Val(Fraction(value))

    @property
    def is_const(self) -> bool:
        return self.exps == _NO_EXPS

    def same(self, other: Val) -> bool:
        return (self.coef, self.exps, self.off) == (other.coef, other.exps, other.off)

    def _mk(self, coef: Fraction, exps: tuple[int, int, int], off: Fraction, o: Val) -> Val:
        if exps == _NO_EXPS:
            coef, off = coef + off, F0
        return Val(coef, exps, off, self.srcs | o.srcs)

    def add(self, o: Val) -> Val | None:
        if o.is_const:
            return self._mk(self.coef, self.exps, self.off + o.coef, o)
        if self.is_const:
            return o.add(self)
        if self.exps == o.exps:
            return self._mk(self.coef + o.coef, self.exps, self.off + o.off, o)
        return None

    def mul(self, o: Val) -> Val | None:
        if o.is_const:
            return self._mk(self.coef * o.coef, self.exps, self.off * o.coef, o)
        if self.is_const:
            return o.mul(self)
        if self.off or o.off:
            return None
        exps = (self.exps[0] + o.exps[0], self.exps[1] + o.exps[1], self.exps[2] + o.exps[2])
        return self._mk(self.coef * o.coef, exps, F0, o)

    def div(self, o: Val, floor: bool) -> Val | None:
        if o.is_const:
            if o.coef == 0:
                return None
            if self.is_const and floor:
                return self._mk(Fraction(math.floor(self.coef / o.coef)), _NO_EXPS, F0, o)
            return self._mk(self.coef / o.coef, self.exps, self.off / o.coef, o)
        if self.off or o.off:
            return None
        exps = (self.exps[0] - o.exps[0], self.exps[1] - o.exps[1], self.exps[2] - o.exps[2])
        return self._mk(self.coef / o.coef, exps, F0, o)

    @property
    def is_size_factor(self) -> bool:
        """A positive size that can be a factor of another (integral, non-negative powers)."""
        if any(e < 0 for e in self.exps) or self.coef <= 0 or self.off:
            return False
        return not self.is_const or self.coef.denominator == 1


ONE = Val(F1)
Vals = list[Val | None]


def index(v: Val | None, n: int) -> int:
    if v is None or not v.is_const:
        raise ValueError("symbolic index")
    i = int(v.coef)
    return i + n if i < 0 else i


def slice_values(x: Vals, ins: list[Vals | None], node: onnx.NodeProto, opset: int) -> Vals | None:
    if opset < 10:
        starts, ends = ints(attr(node, "starts", [0])), ints(attr(node, "ends", [len(x)]))
        steps = [1]
    else:
        if len(ins) < 3 or ins[1] is None or ins[2] is None:
            return None
        starts = [index(v, len(x)) for v in ins[1]]
        ends = [index(v, len(x)) if v is not None and v.coef < 2**30 else len(x) for v in ins[2]]
        steps = [index(v, 1) for v in ins[4]] if len(ins) > 4 and ins[4] is not None else [1]
    if len(starts) != 1:
        return None
    return x[slice(starts[0], ends[0], steps[0])]


def binary(op: str, a: Vals, b: Vals, integer: bool) -> Vals | None:
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    out: Vals = []
    for i in range(n):
        u, v = a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0]
        if u is None or v is None:
            out.append(None)
        elif op == "Add":
            out.append(u.add(v))
        elif op == "Sub":
            w = v.mul(Val.of(-1))
            out.append(None if w is None else u.add(w))
        elif op == "Mul":
            out.append(u.mul(v))
        else:
            out.append(u.div(v, floor=integer))
    return out


def shape_range(node: onnx.NodeProto, rank: int) -> tuple[int, int]:
    start = int_attr(node, "start", 0)
    stop = int_attr(node, "end", rank)
    start = max(0, min(rank, start + rank if start < 0 else start))
    stop = max(0, min(rank, stop + rank if stop < 0 else stop))
    return start, stop
