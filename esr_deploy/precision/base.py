"""Precision passes on ONNX and the manager that enforces their contracts.

A precision pass rewrites an ONNX graph (float32 → strongly typed float16, float32 → explicit
Q/DQ int8). Like the graph passes on the PyTorch model (:mod:`esr_deploy.passes.base`), it does
not check itself: it *declares* a contract and :class:`PrecisionPassManager` enforces it.

- ``requires``: properties the input must have (no reduced precision yet, unique node
  names, opset ≥ 13, ...). A missing one stops the pass before it runs.
- ``guarantees``: properties the output then has (float32 graph IO, no float16 tensor beyond
  65504 on the check images, int8 weights within the range the target's kernels compute
  exactly, symmetric Q/DQ, a graph that passes ``onnx.checker`` with ``full_check``). Each is
  verified on the output.

Properties are named predicates in :data:`PROPERTIES`: ``check(model, context)`` returns a
:class:`Check` (empty ``problem`` when it holds, and the facts it measured, which go to the
manifest). A violated property raises its error type naming the pass and the passes before
it; a property that depends on the data (float16 range on the validation images) raises
:class:`~esr_deploy.errors.ValidationError` (exit 3), a broken structural promise
:class:`~esr_deploy.errors.ExportError`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from esr_deploy.errors import EsrDeployError, ExportError, ValidationError
from esr_deploy.precision.fp16 import FP16_MAX
from esr_deploy.precision.int8 import INT8_MAX
from esr_deploy.precision.int8_kernels import graph_weight_max

log = logging.getLogger(__name__)

_REDUCED_TYPES = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def fp16_range(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> tuple[float, str]:
    """Largest |value| any float16 tensor of ``model`` takes on ``inputs`` (before rounding)
    and the tensor that takes it; float16 rounding is emulated at every op boundary."""
    from esr_deploy.backends.onnxruntime import cpu_session
    from esr_deploy.precision.fp16_emulation import emulate_fp16

    emulated = emulate_fp16(model, expose_raw=True)
    session = cpu_session(emulated.SerializeToString(), optimize=False)
    names = [o.name for o in session.get_outputs()]
    raw = [i for i, n in enumerate(names) if n.endswith("__raw")]
    worst, where = 0.0, ""
    for x in inputs:
        outs = session.run(None, {session.get_inputs()[0].name: x})
        for i in raw:
            a = outs[i]
            m = float(np.max(np.abs(a))) if a.size else 0.0
            if not np.isfinite(m) or m > worst:
                worst, where = (
                    (float("inf") if not np.isfinite(m) else m),
                    names[i][: -len("__raw")],
                )
    return worst, where


@dataclass(frozen=True)
class PrecisionContext:
    """What the properties need beyond the graph."""

    #: LR inputs the float16 range is checked on (the validation images)
    check_inputs: Sequence[np.ndarray] = ()
    #: M of the int8 weights' range ±M (the target's kernels, see ``int8_kernels``)
    weight_max: int = INT8_MAX


@dataclass(frozen=True)
class Check:
    """One property of one graph: ``problem`` is empty when it holds."""

    problem: str = ""
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Property:
    check: Callable[[onnx.ModelProto, PrecisionContext], Check]
    #: raised when a guarantee does not hold
    error: type[EsrDeployError] = ExportError


def _valid(model: onnx.ModelProto, _: PrecisionContext) -> Check:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return Check(f"onnx.checker rejects the graph: {str(exc).splitlines()[0]}")
    return Check()


def _float32_io(model: onnx.ModelProto, _: PrecisionContext) -> Check:
    bad = [
        v.name
        for v in [*model.graph.input, *model.graph.output]
        if v.type.tensor_type.elem_type != TensorProto.FLOAT
    ]
    return Check(f"graph inputs/outputs not float32: {', '.join(bad)}" if bad else "")


def _full_precision(model: onnx.ModelProto, _: PrecisionContext) -> Check:
    reduced = [i.name for i in model.graph.initializer if i.data_type in _REDUCED_TYPES]
    qdq = [n.name or n.op_type for n in model.graph.node if n.op_type.endswith("QuantizeLinear")]
    casts = [
        n.name or n.op_type
        for n in model.graph.node
        if n.op_type == "Cast"
        and any(a.name == "to" and a.i in _REDUCED_TYPES for a in n.attribute)
    ]
    found = [*reduced[:3], *qdq[:3], *casts[:3]]
    if found:
        return Check(
            f"the graph already holds reduced precision (float16/bfloat16 tensors, casts or Q/DQ: "
            f"{', '.join(found)}) — precision passes start from the fp32 ONNX"
        )
    return Check()


def _unique_names(model: onnx.ModelProto, _: PrecisionContext) -> Check:
    names = [n.name for n in model.graph.node]
    if "" in names or len(set(names)) != len(names):
        return Check("node names are missing or repeated (run name_nodes first)")
    return Check()


def _opset13(model: onnx.ModelProto, _: PrecisionContext) -> Check:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return Check("" if opset >= 13 else f"opset {opset} < 13 (no per-axis DequantizeLinear)")


def _fp16_in_range(model: onnx.ModelProto, context: PrecisionContext) -> Check:
    if not context.check_inputs:
        return Check()
    worst, where = fp16_range(model, context.check_inputs)
    facts = {"fp16_max_abs_on_validation": worst, "fp16_max_abs_tensor": where}
    if worst >= FP16_MAX:
        return Check(
            f"the float16 ONNX overflows on the validation images — tensor '{where}' reaches "
            f"{worst:.4g} (float16 max {FP16_MAX:.0f}) although the calibration images kept it "
            "in range — calibrate on images like the validation ones (--calib DIR)",
            facts,
        )
    return Check("", facts)


def _int8_weights_in_range(model: onnx.ModelProto, context: PrecisionContext) -> Check:
    seen = graph_weight_max(model)
    if seen > context.weight_max:
        return Check(f"int8 weights reach ±{seen}, the target computes ±{context.weight_max}")
    return Check("", {"int8_weight_max": seen})


def _symmetric_qdq(model: onnx.ModelProto, _: PrecisionContext) -> Check:
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or np.any(numpy_helper.to_array(zp) != 0):
            return Check(f"{node.name}: zero point is not a constant 0 (TensorRT needs 0)")
    return Check()


#: property name → its check (and the error a violated guarantee raises)
PROPERTIES: dict[str, Property] = {
    "valid": Property(_valid),
    "float32-io": Property(_float32_io),
    "full-precision": Property(_full_precision),
    "unique-node-names": Property(_unique_names),
    "opset>=13": Property(_opset13),
    "fp16-in-range": Property(_fp16_in_range, ValidationError),
    "int8-weights-in-range": Property(_int8_weights_in_range),
    "symmetric-qdq": Property(_symmetric_qdq),
}


@dataclass(frozen=True)
class PrecisionOutcome:
    model: onnx.ModelProto
    #: what the pass reports for the manifest (counts, what stayed in higher precision)
    info: Mapping[str, Any] = field(default_factory=dict)


class PrecisionPass(ABC):
    """One ONNX precision rewrite with its declared contract (module docstring)."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]]
    guarantees: ClassVar[frozenset[str]]

    @abstractmethod
    def run(self, model: onnx.ModelProto) -> PrecisionOutcome: ...


@dataclass(frozen=True)
class PrecisionRecord:
    """One pass as run: its report and the facts its guarantees measured."""

    name: str
    info: Mapping[str, Any]
    facts: Mapping[str, Any]


class PrecisionPassManager:
    """Runs precision passes in order, checking each one's ``requires`` on its input and its
    ``guarantees`` on its output (module docstring)."""

    def __init__(self, passes: Sequence[PrecisionPass], context: PrecisionContext) -> None:
        unknown = {p for s in passes for p in (*s.requires, *s.guarantees)} - set(PROPERTIES)
        assert not unknown, f"undeclared properties: {sorted(unknown)}"
        self.passes = list(passes)
        self.context = context

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PrecisionRecord]]:
        records: list[PrecisionRecord] = []
        for p in self.passes:
            before = ", ".join(r.name for r in records) or "none"
            for prop in sorted(p.requires):
                problem = PROPERTIES[prop].check(model, self.context).problem
                if problem:
                    raise ExportError(
                        f"Precision pass '{p.name}' cannot run (passes before it: {before}) — "
                        f"it requires '{prop}': {problem}."
                    )
            outcome = p.run(model)
            facts: dict[str, Any] = {}
            for prop in sorted(p.guarantees):
                spec = PROPERTIES[prop]
                found = spec.check(outcome.model, self.context)
                facts.update(found.facts)
                if found.problem:
                    raise spec.error(
                        f"Precision pass '{p.name}' (passes before it: {before}) broke its "
                        f"guarantee '{prop}': {found.problem}.",
                        details={"precision": {**outcome.info, **facts}},
                    )
            log.info("precision pass %s: guarantees %s hold", p.name, sorted(p.guarantees))
            records.append(PrecisionRecord(p.name, dict(outcome.info), facts))
            model = outcome.model
        return model, records
