"""fp16 / bf16 on a ``torch.export`` graph: the fp16 ONNX pass's rules, applied to ATen ops.

AOTInductor compiles the PyTorch graph, not the ONNX, so the float16 ONNX of
:mod:`esr_deploy.precision.fp16` cannot be handed to it. This module makes the same
decisions on the graph of ``torch.export.export(model).module()`` (an ``fx.GraphModule`` of
ATen ops, weights as ``get_attr`` nodes):

1. **Ranges** (:func:`measure_ranges`): the graph is run by a ``torch.fx.Interpreter`` in
   float32 on the calibration images; for every node (input, weights, every op output) the
   largest ``|x|`` over all images and its dtype are recorded. NaN sticks.
2. **Which nodes** (:func:`plan_precision`). A node computes in the low precision ``dtype``
   when it is an ATen op whose output is float32 *image data* (it depends on the graph
   input), unless

   - its op is unsafe in reduced precision whatever the data: :data:`UNSAFE_ATEN` maps each
     such ATen op to the ONNX op of :data:`esr_deploy.precision.fp16.UNSAFE_OPS`, whose reason
     is reported (``div`` by a Python number ``d`` with ``2**-14 <= |d| <= 65504`` is exempt,
     as in the ONNX pass: it is a multiplication by ``1/d``);
   - one of its float32 inputs or its output reaches ``absmax > max(dtype) · margin``
     (image data; ``margin`` = :data:`~esr_deploy.precision.fp16.RANGE_MARGIN`, 4× headroom),
     or a constant input (a weight) holds ``|x| > max(dtype)``; NaN counts as out of range.

   For float16 ``max`` is 65504; for bfloat16 (float32's exponent) the ranges never decide,
   the unsafe ops still stay float32.
3. **Casts** (:func:`apply_precision`): each float32 input of a low-precision node is read
   through ``aten._to_copy(dtype=...)``, each low-precision input of a float32 node through
   a cast back; one cast per tensor and direction, shared by its consumers, inserted before
   the first of them. The graph output is cast to float32, so the model keeps float32 in
   and out. Casts of weights are constants that AOTInductor's freezing folds away.

:func:`low_precision_range` is the check after the conversion: the largest ``|x|`` that a
low-precision node reaches on other images (the validation set), measured in float32.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from esr_deploy.precision.fp16 import RANGE_MARGIN, UNSAFE_OPS, KeptFloat32

#: ATen op (overload packet name) → the ONNX op whose entry of ``UNSAFE_OPS`` applies to it
UNSAFE_ATEN: Mapping[str, str] = {
    "mean": "ReduceMean",
    "sum": "ReduceSum",
    "prod": "ReduceProd",
    "logsumexp": "ReduceLogSumExp",
    "norm": "ReduceL2",
    "linalg_vector_norm": "ReduceL2",
    "var": "ReduceSumSquare",
    "std": "ReduceSumSquare",
    "var_mean": "ReduceSumSquare",
    "std_mean": "ReduceSumSquare",
    "adaptive_avg_pool2d": "GlobalAveragePool",
    "_adaptive_avg_pool2d": "GlobalAveragePool",
    "pow": "Pow",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "rsqrt": "Sqrt",
    "reciprocal": "Reciprocal",
    "div": "Div",
    "softmax": "Softmax",
    "_softmax": "Softmax",
    "log_softmax": "LogSoftmax",
    "_log_softmax": "LogSoftmax",
    "layer_norm": "LayerNormalization",
    "native_layer_norm": "LayerNormalization",
    "group_norm": "GroupNormalization",
    "native_group_norm": "GroupNormalization",
    "instance_norm": "InstanceNormalization",
}
_FP16_MIN_NORMAL = 2.0**-14
_FP16_MAX = 65504.0
_CAST = torch.ops.aten._to_copy.default


@dataclass(frozen=True)
class Ranges:
    """``absmax`` and ``dtype`` of every node output of a graph, by node name."""

    absmax: Mapping[str, float]
    dtype: Mapping[str, torch.dtype]

    def is_float32(self, name: str) -> bool:
        return self.dtype.get(name) == torch.float32


@dataclass(frozen=True)
class PrecisionPlan:
    """Which nodes compute in ``dtype`` and which stay float32 (with why)."""

    dtype: torch.dtype
    low: frozenset[str]
    kept_float32: tuple[KeptFloat32, ...]
    margin: float
    float32_tensors: frozenset[str]

    def to_dict(self, casts: int) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "low_precision_nodes": len(self.low),
            "float32_nodes": len(self.kept_float32),
            "casts_inserted": casts,
            "range_margin": self.margin,
            "kept_float32": [k.to_dict() for k in self.kept_float32],
        }


class _RangeRecorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, absmax: dict[str, float]) -> None:
        super().__init__(module)
        self.absmax = absmax
        self.dtype: dict[str, torch.dtype] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        tensors = [t for t in _tensors(out) if t.is_floating_point()]
        if tensors:
            self.dtype[n.name] = tensors[0].dtype
            value = max(_absmax(t) for t in tensors)
            prev = self.absmax.get(n.name, 0.0)
            if not math.isnan(prev) and not value <= prev:  # NaN sticks
                self.absmax[n.name] = value
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _absmax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max().double()) if t.numel() else 0.0


def measure_ranges(module: fx.GraphModule, inputs: Iterable[torch.Tensor]) -> Ranges:
    """Largest ``|x|`` of every node output over ``inputs`` (float32, no gradients)."""
    absmax: dict[str, float] = {}
    dtypes: dict[str, torch.dtype] = {}
    with torch.inference_mode():
        for x in inputs:
            recorder = _RangeRecorder(module, absmax)
            recorder.run(x)
            dtypes.update(recorder.dtype)
    return Ranges(absmax, dtypes)


def _op_name(node: fx.Node) -> str | None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    return None


def _unsafe_reason(node: fx.Node, op: str) -> str | None:
    onnx_op = UNSAFE_ATEN.get(op)
    if onnx_op is None:
        return None
    if op == "div" and len(node.args) > 1 and isinstance(node.args[1], (int, float)):
        d = abs(float(node.args[1]))
        if _FP16_MIN_NORMAL <= d <= _FP16_MAX and "rounding_mode" not in node.kwargs:
            return None
    return f"{UNSAFE_OPS[onnx_op]} (as ONNX {onnx_op})"


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _range_reason(
    node: fx.Node, ranges: Ranges, data: set[fx.Node], dtype_max: float, limit: float
) -> str | None:
    offenders = []
    for inp in node.all_input_nodes:
        if not ranges.is_float32(inp.name):
            continue
        value = ranges.absmax.get(inp.name, 0.0)
        if inp in data and not value <= limit:
            offenders.append(f"input '{inp.name}' reaches |x| = {_fmt(value)}")
        elif inp not in data and not value <= dtype_max:
            offenders.append(f"constant '{inp.name}' holds |x| = {_fmt(value)}")
    value = ranges.absmax.get(node.name, 0.0)
    if not value <= limit:
        offenders.append(f"output '{node.name}' reaches |x| = {_fmt(value)}")
    if not offenders:
        return None
    return (
        "; ".join(offenders)
        + f" on the calibration images (max {dtype_max:.6g}, limit {limit:.6g} with margin)"
    )


def plan_precision(
    module: fx.GraphModule, ranges: Ranges, dtype: torch.dtype, margin: float = RANGE_MARGIN
) -> PrecisionPlan:
    """Which nodes of ``module`` compute in ``dtype`` (rules: module docstring)."""
    dtype_max = float(torch.finfo(dtype).max)
    limit = dtype_max * margin
    data: set[fx.Node] = set()
    low: set[str] = set()
    kept: list[KeptFloat32] = []
    for node in module.graph.nodes:
        if node.op == "placeholder":
            data.add(node)
            continue
        if node.op != "call_function" or not any(i in data for i in node.all_input_nodes):
            continue
        data.add(node)
        op = _op_name(node)
        if op is None or not ranges.is_float32(node.name):
            continue
        reason = _unsafe_reason(node, op) or _range_reason(node, ranges, data, dtype_max, limit)
        if reason:
            kept.append(KeptFloat32(node.name, f"aten.{op}", reason))
        else:
            low.add(node.name)
    floats = frozenset(n for n in ranges.dtype if ranges.is_float32(n))
    return PrecisionPlan(dtype, frozenset(low), tuple(kept), margin, floats)


def apply_precision(module: fx.GraphModule, plan: PrecisionPlan) -> tuple[fx.GraphModule, int]:
    """A copy of ``module`` with ``plan`` applied (casts as in the module docstring) and the
    number of casts inserted."""
    gm = copy.deepcopy(module)
    graph = gm.graph
    produced: dict[fx.Node, torch.dtype] = {}  # float outputs in their rewritten dtype
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def read(node: fx.Node, src: fx.Node, want: torch.dtype) -> None:
        if produced.get(src, torch.float32) == want:
            return
        key = (src, want)
        if key not in casts:
            with graph.inserting_before(node):
                casts[key] = graph.call_function(_CAST, (src,), {"dtype": want})
        node.replace_input_with(src, casts[key])

    for node in list(graph.nodes):
        inputs = [i for i in node.all_input_nodes if i.name in plan.float32_tensors]
        if node.op == "output":
            for src in inputs:
                read(node, src, torch.float32)
        elif node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src in produced:
                produced[node] = produced[src]
        elif node.op == "call_function":
            want = plan.dtype if node.name in plan.low else torch.float32
            for src in inputs:
                read(node, src, want)
            if node.name in plan.float32_tensors:
                produced[node] = want
        elif node.name in plan.float32_tensors:
            produced[node] = torch.float32
    graph.lint()
    gm.recompile()
    return gm, len(casts)


def low_precision_range(
    module: fx.GraphModule, plan: PrecisionPlan, inputs: Sequence[torch.Tensor]
) -> tuple[float, str]:
    """Largest ``|x|`` (float32) that a node planned for low precision reaches on
    ``inputs``, and that node's name (``0.0, ""`` without such nodes)."""
    ranges = measure_ranges(module, inputs)
    worst, where = 0.0, ""
    for name in sorted(plan.low):
        value = ranges.absmax.get(name, 0.0)
        if not value <= worst:
            worst, where = value, name
    return worst, where
