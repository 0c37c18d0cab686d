"""The receptive-field analysis: one walk over the graph from the LR input to the HR output.

Every node with a spatial input is handed to its op's rule (:data:`.rules.RULES`, keyed by op
type); a node whose op has no rule, or whose rule cannot interpret its attributes or
parameters, goes to ``unknown_nodes`` and its outputs take the union of its inputs' reaches.
Nodes without spatial inputs are evaluated symbolically (:mod:`.symbolic`) so that shapes read
from the image can be followed. The result is the HR output's radius per axis
(:func:`esr_deploy.runtime.tiling.lattice.radius`) and the alignment: a window starting at LR pixel
``w`` starts at element ``w/a`` of a tensor of stride ``a = n/d`` (lowest terms); it samples
the same grid as the whole image only if that is an integer for every tensor, i.e. ``w`` is a
multiple of the least common multiple of the numerators ``n`` (RLFN: stride 2 then 3 in its
ESA, alignment 6).

The field is an upper bound: it is exact for chains of convolutions, pooling, pixel shuffles and
constant-scale resizes, and may exceed the need by a pixel where a strided op and a resize
interleave (offsets of different phases are merged). The analysis reads the graph forms
esr-deploy produces (fp32 from torch.onnx + onnxsim, float16 with Casts, int8 with
QuantizeLinear/DequantizeLinear) and ONNX Runtime's optimised graphs (NCHWc ops).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction

import numpy as np
import onnx
from onnx import helper, numpy_helper

from esr_deploy.errors import TilingError
from esr_deploy.runtime.tiling.field import ReceptiveField
from esr_deploy.runtime.tiling.lattice import Reach, Spatial, radius
from esr_deploy.runtime.tiling.ops import (
    INT_TYPES,
    MAX_CONST_VALUES,
    PARAM_INPUTS,
    SELECTIONS,
    Unsupported,
    attr,
    ints,
    node_name,
    subgraph_inputs,
)
from esr_deploy.runtime.tiling.rules import ANY_DOMAIN, KNOWN_DOMAINS, RULES
from esr_deploy.runtime.tiling.symbolic import (
    F0,
    F1,
    Val,
    Vals,
    binary,
    index,
    shape_range,
    slice_values,
)

log = logging.getLogger(__name__)


class Analysis:
    """One walk over a graph: static facts, the spatial state of every tensor, and the
    nodes that make tiling inexact. The op rules (:mod:`.rules`) read and update it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18
        )
        self.spatial: dict[str, Spatial] = {}
        self.values: dict[str, Vals] = {}
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
            if int(np.prod(init.dims)) <= MAX_CONST_VALUES:
                self.values[init.name] = self._from_array(numpy_helper.to_array(init))
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node

    @staticmethod
    def _from_array(arr: np.ndarray) -> Vals:
        if arr.dtype.kind not in "iufb":
            return [None] * arr.size
        flat = arr.reshape(-1)
        if arr.dtype.kind == "f":
            return [Val.of(float(v)) if np.isfinite(v) else None for v in flat]
        return [Val.of(int(v)) for v in flat]

    def weight_shape(self, name: str) -> tuple[int | None, ...] | None:
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

    def consts(self, name: str) -> Vals | None:
        if not name:
            return None
        return self.values.get(name)

    def const_ints(self, name: str) -> list[int] | None:
        vals = self.consts(name)
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
        batch = Val.of(shape[0]) if shape[0] else Val(F1, (1, 0, 0))
        channels = Val.of(shape[1]) if shape[1] else None
        origin = Reach(F1, F0, F0, F0)
        self.spatial[first] = Spatial(
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
        field_radius = (radius(state.y), radius(state.x))
        named = [*self.global_nodes, *self.size_dependent, *self.unknown]
        return ReceptiveField(
            radius=field_radius,
            alignment=(alignment[0], alignment[1]),
            global_nodes=tuple(dict.fromkeys(self.global_nodes)),
            size_dependent_nodes=tuple(dict.fromkeys(self.size_dependent)),
            unknown_nodes=tuple(dict.fromkeys(self.unknown)),
            op_types=tuple((n, self.op_types[n]) for n in dict.fromkeys(named)),
        )

    def mark(self, node: onnx.NodeProto, bucket: list[str]) -> None:
        name = node_name(node)
        bucket.append(name)
        self.op_types[name] = node.op_type

    def _visit(self, node: onnx.NodeProto) -> None:
        sp_in = [i for i in node.input if i in self.spatial]
        if not sp_in and any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            sp_in = [n for n in subgraph_inputs(node) if n in self.spatial]
        if not sp_in:
            self._visit_values(node)
            return
        op = node.op_type
        rule = RULES.get(op)
        try:
            if rule is None or (op not in ANY_DOMAIN and node.domain not in KNOWN_DOMAINS):
                raise Unsupported
            rule(self, node)
        except (Unsupported, ValueError, IndexError, KeyError, ZeroDivisionError) as exc:
            # an op, an attribute or a parameter this analysis cannot interpret
            log.debug("receptive field: %s (%s) not understood: %r", node.name, op, exc)
            self.mark(node, self.unknown)
            merged = self.union([self.spatial[i] for i in sp_in])
            for out in node.output:
                if out:
                    self.spatial[out] = merged

    # -- non-spatial values --------------------------------------------------------------

    def _visit_values(self, node: onnx.NodeProto) -> None:
        params = PARAM_INPUTS.get(node.op_type, ())
        data = [n for k, n in enumerate(node.input) if n and k not in params]
        if node.op_type == "Range" and any(n in self.size_tainted for n in node.input):
            # positions computed from the image size (coordinate grids): not shift-invariant
            self.mark(node, self.unknown)
        try:
            vals = self._evaluate(node)
        except (ValueError, IndexError, TypeError, ZeroDivisionError):
            vals = None
        if vals is not None and node.output:
            self.values[node.output[0]] = vals
        picks_static_dims = (
            node.op_type in SELECTIONS
            and vals is not None
            and all(v is not None and v.is_const for v in vals)
        )  # e.g. the channel count out of a Shape
        if any(n in self.size_tainted for n in data) and not picks_static_dims:
            self.size_tainted.update(o for o in node.output if o)

    def _evaluate(self, node: onnx.NodeProto) -> Vals | None:
        op = node.op_type
        ins = [self.consts(n) for n in node.input]
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and int(np.prod(a.t.dims)) <= MAX_CONST_VALUES:
                    return self._from_array(numpy_helper.to_array(a.t))
                if a.name in ("value_int", "value_float"):
                    return [Val.of(helper.get_attribute_value(a))]
                if a.name in ("value_ints", "value_floats"):
                    return [Val.of(v) for v in helper.get_attribute_value(a)]
            return None
        if op in ("Shape", "Size"):
            dims = self.static.get(node.input[0])
            if dims is None:
                return None
            if op == "Size":
                known = [d for d in dims if d is not None]
                return [Val.of(math.prod(known))] if len(known) == len(dims) else None
            start, end = shape_range(node, len(dims))
            return [None if d is None else Val.of(d) for d in dims[start:end]]
        if not ins or ins[0] is None:
            return None
        x = ins[0]
        if op == "Cast" and attr(node, "to") in INT_TYPES:
            return [
                v if v is None or not v.is_const else Val(Fraction(int(v.coef)), srcs=v.srcs)
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
            return [x[index(v, len(x))] for v in idx]
        if op == "Slice":
            return slice_values(x, ins, node, self.opset)
        if op in ("Add", "Sub", "Mul", "Div"):
            if len(ins) < 2 or ins[1] is None:
                return None
            return binary(op, x, ins[1], self.is_int(node.input[0]))
        if op == "Neg":
            return [None if v is None else v.mul(Val.of(-1)) for v in x]
        if op in ("Floor", "Ceil") and all(v is not None and v.is_const for v in x):
            fn = math.floor if op == "Floor" else math.ceil
            return [Val(Fraction(fn(v.coef)), srcs=v.srcs) for v in x if v is not None]
        return None

    def is_int(self, name: str) -> bool:
        return self.elem_type.get(name) in INT_TYPES

    # -- helpers -------------------------------------------------------------------------

    def union(self, states: Sequence[Spatial], node: onnx.NodeProto | None = None) -> Spatial:
        """Union of the fields of a node's spatial inputs; inputs sampled on different grids
        (strides) make the node unknown."""
        if node is not None and len({(s.y.stride, s.x.stride) for s in states}) > 1:
            raise Unsupported
        first = max(states, key=lambda s: s.rank)
        y, x = first.y, first.x
        for s in states:
            y, x = y.union(s.y), x.union(s.x)
        return replace(first, y=y, x=x)

    def assign(self, node: onnx.NodeProto, state: Spatial, outputs: int = 1) -> None:
        state = replace(state, y=state.y.settled(), x=state.x.settled())
        for out in list(node.output)[:outputs] if outputs else node.output:
            if out:
                self.spatial[out] = state

    def data(self, node: onnx.NodeProto, index: int = 0) -> Spatial:
        name = node.input[index] if len(node.input) > index else ""
        state = self.spatial.get(name)
        if state is None:
            raise Unsupported
        return state

    def canonical(self, node: onnx.NodeProto, index: int = 0) -> Spatial:
        state = self.data(node, index)
        if not state.canonical:
            raise Unsupported
        return state

    def axis(self, state: Spatial, axis: int) -> int:
        return axis + state.rank if axis < 0 else axis

    def axes_values(
        self, node: onnx.NodeProto, attr_name: str, input_index: int
    ) -> list[int] | None:
        axes = attr(node, attr_name)
        if axes is not None:
            return ints(axes)
        if len(node.input) > input_index and node.input[input_index]:
            got = self.const_ints(node.input[input_index])
            if got is None:
                raise Unsupported
            return got
        return None


def receptive_field(model: onnx.ModelProto) -> ReceptiveField:
    """Receptive field and alignment of an SR network, read from its ONNX graph.

    Works on the graph forms esr-deploy produces (fp32 from torch.onnx + onnxsim, float16 with
    Casts, int8 with QuantizeLinear/DequantizeLinear) and on ONNX Runtime's optimised graphs;
    the first graph input must be the N×C×H×W LR image and the first output the HR image. The
    rules and their math are in the module docstring.
    """
    return Analysis(model).run()
