"""Tiled super-resolution whose overlap is the network's receptive field, read from its ONNX.

An SR network maps an LR image (H×W) to an HR image (sH×sW). Running it on overlapping
*windows* of the LR image and pasting each window's *core* reproduces the untiled output
exactly when (1) every HR pixel of a core depends only on LR pixels inside its window and
(2) every strided op samples the same grid in the window as in the whole image.

**Receptive field.** :func:`receptive_field` walks the graph from the input to the output and
keeps, for every tensor with spatial extent and for each spatial axis, three rationals
``(a, lo, hi)``: element ``j`` of the tensor depends on (at most) the LR pixels in
``[a·j + lo, a·j + hi]``; ``a`` is the tensor's stride in LR pixels per element. The input has
``(1, 0, 0)``; every op maps its input's triple to its output's:

- Conv / MaxPool / AveragePool / LpPool with kernel ``k``, dilation ``d``, stride ``s`` and
  leading pad ``p`` (explicit or from ``auto_pad``): output ``i`` reads inputs
  ``s·i − p + t·d`` (``0 ≤ t < k``), so ``a' = a·s``, ``lo' = lo − a·p``,
  ``hi' = hi + a·((k − 1)·d − p)``.
- ConvTranspose: output ``o`` receives inputs ``(o + p − t·d)/s``, so ``a' = a/s``,
  ``lo' = lo + a·(p − (k − 1)·d)/s``, ``hi' = hi + a·p/s``.
- DepthToSpace by ``b`` (and the Reshape→Transpose→Reshape pixel shuffle): output ``o`` reads
  input ``⌊o/b⌋``, so ``a' = a/b``, ``lo' = lo − a·(b − 1)/b``. SpaceToDepth:
  ``a' = a·b``, ``hi' = hi + a·(b − 1)``.
- Resize / Upsample by ``f``: output ``i`` samples input coordinate ``x = i/f + c`` (``c`` from
  the coordinate transformation mode) and reads the inputs ``j`` of its mode: nearest the
  rounded ``x``; linear ``|j − x| < 1``; cubic ``|j − x| < 2`` (``/f`` with antialias when
  downscaling). Over all phases of ``i`` the offsets ``δ = j − i/f`` lie in
  ``[δmin, δmax]``: ``a' = a/f``, ``lo' = lo + a·δmin``, ``hi' = hi + a·δmax``.
- Pad and Slice shift the index: ``lo' = lo − a·p``, ``hi' = hi − a·p`` for a leading pad
  ``p`` (a crop is a negative pad; any padding mode but ``wrap``).
- Element-wise ops (and Concat/Split/Slice/Gather on non-spatial axes) take the union of their
  spatial inputs' intervals; per-channel constants and global statistics have no extent.
- Windows: a window's tensors start at the window's start and have about
  ``(window length + ext)/a`` elements (``ext`` is tracked per tensor: valid convs and crops
  shrink it, padding grows it). Elements a window lacks are read as padding, so they must
  count as reaching outside the window: the analysis keeps ``lo < a`` and ``hi ≥ −ext``,
  widening the field after crops (a crop then zero pad of 1 pixel before a 3×3 conv needs an
  overlap of 2, not 1).
- Shape arithmetic is evaluated symbolically (sizes as ``coef·n^e0·h^e1·w^e2 + off`` in the LR
  height ``h`` and width ``w``), so that Resize sizes and Reshape targets computed from Shape
  nodes can be interpreted.

The HR output has ``a = 1/s``. HR pixel ``i`` belongs to LR pixel ``q = ⌊i/s⌋`` and
``a·i ∈ [q, q + 1 − 1/s]``, so it needs the LR pixels ``q − ⌊−lo⌋ … q + ⌊1 − 1/s + hi⌋``; the
radius of an axis is the larger of the two reaches.

**Alignment.** A window starting at LR pixel ``w`` starts at element ``w/a`` of a tensor of
stride ``a = n/d`` (lowest terms); the window samples the same grid as the whole image only if
that is an integer for every tensor, i.e. ``w`` is a multiple of the least common multiple of
the numerators ``n`` (RLFN: stride 2 then 3 in its ESA, alignment 6).

**Not exact.** Three things break "tiled == untiled" and are reported by node name: ops whose
output depends on the whole image (ReduceMean over H/W, global pooling, instance/group
normalisation, softmax over a spatial axis: ``global_nodes``); Resize whose output size or
scale is read from another tensor's shape, so that its sampling positions depend on the image
size (RLFN's ESA: ``size_dependent_nodes``; the field computed for them is still used, but a
tile samples them elsewhere than the whole image does, 48–51 dB from the untiled output on
Set14's baboon, unless the runner gives them the whole image's positions, as
:mod:`esr_deploy.resize_geometry` does; element-wise ops on values computed from the image
size are listed there too); ops on spatial tensors this analysis does not know, including
coordinate grids built with Range from the image size (``unknown_nodes``).

The field is an upper bound: it is exact for chains of convolutions, pooling, pixel shuffles and
constant-scale resizes, and may exceed the need by a pixel where a strided op and a resize
interleave (offsets of different phases are merged). The analysis reads the graph forms
esr-deploy produces (fp32 from torch.onnx + onnxsim, float16 with Casts, int8 with
QuantizeLinear/DequantizeLinear) and ONNX Runtime's optimised graphs (NCHWc ops).

**Tiling.** :func:`plan_tiles` cuts the LR image into a grid of ``tile×tile`` cores and gives
each core a window: the core grown by the overlap on each side, clipped to the image, its start
moved down to a multiple of the alignment, and grown to at least ``min_hw`` (the smallest input
the network accepts, e.g. 15 for RLFN). :func:`run_tiled` runs the network on every window and
copies each core's part of the window's output into one preallocated HR image.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import onnx
from onnx import helper, numpy_helper

from esr_deploy.errors import TilingError

__all__ = ["ReceptiveField", "Tile", "plan_tiles", "receptive_field", "run_tiled"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Public results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceptiveField:
    """What :func:`receptive_field` found; ``radius`` is the overlap tiling needs."""

    #: (rows, cols): LR pixels beyond its own that an output pixel depends on, per side.
    radius: tuple[int, int]
    #: Window starts must be multiples of this (cumulative stride of strided convs / pools).
    alignment: tuple[int, int]
    #: Nodes whose output depends on the whole image: tiling can never be exact.
    global_nodes: tuple[str, ...] = ()
    #: Resize/Upsample whose sampling positions depend on the input size (and ops on values
    #: computed from it): tiles match closely, not exactly.
    size_dependent_nodes: tuple[str, ...] = ()
    #: Ops on spatial tensors this analysis does not know: the field is not reliable.
    unknown_nodes: tuple[str, ...] = ()
    #: (node name, op type) of every node named above, for messages.
    op_types: tuple[tuple[str, str], ...] = ()

    @property
    def exact(self) -> bool:
        """Tiling with ``radius`` and ``alignment`` reproduces the untiled output exactly."""
        return not (self.global_nodes or self.size_dependent_nodes or self.unknown_nodes)

    def describe(self) -> str:
        """One sentence for users, naming the nodes that make tiling inexact."""
        ops = dict(self.op_types)

        def both(v: tuple[int, int], unit: str) -> str:
            return f"{v[0]}{unit}" if v[0] == v[1] else f"{v[0]} rows / {v[1]} cols{unit}"

        head = (
            f"receptive field ±{both(self.radius, ' LR pixels')}, "
            f"alignment {both(self.alignment, '')}"
        )
        samplers = [n for n in self.size_dependent_nodes if ops.get(n) in _SAMPLING_OPS]
        reasons: list[str] = []
        for names, one, many in (
            (self.global_nodes, "depends on the whole image", "depend on the whole image"),
            (
                samplers,
                "samples at positions that depend on the image size",
                "sample at positions that depend on the image size",
            ),
            (
                [n for n in self.size_dependent_nodes if n not in samplers],
                "uses values computed from the image size",
                "use values computed from the image size",
            ),
            (
                self.unknown_nodes,
                "is not understood by the receptive-field analysis",
                "are not understood by the receptive-field analysis",
            ),
        ):
            if not names:
                continue
            shown = [f"`{n}` ({ops.get(n, '?')})" for n in names[:3]]
            listed = ", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1 else shown[0]
            if len(names) > 3:
                listed = f"{', '.join(shown)} and {len(names) - 3} more"
            reasons.append(f"{listed} {one if len(names) == 1 else many}")
        if not reasons:
            return f"{head}; exact"
        return f"{head}; not exact: {'; '.join(reasons)}"


@dataclass(frozen=True)
class Tile:
    """One tile: LR pixel ranges ``(y0, y1, x0, x1)``, end-exclusive."""

    #: The part of the output this tile provides (the cores partition the image).
    core: tuple[int, int, int, int]
    #: The LR region fed to the network (core plus overlap, clipped, start aligned).
    window: tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# Symbolic sizes (shape arithmetic)
# --------------------------------------------------------------------------------------------

_F0 = Fraction(0)
_F1 = Fraction(1)
_NO_EXPS = (0, 0, 0)


@dataclass(frozen=True)
class _Val:
    """``coef · n^e0 · h^e1 · w^e2 + off``: a size or a number in shape arithmetic.

    ``n`` is the batch, ``h``/``w`` the LR input height/width; ``srcs`` are the tensors whose
    Shape the value was read from (ignored by :meth:`same`).
    """

    coef: Fraction
    exps: tuple[int, int, int] = _NO_EXPS
    off: Fraction = _F0
    srcs: frozenset[str] = frozenset()

    @staticmethod
    def of(value: float | int | Fraction) -> _Val:
        if isinstance(value, float):
            return _Val(Fraction(value).limit_denominator(1 << 16))
        return _Val(Fraction(value))

    @property
    def is_const(self) -> bool:
        return self.exps == _NO_EXPS

    def same(self, other: _Val) -> bool:
        return (self.coef, self.exps, self.off) == (other.coef, other.exps, other.off)

    def _mk(self, coef: Fraction, exps: tuple[int, int, int], off: Fraction, o: _Val) -> _Val:
        if exps == _NO_EXPS:
            coef, off = coef + off, _F0
        return _Val(coef, exps, off, self.srcs | o.srcs)

    def add(self, o: _Val) -> _Val | None:
        if o.is_const:
            return self._mk(self.coef, self.exps, self.off + o.coef, o)
        if self.is_const:
            return o.add(self)
        if self.exps == o.exps:
            return self._mk(self.coef + o.coef, self.exps, self.off + o.off, o)
        return None

    def mul(self, o: _Val) -> _Val | None:
        if o.is_const:
            return self._mk(self.coef * o.coef, self.exps, self.off * o.coef, o)
        if self.is_const:
            return o.mul(self)
        if self.off or o.off:
            return None
        exps = (self.exps[0] + o.exps[0], self.exps[1] + o.exps[1], self.exps[2] + o.exps[2])
        return self._mk(self.coef * o.coef, exps, _F0, o)

    def div(self, o: _Val, floor: bool) -> _Val | None:
        if o.is_const:
            if o.coef == 0:
                return None
            if self.is_const and floor:
                return self._mk(Fraction(math.floor(self.coef / o.coef)), _NO_EXPS, _F0, o)
            return self._mk(self.coef / o.coef, self.exps, self.off / o.coef, o)
        if self.off or o.off:
            return None
        exps = (self.exps[0] - o.exps[0], self.exps[1] - o.exps[1], self.exps[2] - o.exps[2])
        return self._mk(self.coef / o.coef, exps, _F0, o)

    @property
    def is_size_factor(self) -> bool:
        """A positive size that can be a factor of another (integral, non-negative powers)."""
        if any(e < 0 for e in self.exps) or self.coef <= 0 or self.off:
            return False
        return not self.is_const or self.coef.denominator == 1


_ONE = _Val(_F1)
_Vals = list[_Val | None]


# --------------------------------------------------------------------------------------------
# Spatial tensors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reach:
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
    ext: Fraction = _F0

    def union(self, other: _Reach) -> _Reach:
        return _Reach(
            self.stride,
            min(self.lo, other.lo),
            max(self.hi, other.hi),
            min(self.ext, other.ext),
        )

    def settled(self) -> _Reach:
        lo = self.lo if self.lo < self.stride else _F0
        return _Reach(self.stride, lo, max(self.hi, -self.ext), self.ext)

    def window(
        self, s: int, begins: Iterable[int], totals: Iterable[int], k: int, d: int
    ) -> _Reach:
        """Conv / pool: ``k`` taps ``d`` apart, stride ``s``, leading pads ``begins`` and total
        pads ``totals`` (several when they depend on the size): output size
        ``⌊(n + total − span)/s⌋ + 1 ≥ (n + total − span + 1)/s``."""
        begins, a, span = list(begins), self.stride, (k - 1) * d + 1
        return _Reach(
            a * s,
            self.lo - a * max(begins),
            self.hi + a * (span - 1 - min(begins)),
            self.ext + a * (min(totals) - span + 1),
        )

    def depth_to_space(self, b: int) -> _Reach:
        a = self.stride
        return _Reach(a / b, self.lo - a * (b - 1) / b, self.hi, self.ext)

    def space_to_depth(self, b: int) -> _Reach:
        a = self.stride
        return _Reach(a * b, self.lo, self.hi + a * (b - 1), self.ext)


#: One axis of a spatial tensor: ``("y" | "x", None)`` or ``("c", size)`` for any other axis
#: (batch, channels, sub-pixel digits, ...), size known or None.
_Dim = tuple[str, "_Val | None"]


@dataclass(frozen=True)
class _Spatial:
    dims: tuple[_Dim, ...]
    y: _Reach
    x: _Reach

    @property
    def rank(self) -> int:
        return len(self.dims)

    def pos(self, kind: str) -> int:
        return next(i for i, (k, _) in enumerate(self.dims) if k == kind)

    @property
    def canonical(self) -> bool:
        """Rows on axis 2 and columns on axis 3 (NCHW; NCHWc blocked layouts too)."""
        return self.rank >= 4 and self.dims[2][0] == "y" and self.dims[3][0] == "x"

    def reach(self, kind: str) -> _Reach:
        return self.y if kind == "y" else self.x

    def with_reach(self, kind: str, r: _Reach) -> _Spatial:
        return replace(self, y=r) if kind == "y" else replace(self, x=r)

    def size(self, i: int, src: str = "") -> _Val | None:
        kind, size = self.dims[i]
        srcs = frozenset([src]) if src else frozenset()
        if kind == "y":
            return _Val(1 / self.y.stride, (0, 1, 0), _F0, srcs)
        if kind == "x":
            return _Val(1 / self.x.stride, (0, 0, 1), _F0, srcs)
        return None if size is None else replace(size, srcs=size.srcs | srcs)

    def spatial_axes(self) -> tuple[int, int]:
        return self.pos("y"), self.pos("x")


class _Unsupported(Exception):
    """Raised inside an op rule: the node goes to ``unknown_nodes``."""


# --------------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------------

_ELEMENTWISE = frozenset(
    """Abs Acos Acosh Add And Asin Asinh Atan Atanh BatchNormalization BitShift BitwiseAnd
    BitwiseNot BitwiseOr BitwiseXor Cast CastLike Ceil Celu Clip Cos Cosh DequantizeLinear Div
    Dropout Elu Equal Erf Exp Expand Floor Gelu Greater GreaterOrEqual HardSigmoid HardSwish
    Identity IsInf IsNaN LRN LeakyRelu Less LessOrEqual Log Max Mean Min Mish Mod Mul Neg Not
    Or PRelu Pow QuantizeLinear Reciprocal Relu Round Selu Shrink Sigmoid Sign Sin Sinh
    Softplus Softsign Sqrt Sub Sum Tan Tanh ThresholdedRelu Where Xor
    FastGelu BiasGelu QuickGelu BiasAdd QLinearAdd QLinearMul QLinearSigmoid QLinearLeakyRelu
    ReorderInput ReorderOutput""".split()
)
_CONVS = frozenset({"Conv", "ConvInteger", "QLinearConv", "FusedConv"})
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "QLinearAveragePool"})
_GLOBAL_POOLS = frozenset(
    {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "QLinearGlobalAveragePool"}
)
#: Ops that are size-dependent through where they sample (the others through their values).
_SAMPLING_OPS = _CONVS | _POOLS | {"ConvTranspose", "Resize", "Upsample"}
_REDUCES = frozenset(
    """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare""".split()
)
#: Reduce ops that take ``axes`` as an input from this opset on (attribute before).
_AXES_INPUT_FROM = {"ReduceSum": 13}
_WHOLE_IMAGE = frozenset(
    {"InstanceNormalization", "GroupNormalization", "DynamicQuantizeLinear", "NonZero"}
)
#: Inputs of ops that are parameters (shapes, axes, pads, ...), not data.
_PARAM_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 2, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "ConstantOfShape": (0,),
    "TopK": (1,),
    "CumSum": (1,),
}
_INT_TYPES = frozenset(
    {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8}
)
#: Ops that only select or move values (no arithmetic).
_SELECTIONS = frozenset(
    {"Gather", "Slice", "Concat", "Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape"}
)
_MAX_PHASES = 4096
_MAX_CONST_VALUES = 64


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    value = _attr(node, name, default)
    if not isinstance(value, int):
        raise _Unsupported
    return value


def _ints(value: object) -> list[int]:
    if not isinstance(value, list | tuple):
        raise _Unsupported
    return [int(v) for v in value]


def _floats(value: object) -> list[float]:
    if not isinstance(value, list | tuple):
        raise _Unsupported
    return [float(v) for v in value]


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


class _Analysis:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18
        )
        self.spatial: dict[str, _Spatial] = {}
        self.values: dict[str, _Vals] = {}
        #: non-spatial tensors whose values depend on the image size
        self.size_tainted: set[str] = set()
        self.static: dict[str, tuple[int | None, ...]] = {}
        self.elem_type: dict[str, int] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.global_nodes: list[str] = []
        self.size_dependent: list[str] = []
        self.unknown: list[str] = []
        self.op_types: dict[str, str] = {}
        self._collect_static()

    # -- static facts ------------------------------------------------------------------------

    def _collect_static(self) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception as exc:  # noqa: BLE001 - onnx raises untyped errors; it is optional
            log.debug("shape inference failed (%s); using declared shapes only", exc)
            inferred = self.model
        g = inferred.graph
        for vi in [*g.value_info, *g.input, *g.output]:
            if vi.type.HasField("tensor_type"):
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                self.static[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in dims
                )
        for init in self.graph.initializer:
            self.static[init.name] = tuple(init.dims)
            self.elem_type[init.name] = init.data_type
            if int(np.prod(init.dims)) <= _MAX_CONST_VALUES:
                self.values[init.name] = self._from_array(numpy_helper.to_array(init))
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node

    @staticmethod
    def _from_array(arr: np.ndarray) -> _Vals:
        if arr.dtype.kind not in "iufb":
            return [None] * arr.size
        flat = arr.reshape(-1)
        if arr.dtype.kind == "f":
            return [_Val.of(float(v)) if np.isfinite(v) else None for v in flat]
        return [_Val.of(int(v)) for v in flat]

    def _weight_shape(self, name: str) -> tuple[int | None, ...] | None:
        """Static shape of a weight, through DequantizeLinear / Cast / Identity."""
        for _ in range(8):
            if name in self.static and all(d is not None for d in self.static[name]):
                return self.static[name]
            node = self.producer.get(name)
            if node is None or node.op_type not in (
                "DequantizeLinear",
                "QuantizeLinear",
                "Cast",
                "Identity",
            ):
                break
            name = node.input[0]
        return self.static.get(name)

    def _consts(self, name: str) -> _Vals | None:
        if not name:
            return None
        return self.values.get(name)

    def _const_ints(self, name: str) -> list[int] | None:
        vals = self._consts(name)
        if vals is None or any(v is None or not v.is_const or v.srcs for v in vals):
            return None
        return [int(v.coef) for v in vals if v is not None]

    # -- driver --------------------------------------------------------------------------

    def run(self) -> ReceptiveField:
        graph = self.graph
        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if not inputs or not graph.output:
            raise TilingError(
                "Cannot compute the receptive field — the ONNX graph has no input or no output "
                "— pass the model's fp32 ONNX (model.fp32.onnx of the bundle)."
            )
        first = inputs[0].name
        shape = self.static.get(first, ())
        if len(shape) != 4:
            raise TilingError(
                f"Cannot compute the receptive field — input '{first}' has rank {len(shape)}, "
                "not N×C×H×W — pass an SR model with one NCHW image input."
            )
        batch = _Val.of(shape[0]) if shape[0] else _Val(_F1, (1, 0, 0))
        channels = _Val.of(shape[1]) if shape[1] else None
        origin = _Reach(_F1, _F0, _F0, _F0)
        self.spatial[first] = _Spatial(
            (("c", batch), ("c", channels), ("y", None), ("x", None)), origin, origin
        )
        for node in graph.node:
            self._visit(node)
        out = graph.output[0].name
        state = self.spatial.get(out)
        if state is None or not state.canonical:
            raise TilingError(
                f"Cannot compute the receptive field — output '{out}' is not an N×C×H×W image "
                f"derived from input '{first}' through ops this analysis follows — tile only "
                "SR models whose output is an image."
            )
        alignment = [1, 1]
        for s in self.spatial.values():
            alignment[0] = math.lcm(alignment[0], s.y.stride.numerator)
            alignment[1] = math.lcm(alignment[1], s.x.stride.numerator)
        radius = (_radius(state.y), _radius(state.x))
        named = [*self.global_nodes, *self.size_dependent, *self.unknown]
        return ReceptiveField(
            radius=radius,
            alignment=(alignment[0], alignment[1]),
            global_nodes=tuple(dict.fromkeys(self.global_nodes)),
            size_dependent_nodes=tuple(dict.fromkeys(self.size_dependent)),
            unknown_nodes=tuple(dict.fromkeys(self.unknown)),
            op_types=tuple((n, self.op_types[n]) for n in dict.fromkeys(named)),
        )

    def _mark(self, node: onnx.NodeProto, bucket: list[str]) -> None:
        name = _node_name(node)
        bucket.append(name)
        self.op_types[name] = node.op_type

    def _visit(self, node: onnx.NodeProto) -> None:
        sp_in = [i for i in node.input if i in self.spatial]
        if not sp_in and any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            sp_in = [n for n in _subgraph_inputs(node) if n in self.spatial]
        if not sp_in:
            self._visit_values(node)
            return
        op = node.op_type
        try:
            if op in ("Shape", "Size"):
                self._shape(node)
            elif op in _GLOBAL_POOLS or op in _WHOLE_IMAGE:
                self._mark(node, self.global_nodes)
            elif node.domain not in ("", "ai.onnx", "com.microsoft", "com.microsoft.nchwc"):
                raise _Unsupported
            elif op in _ELEMENTWISE:
                self._elementwise(node)
            elif op in _CONVS:
                self._conv(node)
            elif op in _POOLS:
                self._pool(node)
            elif op == "ConvTranspose":
                self._conv_transpose(node)
            elif op in ("DepthToSpace", "SpaceToDepth"):
                self._depth_to_space(node)
            elif op in ("Resize", "Upsample"):
                self._resize(node)
            elif op == "Pad":
                self._pad(node)
            elif op == "Slice":
                self._slice(node)
            elif op in ("Concat", "QLinearConcat", "Split", "Gather"):
                self._along_axis(node)
            elif op == "Reshape":
                self._reshape(node)
            elif op == "Transpose":
                self._transpose(node)
            elif op in ("Squeeze", "Unsqueeze"):
                self._squeeze(node)
            elif op == "Tile":
                self._tile(node)
            elif op in _REDUCES or op in ("ArgMax", "ArgMin", "TopK", "CumSum"):
                self._reduce(node)
            elif op in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
                self._softmax(node)
            elif op in ("LayerNormalization", "MeanVarianceNormalization"):
                self._normalization(node)
            elif op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
                self._matmul(node)
            else:
                raise _Unsupported
        except (_Unsupported, ValueError, IndexError, KeyError, ZeroDivisionError) as exc:
            # an op, an attribute or a parameter this analysis cannot interpret
            log.debug("receptive field: %s (%s) not understood: %r", node.name, op, exc)
            self._mark(node, self.unknown)
            merged = self._union([self.spatial[i] for i in sp_in])
            for out in node.output:
                if out:
                    self.spatial[out] = merged

    # -- non-spatial values --------------------------------------------------------------

    def _visit_values(self, node: onnx.NodeProto) -> None:
        params = _PARAM_INPUTS.get(node.op_type, ())
        data = [n for k, n in enumerate(node.input) if n and k not in params]
        if node.op_type == "Range" and any(n in self.size_tainted for n in node.input):
            # positions computed from the image size (coordinate grids): not shift-invariant
            self._mark(node, self.unknown)
        try:
            vals = self._evaluate(node)
        except (ValueError, IndexError, TypeError, ZeroDivisionError):
            vals = None
        if vals is not None and node.output:
            self.values[node.output[0]] = vals
        picks_static_dims = (
            node.op_type in _SELECTIONS
            and vals is not None
            and all(v is not None and v.is_const for v in vals)
        )  # e.g. the channel count out of a Shape
        if any(n in self.size_tainted for n in data) and not picks_static_dims:
            self.size_tainted.update(o for o in node.output if o)

    def _evaluate(self, node: onnx.NodeProto) -> _Vals | None:
        op = node.op_type
        ins = [self._consts(n) for n in node.input]
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and int(np.prod(a.t.dims)) <= _MAX_CONST_VALUES:
                    return self._from_array(numpy_helper.to_array(a.t))
                if a.name in ("value_int", "value_float"):
                    return [_Val.of(helper.get_attribute_value(a))]
                if a.name in ("value_ints", "value_floats"):
                    return [_Val.of(v) for v in helper.get_attribute_value(a)]
            return None
        if op in ("Shape", "Size"):
            dims = self.static.get(node.input[0])
            if dims is None:
                return None
            if op == "Size":
                known = [d for d in dims if d is not None]
                return [_Val.of(math.prod(known))] if len(known) == len(dims) else None
            start, end = _shape_range(node, len(dims))
            return [None if d is None else _Val.of(d) for d in dims[start:end]]
        if not ins or ins[0] is None:
            return None
        x = ins[0]
        if op == "Cast" and _attr(node, "to") in _INT_TYPES:
            return [
                v if v is None or not v.is_const else _Val(Fraction(int(v.coef)), srcs=v.srcs)
                for v in x
            ]
        if op in ("Identity", "Cast", "CastLike", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            return list(x)
        if op == "Concat":
            if any(v is None for v in ins):
                return None
            return [v for part in ins if part is not None for v in part]
        if op == "Gather":
            idx = ins[1] if len(ins) > 1 else None
            if idx is None:
                return None
            return [x[_index(v, len(x))] for v in idx]
        if op == "Slice":
            return _slice_values(x, ins, node, self.opset)
        if op in ("Add", "Sub", "Mul", "Div"):
            if len(ins) < 2 or ins[1] is None:
                return None
            return _binary(op, x, ins[1], self._is_int(node.input[0]))
        if op == "Neg":
            return [None if v is None else v.mul(_Val.of(-1)) for v in x]
        if op in ("Floor", "Ceil") and all(v is not None and v.is_const for v in x):
            fn = math.floor if op == "Floor" else math.ceil
            return [_Val(Fraction(fn(v.coef)), srcs=v.srcs) for v in x if v is not None]
        return None

    def _is_int(self, name: str) -> bool:
        return self.elem_type.get(name) in _INT_TYPES

    def _shape(self, node: onnx.NodeProto) -> None:
        state = self.spatial[node.input[0]]
        src = node.input[0]
        if node.op_type == "Size":
            self.size_tainted.add(node.output[0])
            return
        start, end = _shape_range(node, state.rank)
        picked = range(state.rank)[start:end]
        self.values[node.output[0]] = [state.size(i, src) for i in picked]
        if any(state.dims[i][0] in ("y", "x") for i in picked):
            self.size_tainted.add(node.output[0])

    # -- helpers -------------------------------------------------------------------------

    def _union(self, states: Sequence[_Spatial], node: onnx.NodeProto | None = None) -> _Spatial:
        """Union of the fields of a node's spatial inputs; inputs sampled on different grids
        (strides) make the node unknown."""
        if node is not None and len({(s.y.stride, s.x.stride) for s in states}) > 1:
            raise _Unsupported
        first = max(states, key=lambda s: s.rank)
        y, x = first.y, first.x
        for s in states:
            y, x = y.union(s.y), x.union(s.x)
        return replace(first, y=y, x=x)

    def _set(self, node: onnx.NodeProto, state: _Spatial, outputs: int = 1) -> None:
        state = replace(state, y=state.y.settled(), x=state.x.settled())
        for out in list(node.output)[:outputs] if outputs else node.output:
            if out:
                self.spatial[out] = state

    def _data(self, node: onnx.NodeProto, index: int = 0) -> _Spatial:
        name = node.input[index] if len(node.input) > index else ""
        state = self.spatial.get(name)
        if state is None:
            raise _Unsupported
        return state

    def _canonical(self, node: onnx.NodeProto, index: int = 0) -> _Spatial:
        state = self._data(node, index)
        if not state.canonical:
            raise _Unsupported
        return state

    def _axis(self, state: _Spatial, axis: int) -> int:
        return axis + state.rank if axis < 0 else axis

    def _axes_values(
        self, node: onnx.NodeProto, attr_name: str, input_index: int
    ) -> list[int] | None:
        axes = _attr(node, attr_name)
        if axes is not None:
            return _ints(axes)
        if len(node.input) > input_index and node.input[input_index]:
            got = self._const_ints(node.input[input_index])
            if got is None:
                raise _Unsupported
            return got
        return None

    # -- op rules ------------------------------------------------------------------------

    def _elementwise(self, node: onnx.NodeProto) -> None:
        params = _PARAM_INPUTS.get(node.op_type, ())
        if any(
            n in self.size_tainted and n not in self.spatial
            for k, n in enumerate(node.input)
            if k not in params
        ):
            self._mark(node, self.size_dependent)  # values computed from the image size
        states = [self.spatial[i] for i in node.input if i in self.spatial]
        merged = self._union(states, node)
        if node.op_type == "ReorderInput":  # NCHW(c) -> blocked NCHWc: 5-D, H/W stay at 2, 3
            dims = merged.dims
            if _attr(node, "channels_last", 0):
                dims = (dims[0], dims[3], dims[1], dims[2])
            merged = replace(merged, dims=(*dims[:4], ("c", None)))
        elif node.op_type == "ReorderOutput":
            d = merged.dims
            merged = replace(
                merged,
                dims=(d[0], d[2], d[3], d[1]) if _attr(node, "channels_last", 0) else d[:4],
            )
        self._set(node, merged, outputs=0)

    def _conv(self, node: onnx.NodeProto) -> None:
        state = self._canonical(node)
        w_index = 3 if node.op_type == "QLinearConv" else 1
        kernel = _attr(node, "kernel_shape")
        if kernel is None:
            shape = self._weight_shape(node.input[w_index]) if len(node.input) > w_index else None
            if shape is None or len(shape) != 4 or None in shape[2:]:
                raise _Unsupported
            kernel = list(shape[2:])
        kernel = _ints(kernel)
        w_shape = self._weight_shape(node.input[w_index]) if len(node.input) > w_index else None
        out_c = _Val.of(w_shape[0]) if w_shape and w_shape[0] else None
        new = self._windowed(node, state, kernel)
        self._set(node, replace(new, dims=(new.dims[0], ("c", out_c), *new.dims[2:])))

    def _pool(self, node: onnx.NodeProto) -> None:
        state = self._canonical(node)
        if len(node.output) > 1 and node.output[1]:
            raise _Unsupported  # MaxPool indices are absolute positions
        kernel = _attr(node, "kernel_shape")
        if kernel is None:
            raise _Unsupported
        self._set(node, self._windowed(node, state, _ints(kernel)))

    def _windowed(self, node: onnx.NodeProto, state: _Spatial, kernel: list[int]) -> _Spatial:
        if len(kernel) != 2:
            raise _Unsupported
        strides = _ints(_attr(node, "strides", [1, 1]))
        dilations = _ints(_attr(node, "dilations", [1, 1]))
        pads = _ints(_attr(node, "pads", [0, 0, 0, 0]))
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        reaches = []
        for axis, kind in enumerate(("y", "x")):
            k, s, d = kernel[axis], strides[axis], dilations[axis]
            span = (k - 1) * d + 1
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                # total = max(0, (ceil(n/s) - 1)·s + span - n): depends on n mod s
                begins, totals = set(), set()
                for n_mod in range(s):
                    total = max(0, (math.ceil((s + n_mod) / s) - 1) * s + span - (s + n_mod))
                    upper = auto_pad == "SAME_UPPER"
                    begins.add(total // 2 if upper else total - total // 2)
                    totals.add(total)
                if len(begins) > 1:
                    self._mark(node, self.size_dependent)
            elif auto_pad == "VALID":
                begins, totals = {0}, {0}
            else:
                begins, totals = {pads[axis]}, {pads[axis] + pads[axis + 2]}
            reaches.append(state.reach(kind).window(s, begins, totals, k, d))
        return replace(state, y=reaches[0], x=reaches[1])

    def _conv_transpose(self, node: onnx.NodeProto) -> None:
        state = self._canonical(node)
        kernel = _attr(node, "kernel_shape")
        if kernel is None:
            shape = self._weight_shape(node.input[1])
            if shape is None or len(shape) != 4 or None in shape[2:]:
                raise _Unsupported
            kernel = list(shape[2:])
        kernel = _ints(kernel)
        strides = _ints(_attr(node, "strides", [1, 1]))
        dilations = _ints(_attr(node, "dilations", [1, 1]))
        pads = _ints(_attr(node, "pads", [0, 0, 0, 0]))
        out_pad = _ints(_attr(node, "output_padding", [0, 0]))
        auto_pad = _attr(node, "auto_pad", "NOTSET")
        if _attr(node, "output_shape") is not None:
            self._mark(node, self.size_dependent)  # pads follow from the requested size
        reaches = []
        for axis, kind in enumerate(("y", "x")):
            k, s, d = kernel[axis], strides[axis], dilations[axis]
            span = (k - 1) * d + 1
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                total = out_pad[axis] + span - s
                p = total - total // 2 if auto_pad == "SAME_UPPER" else total // 2
            elif auto_pad == "VALID":
                p, total = 0, 0
            else:
                p, total = pads[axis], pads[axis] + pads[axis + 2]
            r = state.reach(kind)
            a = r.stride
            # output size (n - 1)·s + output_padding + span - total
            reaches.append(
                _Reach(
                    a / s,
                    r.lo + a * Fraction(p - (k - 1) * d, s),
                    r.hi + a * Fraction(p, s),
                    r.ext - a + a * Fraction(out_pad[axis] + span - total, s),
                )
            )
        w_shape = self._weight_shape(node.input[1])
        groups = _int_attr(node, "group", 1)
        out_c = _Val.of(w_shape[1] * groups) if w_shape and w_shape[1] else None
        self._set(
            node,
            _Spatial((state.dims[0], ("c", out_c), *state.dims[2:]), reaches[0], reaches[1]),
        )

    def _depth_to_space(self, node: onnx.NodeProto) -> None:
        state = self._canonical(node)
        b = _int_attr(node, "blocksize", 1)
        if b < 1:
            raise _Unsupported
        if node.op_type == "DepthToSpace":
            y, x = state.y.depth_to_space(b), state.x.depth_to_space(b)
        else:
            y, x = state.y.space_to_depth(b), state.x.space_to_depth(b)
        self._set(node, _Spatial((state.dims[0], ("c", None), *state.dims[2:]), y, x))

    def _resize(self, node: onnx.NodeProto) -> None:
        state = self._canonical(node)
        upsample = node.op_type == "Upsample"
        rank = state.rank
        axes = _attr(node, "axes")
        axes = (
            [self._axis(state, a) for a in _ints(axes)] if axes is not None else list(range(rank))
        )
        # which input holds what (Resize-10: X, scales; Resize-11+: X, roi, scales, sizes)
        if upsample:
            scales_in = "" if _attr(node, "scales") is not None else node.input[1]
            sizes_in = ""
        elif self.opset < 11:
            scales_in, sizes_in = node.input[1], ""
        else:
            scales_in = node.input[2] if len(node.input) > 2 else ""
            sizes_in = node.input[3] if len(node.input) > 3 else ""
        scales: _Vals | None
        if upsample and _attr(node, "scales") is not None:
            scales = [_Val.of(float(v)) for v in _floats(_attr(node, "scales"))]
        else:
            scales = self._consts(scales_in) if scales_in else None
        sizes = self._consts(sizes_in) if sizes_in else None
        if scales is not None and len(scales) == 0:
            scales = None
        if scales is None and sizes is None:
            raise _Unsupported
        by_axis = dict(zip(axes, (scales if scales is not None else sizes) or [], strict=False))
        if len(by_axis) != len(axes):
            raise _Unsupported
        mode = str(_attr(node, "mode", "nearest"))
        if upsample or self.opset < 11:  # Upsample and Resize-10: asymmetric coordinates
            coord, nearest = "asymmetric", "upsample"
        else:
            coord = str(_attr(node, "coordinate_transformation_mode", "half_pixel"))
            nearest = str(_attr(node, "nearest_mode", "round_prefer_floor"))
        antialias = bool(_attr(node, "antialias", 0))
        size_dependent = False
        new = state
        for kind in ("y", "x"):
            axis = state.pos(kind)
            value = by_axis.get(axis)
            reach = state.reach(kind)
            if value is None:
                raise _Unsupported
            if scales is not None:
                if not value.is_const or value.coef <= 0:
                    raise _Unsupported
                f = value.coef
                size_dependent |= bool(value.srcs)  # a scale computed from shapes
            else:
                dim = (0, 1, 0) if kind == "y" else (0, 0, 1)
                if value.exps != dim or value.coef <= 0:
                    raise _Unsupported  # a fixed output size: cannot be tiled
                f = reach.stride * value.coef
                own = value.srcs == frozenset([node.input[0]])
                size_dependent |= not (own and f.denominator == 1 and not value.off)
                if str(_attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch":
                    size_dependent = True
            if coord == "align_corners" and f != 1:
                size_dependent = True
            elif coord == "half_pixel_symmetric" and f.denominator != 1:
                size_dependent = True
            elif coord == "tf_crop_and_resize":
                raise _Unsupported
            out = _resample(reach, f, mode, coord, nearest, antialias)
            if scales is None and len(value.srcs) == 1:
                # as many elements as the tensor whose shape was read (scaled, plus off)
                (src,) = value.srcs
                if src in self.spatial:
                    ext = self.spatial[src].reach(kind).ext + out.stride * value.off
                    out = replace(out, ext=ext)
            new = new.with_reach(kind, out)
        for axis, value in by_axis.items():
            if axis not in state.spatial_axes() and scales is not None:
                if value is None or not value.same(_ONE):
                    raise _Unsupported  # resizing channels or batch
        if size_dependent:
            self._mark(node, self.size_dependent)
        self._set(node, new)

    def _pad(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        mode = str(_attr(node, "mode", "constant"))
        if mode == "wrap":
            raise _Unsupported  # reads the far side of the image
        if self.opset < 11:
            pads = _ints(_attr(node, "pads", []))
            axes = list(range(state.rank))
        else:
            got = self._const_ints(node.input[1]) if len(node.input) > 1 else None
            if got is None:
                raise _Unsupported
            pads = got
            axes_vals = (
                self._const_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            )
            axes = (
                [self._axis(state, a) for a in axes_vals]
                if axes_vals is not None
                else list(range(state.rank))
            )
        if len(pads) != 2 * len(axes):
            raise _Unsupported
        new = state
        for i, axis in enumerate(axes):
            kind = state.dims[axis][0]
            begin, end = pads[i], pads[i + len(axes)]
            if kind == "c":
                if begin or end:
                    new = replace(new, dims=_set_dim(new.dims, axis, ("c", None)))
                continue
            r = new.reach(kind)
            a = r.stride
            # padded element j is input j - begin (crops are negative pads)
            new = new.with_reach(
                kind, _Reach(a, r.lo - a * begin, r.hi - a * begin, r.ext + a * (begin + end))
            )
        self._set(node, new)

    def _slice(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        if self.opset < 10:
            starts = _ints(_attr(node, "starts", []))
            ends_vals: _Vals = [_Val.of(e) for e in _ints(_attr(node, "ends", []))]
            axes = _ints(_attr(node, "axes", list(range(len(starts)))))
            steps = [1] * len(starts)
        else:
            got = self._const_ints(node.input[1])
            ends_got = self._consts(node.input[2])
            if got is None or ends_got is None:
                raise _Unsupported
            starts, ends_vals = got, ends_got
            axes_got = (
                self._const_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            )
            axes = axes_got if axes_got is not None else list(range(len(starts)))
            steps_got = (
                self._const_ints(node.input[4]) if len(node.input) > 4 and node.input[4] else None
            )
            steps = steps_got if steps_got is not None else [1] * len(starts)
        new = state
        for start, end, axis, step in zip(starts, ends_vals, axes, steps, strict=True):
            axis = self._axis(state, axis)
            kind = state.dims[axis][0]
            if kind == "c":
                new = replace(new, dims=_set_dim(new.dims, axis, ("c", None)))
                continue
            if start < 0 or step < 1 or end is None:
                raise _Unsupported
            size = state.size(axis)
            assert size is not None
            if end.is_const and end.coef >= 2**30:
                cut = 0
            elif end.is_const and end.coef < 0:
                cut = int(-end.coef)
            elif not end.is_const and end.coef == size.coef and end.exps == size.exps:
                cut = int(-end.off)  # the size read from a shape, minus a constant
                if cut < 0:
                    cut = 0
            else:
                raise _Unsupported  # a fixed-size crop of a dynamic axis
            r = new.reach(kind)
            a = r.stride
            # element j is input start + step·j; ceil((n - start - cut)/step) elements remain
            new = new.with_reach(
                kind,
                _Reach(a * step, r.lo + a * start, r.hi + a * start, r.ext - a * (start + cut)),
            )
        self._set(node, new)

    def _along_axis(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        data_index = next(k for k, n in enumerate(node.input) if n in self.spatial)
        state = self.spatial[node.input[data_index]]
        if op == "Gather" and data_index != 0:
            raise _Unsupported  # spatial indices
        axis = self._axis(state, _int_attr(node, "axis", 0))
        if not 0 <= axis < state.rank or state.dims[axis][0] != "c":
            raise _Unsupported  # along H or W
        dims = _set_dim(state.dims, axis, ("c", None))
        if op == "Gather":
            idx_shape = self.static.get(node.input[1])
            if idx_shape == ():
                dims = dims[:axis] + dims[axis + 1 :]
            elif idx_shape is not None and len(idx_shape) != 1:
                raise _Unsupported
        merged = self._union([self.spatial[n] for n in node.input if n in self.spatial], node)
        self._set(node, replace(merged, dims=dims), outputs=0)

    def _reshape(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        target = self._consts(node.input[1])
        if target is None:
            raise _Unsupported
        allowzero = bool(_attr(node, "allowzero", 0))
        self._set(node, _reshape(state, target, allowzero))

    def _transpose(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        perm = _attr(node, "perm")
        order = _ints(perm) if perm is not None else list(range(state.rank))[::-1]
        if sorted(order) != list(range(state.rank)):
            raise _Unsupported
        self._set(node, replace(state, dims=tuple(state.dims[p] for p in order)))

    def _squeeze(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        axes = self._axes_values(node, "axes", 1)
        dims = list(state.dims)
        if node.op_type == "Squeeze":
            if axes is None:
                raise _Unsupported  # squeezes whatever has size 1: unknown here
            drop = {self._axis(state, a) for a in axes}
            if any(dims[a][0] != "c" for a in drop):
                raise _Unsupported
            dims = [d for i, d in enumerate(dims) if i not in drop]
        else:
            if axes is None:
                raise _Unsupported
            out_rank = len(dims) + len(axes)
            for a in sorted(a + out_rank if a < 0 else a for a in axes):
                dims.insert(a, ("c", _ONE))
        self._set(node, replace(state, dims=tuple(dims)))

    def _tile(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        reps = self._const_ints(node.input[1])
        if reps is None or any(reps[i] != 1 for i in state.spatial_axes()):
            raise _Unsupported
        self._set(node, state)

    def _reduce(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        op = node.op_type
        if op in ("ArgMax", "ArgMin"):
            axes: list[int] | None = [_int_attr(node, "axis", 0)]
        elif op == "TopK":
            axes = [_int_attr(node, "axis", -1)]
        elif op == "CumSum":
            got = self._const_ints(node.input[1])
            if got is None:
                raise _Unsupported
            axes = got
        elif self.opset >= _AXES_INPUT_FROM.get(op, 18):
            axes = self._axes_values(node, "axes", 1)
        else:
            axes = _ints(_attr(node, "axes")) if _attr(node, "axes") is not None else None
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                self._set(node, state)
                return
            axes = list(range(state.rank))
        axes = [self._axis(state, a) for a in axes]
        if set(axes) & set(state.spatial_axes()):
            self._mark(node, self.global_nodes)
            return
        keep = op in ("TopK", "CumSum") or bool(_attr(node, "keepdims", 1))
        dims = [("c", None) if i in axes else d for i, d in enumerate(state.dims)]
        if not keep:
            dims = [d for i, d in enumerate(dims) if i not in axes]
        self._set(node, replace(state, dims=tuple(dims)), outputs=0)

    def _softmax(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        old = self.opset < 13 and node.op_type != "LpNormalization"
        axis = self._axis(state, _int_attr(node, "axis", 1 if old else -1))
        covered = set(range(axis, state.rank)) if old else {axis}
        if covered & set(state.spatial_axes()):
            self._mark(node, self.global_nodes)
            return
        self._set(node, state)

    def _normalization(self, node: onnx.NodeProto) -> None:
        state = self._data(node)
        if node.op_type == "LayerNormalization":
            axis = self._axis(state, _int_attr(node, "axis", -1))
            covered = set(range(axis, state.rank))
        else:
            covered = {self._axis(state, a) for a in _ints(_attr(node, "axes", [0, 2, 3]))}
        if covered & set(state.spatial_axes()):
            self._mark(node, self.global_nodes)
            return
        self._set(node, state, outputs=1)

    def _matmul(self, node: onnx.NodeProto) -> None:
        a_name = node.input[0]
        b_name = node.input[3] if node.op_type == "QLinearMatMul" else node.input[1]
        a, b = self.spatial.get(a_name), self.spatial.get(b_name)
        if a is not None and a.dims[-1][0] != "c":
            raise _Unsupported  # contracts H or W
        if b is not None and (b.rank < 2 or b.dims[-2][0] != "c" or b.dims[-1][0] != "c"):
            raise _Unsupported
        if a is None or b is not None:
            raise _Unsupported
        self._set(node, replace(a, dims=(*a.dims[:-1], ("c", None))))


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    names: list[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.extend(n.input)
                names.extend(_subgraph_inputs(n))
    return names


def _set_dim(dims: tuple[_Dim, ...], axis: int, dim: _Dim) -> tuple[_Dim, ...]:
    return (*dims[:axis], dim, *dims[axis + 1 :])


def _shape_range(node: onnx.NodeProto, rank: int) -> tuple[int, int]:
    start = _int_attr(node, "start", 0)
    stop = _int_attr(node, "end", rank)
    start = max(0, min(rank, start + rank if start < 0 else start))
    stop = max(0, min(rank, stop + rank if stop < 0 else stop))
    return start, stop


def _index(v: _Val | None, n: int) -> int:
    if v is None or not v.is_const:
        raise ValueError("symbolic index")
    i = int(v.coef)
    return i + n if i < 0 else i


def _slice_values(
    x: _Vals, ins: list[_Vals | None], node: onnx.NodeProto, opset: int
) -> _Vals | None:
    if opset < 10:
        starts, ends = _ints(_attr(node, "starts", [0])), _ints(_attr(node, "ends", [len(x)]))
        steps = [1]
    else:
        if len(ins) < 3 or ins[1] is None or ins[2] is None:
            return None
        starts = [_index(v, len(x)) for v in ins[1]]
        ends = [_index(v, len(x)) if v is not None and v.coef < 2**30 else len(x) for v in ins[2]]
        steps = [_index(v, 1) for v in ins[4]] if len(ins) > 4 and ins[4] is not None else [1]
    if len(starts) != 1:
        return None
    return x[slice(starts[0], ends[0], steps[0])]


def _binary(op: str, a: _Vals, b: _Vals, integer: bool) -> _Vals | None:
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    out: _Vals = []
    for i in range(n):
        u, v = a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0]
        if u is None or v is None:
            out.append(None)
        elif op == "Add":
            out.append(u.add(v))
        elif op == "Sub":
            w = v.mul(_Val.of(-1))
            out.append(None if w is None else u.add(w))
        elif op == "Mul":
            out.append(u.mul(v))
        else:
            out.append(u.div(v, floor=integer))
    return out


def _reshape(state: _Spatial, target: _Vals, allowzero: bool) -> _Spatial:
    """Reshape of a spatial tensor: rows/columns may be split off as inner digits
    (SpaceToDepth) or merged with an inner digit (DepthToSpace); anything else is unknown."""
    sizes = [state.size(i) for i in range(state.rank)]
    tgt: list[_Val] = []
    for k, t in enumerate(target):
        if t is None:
            raise _Unsupported
        if t.is_const and t.coef == 0 and not allowzero:
            src = sizes[k] if k < len(sizes) else None
            if src is None:
                raise _Unsupported
            t = src
        tgt.append(t)
    minus = [k for k, t in enumerate(tgt) if t.is_const and t.coef == -1]
    if len(minus) > 1:
        raise _Unsupported
    if minus:
        total: _Val | None = _ONE
        for s in sizes:
            total = None if total is None or s is None else total.mul(s)
        for k, t in enumerate(tgt):
            if k != minus[0]:
                total = None if total is None else total.div(t, floor=False)
        if total is None or not total.is_size_factor:
            raise _Unsupported
        tgt[minus[0]] = total
    queue: deque[tuple[str, _Val]] = deque()
    for (kind, _), size in zip(state.dims, sizes, strict=True):
        if size is None:
            raise _Unsupported
        queue.append((kind, size))
    reach = {"y": state.y, "x": state.x}
    out: list[_Dim] = []
    for t in tgt:
        group: list[tuple[str, _Val]] = []
        need = t
        while not need.same(_ONE):
            if not queue:
                raise _Unsupported
            kind, size = queue.popleft()
            if size.same(_ONE):
                continue
            q = size.div(need, floor=False)
            if q is None:
                raise _Unsupported
            if q.same(_ONE):
                group.append((kind, size))
                break
            if q.is_size_factor:  # split the atom: ``need`` outer, ``q`` inner
                if kind != "c":
                    if not (q.is_const and q.coef.denominator == 1):
                        raise _Unsupported  # split into blocks of the image, not digits
                    reach[kind] = reach[kind].space_to_depth(int(q.coef))
                group.append((kind, need))
                queue.appendleft(("c", q))
                break
            rest = need.div(size, floor=False)
            if rest is None or not rest.is_size_factor:
                raise _Unsupported
            group.append((kind, size))
            need = rest
        out.append(_merge(group, reach))
    if any(not size.same(_ONE) for _, size in queue):
        raise _Unsupported
    if sorted(k for k, _ in out if k != "c") != ["x", "y"]:
        raise _Unsupported
    return _Spatial(tuple(out), reach["y"], reach["x"])


def _merge(group: list[tuple[str, _Val]], reach: dict[str, _Reach]) -> _Dim:
    """One output axis of a Reshape from the input atoms it groups (outer to inner)."""
    kinds = [k for k, _ in group]
    spatial = [k for k in kinds if k != "c"]
    if not spatial:
        size: _Val | None = _ONE
        for _, s in group:
            size = None if size is None else size.mul(s)
        return ("c", size)
    if len(spatial) > 1 or kinds[0] == "c":
        raise _Unsupported  # rows and columns merged, or images stacked
    kind = spatial[0]
    digits: _Val | None = _ONE
    for _, s in group[1:]:
        digits = None if digits is None else digits.mul(s)
    if digits is None or not (digits.is_const and digits.coef.denominator == 1):
        raise _Unsupported
    if digits.coef > 1:
        reach[kind] = reach[kind].depth_to_space(int(digits.coef))
    return (kind, None)


def _resample(
    r: _Reach, f: Fraction, mode: str, coord: str, nearest: str, antialias: bool
) -> _Reach:
    """Reach of a Resize output (module docstring): offsets ``j − i/f`` over all phases."""
    if coord in ("half_pixel", "pytorch_half_pixel", "half_pixel_symmetric"):
        shift = Fraction(1, 2) / f - Fraction(1, 2)
    elif coord == "tf_half_pixel_for_nn":
        shift = Fraction(1, 2) / f
    else:  # asymmetric; align_corners approximately
        shift = _F0
    support = {"nearest": 0, "linear": 1, "bilinear": 1, "cubic": 2}.get(mode)
    if support is None:
        raise _Unsupported
    if antialias and f < 1 and support:
        support_f = Fraction(support) / f
    else:
        support_f = Fraction(support)
    phases = f.numerator
    if phases > _MAX_PHASES:
        offs = [shift - support_f - 1, shift + support_f + 1]
    else:
        offs = []
        for i in range(phases):
            base = Fraction(i) / f
            x = base + shift
            offs.extend(j - base for j in _reads(x, support_f, mode, nearest))
    a = r.stride
    # floor(n·f) output elements
    return _Reach(a / f, r.lo + a * min(offs), r.hi + a * max(offs), r.ext - a / f)


def _reads(x: Fraction, support: Fraction, mode: str, nearest: str) -> list[int]:
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


def _radius(r: _Reach) -> int:
    """LR pixels an output pixel needs beyond its own LR pixel (module docstring)."""
    top = 1 - Fraction(1, r.stride.denominator) if r.stride < 1 else _F0
    left = math.floor(-r.lo)
    right = math.floor(top + r.hi)
    return max(0, left, right)


def receptive_field(model: onnx.ModelProto) -> ReceptiveField:
    """Receptive field and alignment of an SR network, read from its ONNX graph.

    Works on the graph forms esr-deploy produces (fp32 from torch.onnx + onnxsim, float16 with
    Casts, int8 with QuantizeLinear/DequantizeLinear) and on ONNX Runtime's optimised graphs;
    the first graph input must be the N×C×H×W LR image and the first output the HR image. The
    rules and their math are in the module docstring.
    """
    return _Analysis(model).run()


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------


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
    whole image's geometry: :mod:`esr_deploy.resize_geometry`). The output is
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
