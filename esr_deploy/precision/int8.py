"""``int8``: explicit QuantizeLinear/DequantizeLinear on an fp32 ONNX graph.

Quantisation is *simulated* in the graph (Q/DQ pairs), so one ONNX serves every runtime:
TensorRT builds a strongly typed network from it and fuses the pairs into int8 kernels,
ONNX Runtime CPU fuses ``DQ → Conv → Q`` into ``QLinearConv`` and the like, and any runtime
can check it in float.

**Activations**, per tensor, symmetric (zero point 0, as TensorRT requires)::

    s = amax / 127,   q = clip(round(x / s), -128, 127),   x̂ = s · q

``amax`` comes from calibration (:mod:`esr_deploy.precision.calibration`: min-max,
percentile or entropy). **Weights** of Conv/ConvTranspose, per output channel ``c``, narrow
symmetric range ``±M``::

    s_c = max |W_c| / M,   W_q = clip(round(W / s_c), -M, M)   (stored as int8 + DQ)

``M = 127`` (full range) unless the engine's CPU kernels saturate 16-bit pair sums, where the
backend asks for ``M = 63`` (:mod:`esr_deploy.precision.int8_kernels`).

Biases stay float32 (TensorRT quantises them itself).

**Placement.** A node is *quantised* when its type has int8 kernels
(:data:`WEIGHTED_OPS`, :data:`ELEMENTWISE_OPS`, :data:`SCALE_PRESERVING_OPS`), all its float
inputs are activations, and it is not excluded. An activation tensor gets one Q/DQ pair,
when at least one consumer is quantised; each quantised consumer reads its own
DequantizeLinear, and nodes kept in float read the float tensor. Keeping a node in float
therefore keeps its own computation (weights, inputs) in float; its output is still
quantised for consumers that run in int8, so they keep their int8 kernels. Scale-preserving
ops fed by a float node stay float too (otherwise the pixel shuffle after a conv kept in
float would quantise that conv's output anyway).
The outputs of :data:`SCALE_PRESERVING_OPS` (max-pool, resize, pixel shuffle, reshapes)
reuse their input's scale, so runtimes can run them on int8 data directly. Graph outputs
stay float32.

Preconditions: opset ≥ 13 (per-axis DequantizeLinear), float32 graph, unique tensor names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from esr_deploy.errors import ExportError

log = logging.getLogger(__name__)

INT8_MAX = 127
#: op type → (index of the weight input, output-channel axis of that weight)
WEIGHTED_OPS: Mapping[str, tuple[int, int]] = {"Conv": (1, 0), "ConvTranspose": (1, 1)}
#: ops with int8 kernels whose output gets its own calibrated scale
ELEMENTWISE_OPS = frozenset(
    {"Add", "Mul", "LeakyRelu", "Sigmoid", "Concat", "AveragePool", "GlobalAveragePool"}
)
#: ops that move or select values: their output reuses the input's scale
SCALE_PRESERVING_OPS = frozenset(
    {
        "MaxPool",
        "Resize",
        "DepthToSpace",
        "SpaceToDepth",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Split",
        "Slice",
    }
)
QUANTIZABLE_OPS = frozenset(WEIGHTED_OPS) | ELEMENTWISE_OPS | SCALE_PRESERVING_OPS


@dataclass(frozen=True)
class Int8Result:
    model: onnx.ModelProto
    quantized_nodes: tuple[str, ...]
    excluded: tuple[str, ...]
    quantized_tensors: int
    int8_weights: int
    scales: Mapping[str, float] = field(default_factory=dict)
    weight_max: int = INT8_MAX

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_nodes": len(self.quantized_nodes),
            "quantized_tensors": self.quantized_tensors,
            "int8_weights": self.int8_weights,
            "weight_range": [-self.weight_max, self.weight_max],
            "kept_float": list(self.excluded),
        }


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (``<op>_<index>`` for unnamed/duplicates)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return out


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph input(s) and every node output whose inferred type is float32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    names += [o for n in model.graph.node for o in n.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) == onnx.TensorProto.FLOAT]


def quantizable_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes the pass would quantise with nothing excluded (see the module docstring)."""
    initializers = {i.name for i in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    floats = set(float_tensors(model))
    out = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        data = _data_inputs(node)
        if any(i not in floats and i not in initializers and i not in constants for i in data):
            continue  # shape arithmetic (a Concat of Shape outputs, say): not activations
        if node.op_type in WEIGHTED_OPS:
            if len(node.input) < 2 or node.input[1] not in initializers:
                continue  # weights computed at run time: left float
        elif any(i in initializers or i in constants for i in data):
            continue  # a constant operand (mean shift, scale): left float
        out.append(node)
    return out


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs that carry activations: the first for weighted and scale-preserving ops (the
    others are weights, shapes, scales or pads), all for the element-wise ops."""
    if node.op_type in WEIGHTED_OPS or node.op_type in SCALE_PRESERVING_OPS:
        return [node.input[0]]
    return [i for i in node.input if i]


def weight_conv_names(model: onnx.ModelProto) -> list[str]:
    """Names of the quantisable weighted nodes, in graph order."""
    return [n.name for n in quantizable_nodes(model) if n.op_type in WEIGHTED_OPS]


def sensitivity_candidates(model: onnx.ModelProto) -> list[str]:
    """Nodes whose quantisation adds error of its own, in graph order: weighted layers and
    element-wise ops (scale-preserving ops only move values already on an int8 grid)."""
    return [n.name for n in quantizable_nodes(model) if n.op_type not in SCALE_PRESERVING_OPS]


def _quantize_weight(
    w: np.ndarray, axis: int, weight_max: int = INT8_MAX
) -> tuple[np.ndarray, np.ndarray]:
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    amax = np.abs(moved).max(axis=1)
    scale = np.where(amax > 0, amax / weight_max, 1.0)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -weight_max, weight_max).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_int8(
    model: onnx.ModelProto,
    amax: Callable[[str], float],
    exclude: Collection[str] = (),
    weight_max: int = INT8_MAX,
    check: bool = True,
) -> Int8Result:
    """Insert Q/DQ into ``model`` (nodes named, see :func:`name_nodes`).

    ``amax(tensor)`` is the calibrated clipping threshold of an activation tensor of the
    fp32 graph; ``exclude`` names nodes kept in float (the sensitivity search's choice);
    ``weight_max`` is ``M`` of the weights' range ``±M`` (127, or 63 for saturating CPUs).
    ``check``: infer shapes and run the ONNX checker on the result (off only for throwaway
    probes, see :class:`Quantizer`).
    """
    return Quantizer(model, amax, weight_max)(exclude, check)


class Quantizer:
    """:func:`quantize_int8` of one model with many ``exclude`` sets (the sensitivity search
    builds one per candidate): what does not depend on ``exclude`` — which nodes are
    quantisable, each conv's int8 weights — is computed once; every call returns exactly
    what :func:`quantize_int8` returns."""

    def __init__(
        self, model: onnx.ModelProto, amax: Callable[[str], float], weight_max: int = INT8_MAX
    ) -> None:
        if not 1 <= weight_max <= INT8_MAX:
            raise ValueError(f"weight_max must be in [1, {INT8_MAX}], got {weight_max}")
        self.model = model
        self.amax = amax
        self.weight_max = weight_max
        self._quantizable: frozenset[str] | None = None
        self._weights: dict[tuple[str, str], list[onnx.TensorProto]] = {}

    def _int8_weight(
        self, node: onnx.NodeProto, init: onnx.TensorProto, qname: str, axis: int
    ) -> list[onnx.TensorProto]:
        """The int8 weight of ``node``, its per-channel scales and zero points."""
        key = (node.name, init.name)
        if key not in self._weights:
            q, sc = _quantize_weight(numpy_helper.to_array(init), axis, self.weight_max)
            self._weights[key] = [
                numpy_helper.from_array(q, qname),
                numpy_helper.from_array(sc, f"{qname}_scale"),
                numpy_helper.from_array(np.zeros(sc.shape, dtype=np.int8), f"{qname}_zero_point"),
            ]
        return self._weights[key]

    def _nodes_in_float(
        self,
        graph: onnx.GraphProto,
        exclude: Collection[str],
        producer: Mapping[str, onnx.NodeProto],
    ) -> set[str]:
        """The excluded nodes, and scale-preserving ops fed by a float node (they would
        otherwise quantise an excluded layer's output, e.g. the last conv's via the pixel
        shuffle)."""
        in_float = set(exclude)
        for node in graph.node:
            src = producer.get(node.input[0]) if node.input else None
            if node.op_type in SCALE_PRESERVING_OPS and src is not None and src.name in in_float:
                in_float.add(node.name)
        return in_float

    def _activation_qdq(
        self,
        graph: onnx.GraphProto,
        active: Collection[str],
        in_float: Collection[str],
        producer: Mapping[str, onnx.NodeProto],
    ) -> tuple[dict[str, float], dict[str, list[onnx.NodeProto]], list[onnx.TensorProto]]:
        """Scales of the activation tensors that get a Q/DQ pair, their Q and DQ nodes (the
        consumers in ``graph`` rewired to read the DQs) and the scale initializers."""
        outputs = {o.name for o in graph.output}
        graph_inputs = {i.name for i in graph.input}
        # which activation tensors get a Q/DQ pair
        quantized: list[str] = []
        for node in graph.node:
            if node.name not in active:
                continue
            for t in _data_inputs(node):
                src = producer.get(t)
                if t in outputs or (src is None and t not in graph_inputs):
                    continue
                quantized.append(t)
        quantized = list(dict.fromkeys(quantized))

        # scales: calibrated, or inherited through scale-preserving ops (in topological order)
        scales: dict[str, float] = {}

        def scale_of(t: str) -> float:
            if t not in scales:
                src = producer.get(t)
                if src is not None and src.op_type in SCALE_PRESERVING_OPS and src.name in active:
                    scales[t] = scale_of(src.input[0])
                else:
                    a = float(self.amax(t))
                    scales[t] = a / INT8_MAX if a > 0 else 1.0
            return scales[t]

        pairs: dict[str, list[onnx.NodeProto]] = {}  # tensor -> its Q and DQ nodes
        zero = "int8_zero_point"
        inits = [numpy_helper.from_array(np.array(0, dtype=np.int8), zero)]
        for t in quantized:
            inits.append(
                numpy_helper.from_array(np.array(scale_of(t), dtype=np.float32), f"{t}_scale")
            )
            pairs[t] = [
                helper.make_node(
                    "QuantizeLinear",
                    [t, f"{t}_scale", zero],
                    [f"{t}_q"],
                    name=f"{t}_QuantizeLinear",
                )
            ]

        # one QuantizeLinear per tensor, one DequantizeLinear per consumer (a runtime fuses a DQ
        # into the node it alone serves); excluded nodes keep reading the float tensor
        for node in graph.node:
            if node.name in in_float:
                continue
            for k, t in enumerate(node.input):
                if t not in pairs:
                    continue
                dq = f"{t}_dq{len(pairs[t]) - 1}"
                pairs[t].append(
                    helper.make_node(
                        "DequantizeLinear", [f"{t}_q", f"{t}_scale", zero], [dq], name=f"{dq}_node"
                    )
                )
                node.input[k] = dq
        return {t: scales[t] for t in quantized}, pairs, inits

    def _weight_qdq(
        self, graph: onnx.GraphProto, active: Collection[str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Per-channel DequantizeLinear nodes of the int8 weights of the active weighted
        nodes (rewired to read them) and the int8 initializers."""
        init_by_name = {i.name: i for i in graph.initializer}
        weight_dq: list[onnx.NodeProto] = []
        inits: list[onnx.TensorProto] = []
        for node in graph.node:
            if node.name in active and node.op_type in WEIGHTED_OPS:
                index, axis = WEIGHTED_OPS[node.op_type]
                qname = f"{node.name}_weight_int8"
                inits += self._int8_weight(node, init_by_name[node.input[index]], qname, axis)
                weight_dq.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [qname, f"{qname}_scale", f"{qname}_zero_point"],
                        [f"{qname}_dq"],
                        name=f"{qname}_DequantizeLinear",
                        axis=axis,
                    )
                )
                node.input[index] = f"{qname}_dq"
        return weight_dq, inits

    def __call__(self, exclude: Collection[str] = (), check: bool = True) -> Int8Result:
        """The Q/DQ model with ``exclude`` kept in float (see :func:`quantize_int8`)."""
        model = self.model
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 13:
            raise ExportError(
                f"The int8 pass needs opset 13 or later (per-channel DequantizeLinear); the graph "
                f"has opset {opset} — re-export with a newer opset."
            )
        out = onnx.ModelProto()
        out.CopyFrom(model)
        graph = out.graph
        unknown = sorted(set(exclude) - {n.name for n in graph.node})
        if unknown:
            raise ExportError(
                f"Nodes to keep in float not found in the graph: {', '.join(unknown[:5])} — "
                "use the node names that `esr-deploy inspect` lists."
            )
        producer = {o: n for n in graph.node for o in n.output}
        in_float = self._nodes_in_float(graph, exclude, producer)
        if self._quantizable is None:
            self._quantizable = frozenset(n.name for n in quantizable_nodes(model))
        active = self._quantizable - in_float
        scales, pairs, inits = self._activation_qdq(graph, active, in_float, producer)
        weight_dq, weight_inits = self._weight_qdq(graph, active)
        inits += weight_inits
        graph_inputs = {i.name for i in graph.input}

        # topological order: each Q/DQ pair right after its tensor's producer
        ordered: list[onnx.NodeProto] = list(weight_dq)
        for t in graph_inputs:
            ordered += pairs.get(t, [])
        for node in graph.node:
            ordered.append(node)
            for o in node.output:
                ordered += pairs.get(o, [])
        del graph.node[:]
        graph.node.extend(ordered)
        used = {i for n in graph.node for i in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept + inits)
        del graph.value_info[:]
        if check:
            out = onnx.shape_inference.infer_shapes(out)
            onnx.checker.check_model(out, full_check=True)
        log.info(
            "int8: %d nodes quantised, %d tensors with Q/DQ, %d int8 weights, %d nodes in float",
            len(active),
            len(scales),
            len(weight_dq),
            len(exclude),
        )
        return Int8Result(
            model=out,
            quantized_nodes=tuple(sorted(active)),
            excluded=tuple(exclude),
            quantized_tensors=len(scales),
            int8_weights=len(weight_dq),
            scales=scales,
            weight_max=self.weight_max,
        )
