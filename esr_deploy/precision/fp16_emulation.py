"""A float16 model run as float32 ops with float16 *storage*, for CPUs without fp16 kernels.

:func:`emulate_fp16` rewrites a converted model (:func:`esr_deploy.precision.fp16.convert_fp16`)
into float32 ops: every float16 tensor ``t`` is computed in float32 as ``t__raw`` and rounded
(``Cast(FLOAT16) → Cast(FLOAT)``) into ``t``, so ONNX Runtime CPU (few float16 kernels on x86)
reproduces "float16 between ops", and an overflow shows as ``inf``. It models float32
accumulation inside each op (as TensorRT's float16 convolutions do), not float16 arithmetic
within an op. Float16 initializers and Constants become float32 (exact); ``Cast(to=FLOAT)`` of
a float16 tensor becomes ``Identity``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from esr_deploy.errors import ExportError
from esr_deploy.precision.onnx_graph import DEFAULT_DOMAINS, UniqueNames, check, elem_types, infer

_FLOAT = TensorProto.FLOAT
_FLOAT16 = TensorProto.FLOAT16


def fp16_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the float16 activation tensors (node outputs, not Constants) of a model."""
    types = elem_types(infer(model, "listing float16 tensors"))
    return [
        name
        for node in model.graph.node
        if node.op_type != "Constant"
        for name in node.output
        if name and types.get(name) == _FLOAT16
    ]


def _attr_to_float32(node: onnx.NodeProto) -> None:
    """Element-type attributes (``to``, ``dtype``) and tensor values that say float16."""
    for attr in node.attribute:
        if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
            if attr.i == _FLOAT16:
                attr.i = _FLOAT
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _FLOAT16:
            values = numpy_helper.to_array(attr.t).astype(np.float32)
            attr.t.CopyFrom(numpy_helper.from_array(values, attr.t.name))


class _Rounding:
    """The rewrite of one model: float16 tensors computed raw in float32, then rounded."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.types = elem_types(infer(model, "fp16 emulation"))
        self.names = UniqueNames(model.graph)
        self.raws: list[str] = []  # the pre-rounding tensors, in graph order

    def is16(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == _FLOAT16

    def round_trip(self, src: str, dst: str) -> list[onnx.NodeProto]:
        names = self.names
        half = names.fresh(f"{dst}__fp16")
        return [
            helper.make_node("Cast", [src], [half], name=names.fresh(f"{half}__cast"), to=_FLOAT16),
            helper.make_node("Cast", [half], [dst], name=names.fresh(f"{dst}__cast"), to=_FLOAT),
        ]

    def raw_name(self, name: str) -> str:
        raw = f"{name}__raw"
        if raw in self.names.used:
            raise ExportError(
                f"fp16 emulation failed — tensor name '{raw}' already exists in the graph — "
                "emulate_fp16 names pre-rounding tensors '<name>__raw'; rename that tensor."
            )
        self.names.used.add(raw)
        self.raws.append(raw)
        return raw

    def node(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """``node`` in float32, followed by the rounding of each of its float16 outputs."""
        default = node.domain in DEFAULT_DOMAINS
        if default and node.op_type == "Constant":
            _attr_to_float32(node)
            return [node]
        if default and node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            src, out = node.input[0], node.output[0]
            if to == _FLOAT16:
                raw = self.raw_name(out)
                cast = helper.make_node("Cast", [src], [raw], name=node.name, to=_FLOAT)
                return [cast, *self.round_trip(raw, out)]
            if to == _FLOAT and self.is16(src):
                return [helper.make_node("Identity", [src], [out], name=node.name)]
            return [node]
        _attr_to_float32(node)
        rounding: list[onnx.NodeProto] = []
        for j, name in enumerate(node.output):
            if self.is16(name):
                raw = self.raw_name(name)
                node.output[j] = raw
                rounding.extend(self.round_trip(raw, name))
        return [node, *rounding]


def emulate_fp16(model: onnx.ModelProto, expose_raw: bool = False) -> onnx.ModelProto:
    """A float32 twin of a float16 model that rounds every float16 tensor at op boundaries.

    Every op computes in float32; every tensor that is float16 in ``model`` is computed into
    ``<name>__raw`` and rounded to float16 and back into ``<name>`` (values beyond 65504 become
    ``inf``). Float16 initializers and Constants become float32 (exact); ``Cast(to=FLOAT)`` of
    a float16 tensor becomes ``Identity``. With ``expose_raw`` every ``__raw`` tensor (the
    value before rounding, the input Cast's included) is also a graph output, so a caller can
    check that none leaves the float16 range.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    rounding = _Rounding(work)

    for init in graph.initializer:
        if init.data_type == _FLOAT16:
            values = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values, init.name))

    initializer_names = {t.name for t in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    alias: dict[str, str] = {}
    for inp in graph.input:
        if rounding.is16(inp.name) and inp.name not in initializer_names:
            inp.type.tensor_type.elem_type = _FLOAT
            alias[inp.name] = rounding.names.fresh(f"{inp.name}__rounded")
            new_nodes.extend(rounding.round_trip(inp.name, alias[inp.name]))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
        new_nodes.extend(rounding.node(node))

    graph.ClearField("node")
    graph.node.extend(new_nodes)
    for out in graph.output:
        if out.type.tensor_type.elem_type == _FLOAT16:
            out.type.tensor_type.elem_type = _FLOAT
    emulated = check(work, "fp16 emulation")
    return _expose(emulated, rounding.raws) if expose_raw else emulated


def _expose(emulated: onnx.ModelProto, raws: list[str]) -> onnx.ModelProto:
    """``emulated`` with every pre-rounding tensor in ``raws`` also a graph output."""
    infos = {info.name: info for info in emulated.graph.value_info}
    missing = [raw for raw in raws if raw not in infos]
    if missing:
        raise ExportError(
            f"fp16 emulation failed — shape inference gives no shape for {missing[:5]} — "
            "graph outputs need one; export the model with static ranks (opset 18)."
        )
    exposed = set(raws)
    kept_infos = [info for info in emulated.graph.value_info if info.name not in exposed]
    emulated.graph.ClearField("value_info")
    emulated.graph.value_info.extend(kept_infos)
    emulated.graph.output.extend(infos[raw] for raw in raws)
    return check(emulated, "fp16 emulation")
