"""``fp16``: a float32 ONNX graph rewritten as a *strongly typed* float16 graph.

TensorRT 10 strongly typed networks (and TensorRT 11, which dropped the FP16 builder flag)
take every tensor's precision from the ONNX itself, so this pass writes it there: weights and
activations in float16, graph IO in float32, and the ops that would overflow or lose
precision kept in float32 with Casts at the boundaries.

Input: an opset-18 model from ``torch.onnx.export`` + onnxsim (float32 input ``lr`` N×3×H×W,
float32 output ``sr``) and ``absmax``: for tensor names of that model (graph input and node
outputs), the largest ``|x|`` measured on calibration images (ONNX Runtime, by the caller).
Names missing from ``absmax`` count as unknown, that is in range.

Rules of :func:`convert_fp16`:

1. **Which tensors.** ``onnx.shape_inference`` gives every tensor's element type; only
   float32 tensors are touched. A float32 tensor is *image data* when it depends on a float32
   graph input through float32 tensors; shape arithmetic (``Shape``, ``Gather`` on shapes, an
   ``int64`` ``Concat``, a ``Cast`` of a shape to float) is not image data and is left as it
   is: float16 integers are exact only up to 2048.
2. **Which nodes.** A node with an image-data float32 output 0 computes in float16 unless

   - its op is in :data:`UNSAFE_OPS` (whatever the ranges; ``Div`` by a constant divisor
     ``d`` with ``2**-14 <= |d| <= 65504`` is exempt: it is a ``Mul`` by ``1/d``), or holds a
     subgraph, or its schema has no float16 form;
   - one of its converted inputs or float16 outputs has ``absmax > FP16_MAX * margin``
     (default margin :data:`RANGE_MARGIN` = 0.25: less than 4× headroom above the
     calibration images is "near the float16 range"); NaN counts as out of range;
   - a constant (initializer or ``Constant``) it would read in float16 holds
     ``|x| > FP16_MAX``: it would silently become ``inf``.

   Such nodes stay float32 and are listed with their reason in
   :attr:`Fp16Result.kept_float32`. Unnamed nodes are first named ``f"{op_type}_{index}"``
   (made unique), so names are deterministic.
3. **Which inputs.** From ``onnx.defs.get_schema(op_type, opset, domain)``: input ``i`` of a
   float16 node is read in float16 iff its formal type string equals that of output 0 (Conv
   ``X, W, B`` and ``Y`` are all ``T``; Resize's ``roi`` is ``T2`` and ``scales``
   ``tensor(float)`` while ``X, Y`` are ``T1``, so ``roi`` and ``scales`` stay float32; Pow's
   exponent ``T1`` stays float32); variadic inputs (Concat, Sum) follow the same rule. Outputs
   likewise: output ``j`` is float16 iff its formal type is output 0's. ``Cast(to=FLOAT)`` in
   float16 becomes ``Cast(to=FLOAT16)`` and reads its float input in float16.
4. **Constants.** An initializer read in float16 becomes a float16 copy (numpy rounding to
   nearest even); when float32 consumers (or the graph outputs) also read it, the float16
   copy is a new initializer ``name + "_fp16"`` and the original stays. ``Constant`` nodes
   likewise (the value is rewritten, or a ``_fp16`` initializer is added). A ``Cast(to=FLOAT)``
   outside the image data (of a shape, say) whose every consumer reads float16 becomes
   ``Cast(to=FLOAT16)``.
5. **Boundaries.** Where a float16 tensor is read as float32 or a float32 tensor as float16,
   one ``Cast`` per tensor and direction is inserted and shared by all its consumers
   (:attr:`Fp16Result.casts_inserted`). Graph IO keeps its float32 type and names: ``lr`` is
   cast to float16 after the input, and the float16 result is renamed ``sr__fp16`` and cast to
   float32 as ``sr``. ``Shape`` and ``Size`` read either form without a Cast.
6. **Result.** ``value_info`` is dropped and re-inferred; the IR and opset versions are the
   input's; ``onnx.checker.check_model(full_check=True)`` must pass.

:func:`~esr_deploy.precision.fp16_emulation.emulate_fp16` runs the result on CPUs without
float16 kernels (float32 ops, float16 storage); :mod:`~esr_deploy.precision.onnx_graph` holds
the naming, inference and checking both share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from esr_deploy.errors import ExportError
from esr_deploy.precision.onnx_graph import (
    DEFAULT_DOMAINS,
    UniqueNames,
    check,
    elem_types,
    infer,
    name_nodes,
    opset_version,
)

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
#: a tensor whose calibrated |x| max exceeds FP16_MAX * RANGE_MARGIN stays float32
RANGE_MARGIN = 0.25  # "comes near the float16 range": less than 4x headroom
#: smallest normal float16: a constant divisor at least this large keeps ``Div`` convertible
_FP16_MIN_NORMAL = 2.0**-14

_REDUCTION = "reduction: accumulates many values, float16 accumulation loses precision/overflows"
_NORMALIZATION = (
    "normalization: mean and variance over many values; float16 accumulation loses precision "
    "and the squared deviations overflow"
)
_SOFTMAX = "softmax: exponentials and a sum over an axis overflow or lose precision in float16"
#: op_type -> why it stays float32 whatever the measured ranges
UNSAFE_OPS: Mapping[str, str] = MappingProxyType(
    {
        "ReduceMean": _REDUCTION,
        "ReduceSum": _REDUCTION,
        "ReduceSumSquare": _REDUCTION,
        "ReduceL2": _REDUCTION,
        "ReduceLogSumExp": _REDUCTION,
        "ReduceProd": _REDUCTION,
        "GlobalAveragePool": _REDUCTION,
        "Pow": "can overflow float16 on inputs outside the calibration set (x**2 beyond |x| = 256)",
        "Exp": "can overflow float16 on inputs outside the calibration set (exp(x) beyond 11.1)",
        "InstanceNormalization": _NORMALIZATION,
        "LayerNormalization": _NORMALIZATION,
        "GroupNormalization": _NORMALIZATION,
        "Softmax": _SOFTMAX,
        "LogSoftmax": _SOFTMAX,
        "Log": "log near zero: float16 flushes |x| < 6e-8 to 0 and log(0) = -inf",
        "Sqrt": "square root of a variance: small variances lose their precision in float16",
        "Reciprocal": "1/x overflows float16 for |x| < 1.5e-5",
        "Div": "division by a computed divisor (std + eps, a count) overflows float16 near zero",
    }
)

_FLOAT = TensorProto.FLOAT
_FLOAT16 = TensorProto.FLOAT16
#: ops that read only the shape of their input: either precision will do, no Cast needed
_SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class KeptFloat32:
    """A node that computes image data but stays float32, and why."""

    node: str
    op_type: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}


@dataclass(frozen=True)
class Fp16Result:
    """The float16 model and what the conversion did (``to_dict`` goes to the manifest)."""

    model: onnx.ModelProto
    kept_float32: tuple[KeptFloat32, ...]
    fp16_nodes: int  # nodes that now compute in float16 (inserted Casts, Constants not counted)
    casts_inserted: int
    margin: float = RANGE_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp16_nodes": self.fp16_nodes,
            "float32_nodes": len(self.kept_float32),
            "casts_inserted": self.casts_inserted,
            "range_margin": self.margin,
            "kept_float32": [k.to_dict() for k in self.kept_float32],
        }


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The float32 value of a ``Constant`` node, or None when it is not a float32 constant."""
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type == _FLOAT:
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
    return None


def _absmax_of(values: np.ndarray) -> float:
    return float(np.max(np.abs(values.astype(np.float64)))) if values.size else 0.0


def _to_fp16(values: np.ndarray, name: str) -> onnx.TensorProto:
    rounded = values.astype(np.float16)
    flushed = int(np.count_nonzero((rounded == 0) & (values != 0)))
    if flushed:
        log.debug("fp16: %d nonzero values of %r flush to 0 in float16", flushed, name)
    return numpy_helper.from_array(rounded, name)


def _formal_types(schema: Any, node: onnx.NodeProto) -> tuple[list[str], list[str]]:
    """Formal type strings of the node's actual inputs and outputs (variadics expanded)."""

    def expand(params: Any, count: int) -> list[str]:
        strs = [p.type_str for p in params]
        if not strs:
            return [""] * count
        return [strs[min(i, len(strs) - 1)] for i in range(count)]

    return expand(schema.inputs, len(node.input)), expand(schema.outputs, len(node.output))


def _allows_fp16(schema: Any, type_str: str) -> bool:
    for constraint in schema.type_constraints:
        if constraint.type_param_str == type_str:
            return "tensor(float16)" in constraint.allowed_type_strs
    return type_str == "tensor(float16)"


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class _Fp16Node:
    """A node chosen for float16: which inputs it reads and which outputs it writes in fp16."""

    inputs: frozenset[int]
    outputs: frozenset[int]


@dataclass
class _Edits:
    """What a conversion adds and renames, collected before the node list is rebuilt."""

    names: UniqueNames
    name16: dict[str, str] = field(default_factory=dict)  # float tensor -> its float16 form
    name32: dict[str, str] = field(default_factory=dict)  # float16 tensor -> its float32 form
    casts_after: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)  # by producer
    casts_first: list[onnx.NodeProto] = field(default_factory=list)  # of graph inputs
    new_inits: list[onnx.TensorProto] = field(default_factory=list)
    retargeted: set[int] = field(default_factory=set)  # shape Casts now to FLOAT16
    renamed_outputs: dict[str, str] = field(default_factory=dict)
    casts: int = 0

    def cast(self, src: str, dst: str, to: int) -> onnx.NodeProto:
        """A boundary Cast (counted in ``casts``)."""
        self.casts += 1
        suffix = "to_fp16" if to == _FLOAT16 else "to_fp32"
        return helper.make_node(
            "Cast", [src], [dst], name=self.names.fresh(f"{src}__{suffix}"), to=to
        )


class _Converter:
    """One conversion (state shared by the steps of :func:`convert_fp16`)."""

    def __init__(self, model: onnx.ModelProto, absmax: Mapping[str, float], margin: float):
        self.model = model
        self.graph = model.graph
        self.absmax = absmax
        self.margin = margin
        self.limit = FP16_MAX * margin
        self.types = elem_types(infer(model, "fp16 conversion"))
        self.graph_inputs = {i.name for i in self.graph.input}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.initializers = {
            t.name: t for t in self.graph.initializer if t.name not in self.graph_inputs
        }
        self.constants: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, int] = {}
        for index, node in enumerate(self.graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = index
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self.constants[node.output[0]] = node
        self._constant_absmax: dict[str, float] = {}
        self._unknown_logged: set[str] = set()

    # -- decisions ---------------------------------------------------------------------------

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == _FLOAT

    def constant_array(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.constants:
            return _constant_value(self.constants[name])
        return None

    def constant_absmax(self, name: str) -> float | None:
        if name not in self._constant_absmax:
            values = self.constant_array(name)
            if values is None:
                return None
            self._constant_absmax[name] = _absmax_of(values)
        return self._constant_absmax[name]

    def measured(self, name: str) -> float | None:
        if name in self.absmax:
            return float(self.absmax[name])
        if name not in self._unknown_logged:
            self._unknown_logged.add(name)
            log.debug("fp16: no calibrated |x| max for %r; treated as in range", name)
        return None

    def constant_divisor(self, node: onnx.NodeProto) -> bool:
        if len(node.input) < 2:
            return False
        values = self.constant_array(node.input[1])
        if values is None or values.size == 0:
            return False
        mag = np.abs(values.astype(np.float64))
        return bool(np.all(np.isfinite(mag)) and mag.min() >= _FP16_MIN_NORMAL) and bool(
            mag.max() <= FP16_MAX
        )

    def decide(self, node: onnx.NodeProto) -> _Fp16Node | str:
        """The node's float16 form, or the reason it stays float32."""
        default = node.domain in DEFAULT_DOMAINS
        if default and node.op_type in UNSAFE_OPS:
            if not (node.op_type == "Div" and self.constant_divisor(node)):
                return UNSAFE_OPS[node.op_type]
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return "holds a subgraph: If/Loop/Scan bodies are not converted"
        domain = "" if default else node.domain
        version = opset_version(self.model, domain)
        try:
            schema = onnx.defs.get_schema(node.op_type, version or 1, domain)
        except onnx.defs.SchemaError:
            return f"no ONNX schema for {domain or 'ai.onnx'}::{node.op_type} at opset {version}"
        in_types, out_types = _formal_types(schema, node)
        if not _allows_fp16(schema, out_types[0]):
            return f"{node.op_type} has no float16 form in opset {version}"
        if node.op_type == "Cast" and default:
            inputs = frozenset(i for i, name in enumerate(node.input) if self.is_float(name))
        else:
            inputs = frozenset(
                i
                for i, name in enumerate(node.input)
                if self.is_float(name) and in_types[i] == out_types[0]
            )
        outputs = frozenset(
            j
            for j, name in enumerate(node.output)
            if self.is_float(name) and out_types[j] == out_types[0]
        )
        offenders: list[str] = []
        for i in sorted(inputs):
            name = node.input[i]
            kind = "initializer" if name in self.initializers else "Constant"
            held = self.constant_absmax(name)
            if held is not None:
                if not held <= FP16_MAX:
                    offenders.append(
                        f"{kind} '{name}' holds |x| = {_fmt(held)}, beyond the float16 max "
                        f"{FP16_MAX:.0f}"
                    )
                continue
            value = self.measured(name)
            if value is not None and not value <= self.limit:
                offenders.append(self.range_reason("input", name, value))
        for j in sorted(outputs):
            value = self.measured(node.output[j])
            if value is not None and not value <= self.limit:
                offenders.append(self.range_reason("output", node.output[j], value))
        if offenders:
            return "; ".join(offenders)
        return _Fp16Node(inputs=inputs, outputs=outputs)

    def range_reason(self, kind: str, name: str, value: float) -> str:
        return (
            f"{kind} '{name}' reaches |x| = {_fmt(value)} on the calibration images "
            f"(float16 max {FP16_MAX:.0f}, limit {self.limit:.6g} with margin {self.margin:g})"
        )

    # -- the rewrite -------------------------------------------------------------------------

    def run(self) -> Fp16Result:
        plan, kept, data = self.plan()
        graph = self.graph
        produced16 = {
            graph.node[index].output[j] for index, fp16 in plan.items() for j in fp16.outputs
        }
        need16, need32 = self.readers(plan)
        edits = _Edits(UniqueNames(graph))
        self.float16_outputs(edits, produced16, need32)
        self.float16_inputs(edits, need16 - produced16, need32, plan, data)
        new_nodes = self.rewire(edits, plan, produced16)
        graph.ClearField("node")
        graph.node.extend(new_nodes)
        graph.initializer.extend(edits.new_inits)
        checked = check(self.model, "fp16 conversion")
        fp16_nodes = len(plan) + len(edits.retargeted)
        log.info(
            "fp16: %d nodes in float16, %d kept float32, %d casts inserted",
            fp16_nodes,
            len(kept),
            edits.casts,
        )
        return Fp16Result(
            model=checked,
            kept_float32=tuple(kept),
            fp16_nodes=fp16_nodes,
            casts_inserted=edits.casts,
            margin=self.margin,
        )

    def plan(self) -> tuple[dict[int, _Fp16Node], list[KeptFloat32], set[str]]:
        """Rule 2: the float16 form of each image-data node (by index), the nodes kept
        float32 with their reasons, and the image-data tensors (rule 1)."""
        data = {name for name in self.graph_inputs if self.is_float(name)}
        data -= set(self.initializers)
        plan: dict[int, _Fp16Node] = {}
        kept: list[KeptFloat32] = []
        for index, node in enumerate(self.graph.node):
            if not node.output or not self.is_float(node.output[0]):
                continue
            if not any(name in data for name in node.input if name):
                continue
            data.update(name for name in node.output if self.is_float(name))
            decision = self.decide(node)
            if isinstance(decision, str):
                kept.append(KeptFloat32(node.name, node.op_type, decision))
                log.debug("fp16: %s (%s) stays float32: %s", node.name, node.op_type, decision)
            else:
                plan[index] = decision
        return plan, kept, data

    def readers(self, plan: Mapping[int, _Fp16Node]) -> tuple[set[str], set[str]]:
        """Rule 3: the float tensors read in float16, and those read in float32 (the graph
        outputs included; ``Shape``/``Size`` read either)."""
        need16: set[str] = set()
        need32: set[str] = set(self.graph_outputs)
        for index, node in enumerate(self.graph.node):
            for i, name in enumerate(node.input):
                if not self.is_float(name):
                    continue
                if index in plan and i in plan[index].inputs:
                    need16.add(name)
                elif node.op_type not in _SHAPE_READERS:
                    need32.add(name)
        return need16, need32

    def float16_outputs(self, edits: _Edits, produced16: set[str], need32: set[str]) -> None:
        """Rule 5 for tensors computed in float16: a Cast to float32 where float32 reads
        them; a graph output is renamed ``<name>__fp16`` and cast back into its own name."""
        names = edits.names
        for name in sorted(produced16):
            if name in self.graph_outputs:
                edits.name16[name] = names.fresh(f"{name}__fp16")
                edits.renamed_outputs[name] = edits.name16[name]
                edits.name32[name] = name
            else:
                edits.name16[name] = name
                if name in need32:
                    edits.name32[name] = names.fresh(f"{name}__fp32")
            if name in edits.name32:
                cast = edits.cast(edits.name16[name], edits.name32[name], _FLOAT)
                edits.casts_after.setdefault(name, []).append(cast)

    def float16_inputs(
        self,
        edits: _Edits,
        float32_read16: set[str],
        need32: set[str],
        plan: Mapping[int, _Fp16Node],
        data: set[str],
    ) -> None:
        """Rules 4 and 5 for float32 tensors read in float16: constants get a float16 copy
        (or become one), a shape ``Cast(to=FLOAT)`` read only in float16 is retargeted, any
        other tensor gets one Cast shared by its float16 readers."""
        graph = self.graph
        for name in sorted(float32_read16):
            only16 = name not in need32
            producer = self.producer.get(name)
            held = self.constant_array(name)
            if held is not None:
                if not only16:
                    edits.name16[name] = edits.names.fresh(f"{name}_fp16")
                    edits.new_inits.append(_to_fp16(held, edits.name16[name]))
                elif name in self.initializers:
                    self.initializers[name].CopyFrom(_to_fp16(held, name))
                    edits.name16[name] = name
                else:
                    constant = self.constants[name]
                    constant.ClearField("attribute")
                    constant.attribute.append(helper.make_attribute("value", _to_fp16(held, "")))
                    edits.name16[name] = name
            elif (
                only16
                and producer is not None
                and producer not in plan
                and name not in data
                and self.is_retargetable_cast(graph.node[producer])
            ):
                for attr in graph.node[producer].attribute:
                    if attr.name == "to":
                        attr.i = _FLOAT16
                edits.retargeted.add(producer)
                edits.name16[name] = name
            else:
                edits.name16[name] = edits.names.fresh(f"{name}__fp16")
                node_cast = edits.cast(name, edits.name16[name], _FLOAT16)
                if producer is None:
                    edits.casts_first.append(node_cast)
                else:
                    edits.casts_after.setdefault(name, []).append(node_cast)

    def rewire(
        self, edits: _Edits, plan: Mapping[int, _Fp16Node], produced16: set[str]
    ) -> list[onnx.NodeProto]:
        """The new node list: every input renamed to the form its reader takes, float16
        Casts retargeted, each boundary Cast right after its producer."""
        new_nodes = list(edits.casts_first)
        for index, node in enumerate(self.graph.node):
            fp16 = plan.get(index)
            for i, name in enumerate(node.input):
                if not self.is_float(name):
                    continue
                if fp16 is not None and i in fp16.inputs:
                    node.input[i] = edits.name16[name]
                elif node.op_type in _SHAPE_READERS:
                    node.input[i] = edits.name16[name] if name in produced16 else name
                elif name in produced16:
                    node.input[i] = edits.name32[name]
            outputs = list(node.output)
            for j, name in enumerate(outputs):
                if name in edits.renamed_outputs:
                    node.output[j] = edits.renamed_outputs[name]
            if fp16 is not None and node.op_type == "Cast" and node.domain in DEFAULT_DOMAINS:
                for attr in node.attribute:
                    if attr.name == "to":
                        attr.i = _FLOAT16
            new_nodes.append(node)
            for name in outputs:
                new_nodes.extend(edits.casts_after.get(name, []))
        return new_nodes

    @staticmethod
    def is_retargetable_cast(node: onnx.NodeProto) -> bool:
        return (
            node.op_type == "Cast"
            and node.domain in DEFAULT_DOMAINS
            and any(a.name == "to" and a.i == _FLOAT for a in node.attribute)
        )


def convert_fp16(
    model: onnx.ModelProto, absmax: Mapping[str, float], margin: float = RANGE_MARGIN
) -> Fp16Result:
    """Rewrite a float32 model as a strongly typed float16 one (rules: module docstring).

    ``absmax`` maps tensor names of ``model`` to their calibrated ``|x|`` max; ``model`` is
    not modified.
    """
    if not 0.0 < margin <= 1.0:
        raise ExportError(
            f"fp16 conversion failed — range margin {margin!r} is outside (0, 1] — pass a "
            f"fraction of the float16 max, e.g. {RANGE_MARGIN} (4x headroom)."
        )
    if opset_version(model, "") is None:
        raise ExportError(
            "fp16 conversion failed — the model imports no default ONNX opset — export it with "
            "torch.onnx.export(..., opset_version=18)."
        )
    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_nodes(work.graph)
    return _Converter(work, absmax, margin).run()
