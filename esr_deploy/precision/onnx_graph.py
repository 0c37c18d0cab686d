"""ONNX graph plumbing of the float16 passes: names, element types, re-inference and checks.

- :class:`UniqueNames`: fresh tensor and node names that collide with nothing in the graph
  (``base``, then ``base_1``, ``base_2``, ...: deterministic for a given graph).
- :func:`name_nodes`: unnamed nodes become ``f"{op_type}_{index}"``, duplicates made unique.
- :func:`elem_types`: every tensor's element type after strict shape inference
  (:func:`infer`), which refuses an invalid graph with an :class:`ExportError`.
- :func:`check`: after a rewrite, ``value_info`` is dropped and re-inferred from scratch and
  ``onnx.checker.check_model(full_check=True)`` must pass; a failure is a bug in the pass.
"""

from __future__ import annotations

import onnx

from esr_deploy.errors import ExportError

#: the default ONNX domain, as either spelling
DEFAULT_DOMAINS = ("", "ai.onnx")


class UniqueNames:
    """Fresh, deterministic tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = {i.name for i in graph.input} | {o.name for o in graph.output}
        self.used |= {t.name for t in graph.initializer}
        for node in graph.node:
            self.used.add(node.name)
            self.used.update(node.input)
            self.used.update(node.output)

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes ``f"{op_type}_{index}"`` and make every node name unique."""
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        name, k = base, 0
        while name in taken or name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
        taken.add(name)


def opset_version(model: onnx.ModelProto, domain: str) -> int | None:
    for opset in model.opset_import:
        if opset.domain == domain or (
            domain in DEFAULT_DOMAINS and opset.domain in DEFAULT_DOMAINS
        ):
            return int(opset.version)
    return None


def infer(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ExportError(
            f"{what} failed — ONNX shape inference rejects the graph: {exc} — check that the "
            "model is a valid ONNX export (onnx.checker.check_model(full_check=True))."
        ) from exc


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the inferred model knows (0 entries are left out)."""
    types: dict[str, int] = {}
    graph = model.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def check(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Re-infer value_info from scratch and run the full checker."""
    model.graph.ClearField("value_info")
    inferred = infer(model, what)
    try:
        onnx.checker.check_model(inferred, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"{what} produced a graph that onnx.checker rejects — {exc} — this is a bug in "
            "esr-deploy's fp16 pass: please report it, and use an fp32 target meanwhile."
        ) from exc
    return inferred
