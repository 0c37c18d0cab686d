"""An ONNX file as the compile's source: the frontend is the ONNX itself.

No graph passes run and nothing is exported: the graph is checked (one float input
N×3×H×W with N, H and W dynamic, one output, no external data), its input and output are
renamed to the bundle's names, and the fp32 reference the engines are validated against is
that graph run in ONNX Runtime (:class:`OnnxModel`). The scale is read from shapes: the graph
is run once on a 1×3×s×s input (s = :data:`SCALE_PROBE`) and must return 1×3×(k·s)×(k·s) for
an integer k ≥ 1. The NTIRE metrics are counted on the graph (:func:`onnx_metrics`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from esr_deploy.compiling.frontend import (
    FRONTEND_ONNX,
    Frontend,
    memoized,
    sets_and_input_range,
)
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.errors import CheckpointError, EsrDeployError
from esr_deploy.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportResult,
    graph_stats,
)
from esr_deploy.loading.checkpoint import LoadedCheckpoint
from esr_deploy.loading.detect import LoadedModel
from esr_deploy.passes.base import METRICS_HW
from esr_deploy.recipe import Recipe

#: LR side of the input the scale is read from.
SCALE_PROBE = 32
#: ``ExportResult.exporter`` of a bundle built from a given ONNX file.
ONNX_SOURCE = "onnx-file"


class OnnxModel(nn.Module):
    """An fp32 ONNX graph (serialized, with the bundle's input/output names) run by ONNX
    Runtime on the CPU, callable like the PyTorch model it stands for: ``y = m(x)`` with ``x``
    a float32 N×3×H×W tensor. It is the reference and the input-size probe of an ONNX source;
    it has no parameters and is never trained, traced or exported. A graph that fails on an
    input raises ``RuntimeError``."""

    def __init__(self, graph: bytes) -> None:
        super().__init__()
        from esr_deploy.backends.onnxruntime import cpu_session

        self.graph = graph
        self._session = cpu_session(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
        try:
            out = self._session.run([OUTPUT_NAME], feed)[0]
        except Exception as exc:  # ONNX Runtime's own exception types
            raise RuntimeError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def _refuse(path: Path, what: str, todo: str) -> CheckpointError:
    return CheckpointError(f"Cannot compile the ONNX file {path} — {what} — {todo}.")


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Each dimension: its size when fixed, else its symbol ('' when unnamed)."""
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim]


def _check_io(path: Path, model: onnx.ModelProto) -> tuple[str, str]:
    """The names of the one image input and the one output, or a clear refusal."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    todo = "export a graph with one float32 input N×3×H×W (N, H, W dynamic) and one output"
    if len(inputs) != 1 or len(model.graph.output) != 1:
        seen = f"{len(inputs)} input(s) and {len(model.graph.output)} output(s)"
        raise _refuse(path, f"it has {seen}", todo)
    value = inputs[0]
    dims = _dims(value)
    if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4:
        kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        raise _refuse(path, f"its input {value.name!r} is {kind} of rank {len(dims)}", todo)
    if dims[1] != 3:
        raise _refuse(path, f"its input {value.name!r} has {dims[1]!r} channels, not 3", todo)
    fixed = [f"{axis}={d}" for axis, d in zip("NHW", (dims[0], dims[2], dims[3]), strict=True)
             if isinstance(d, int)]  # fmt: skip
    if fixed:
        raise _refuse(
            path,
            f"its input has fixed {', '.join(fixed)}, so it cannot take validation images of "
            "other sizes",
            "export with dynamic batch, height and width axes (torch.onnx.export "
            "dynamic_axes / dynamic_shapes)",
        )
    out_type = model.graph.output[0].type.tensor_type
    if out_type.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(out_type.elem_type)
        raise _refuse(path, f"its output is {kind}, not float32", todo)
    return value.name, model.graph.output[0].name


def _renamed(model: onnx.ModelProto, old_in: str, old_out: str) -> onnx.ModelProto:
    """A copy whose input and output carry the bundle's names (every use renamed)."""
    names = {old_in: INPUT_NAME, old_out: OUTPUT_NAME}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = names.get(value.name, value.name)
    return out


def _read(path: Path) -> tuple[onnx.ModelProto, bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _refuse(path, f"it cannot be read ({exc.strerror})", "check the path") from exc
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _refuse(path, f"it is not a valid ONNX model ({first})", "re-export it") from exc
    external = [t.name for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]  # fmt: skip
    if external:
        raise _refuse(
            path,
            f"its weights are in external data files ({', '.join(external[:3])})",
            "save it as one file (onnx.save(model, path, save_as_external_data=False))",
        )
    return model, data


def _scale(path: Path, model: OnnxModel, given: int | None) -> int:
    """The upscaling factor the graph applies (see the module docstring)."""
    s = SCALE_PROBE
    try:
        y = model(torch.zeros(1, 3, s, s))
    except RuntimeError as exc:
        raise _refuse(path, f"it fails on a 1x3x{s}x{s} input ({exc})", "check the graph") from exc
    shape = tuple(y.shape)
    k = shape[-1] // s if len(shape) == 4 else 0
    if len(shape) != 4 or shape[:2] != (1, 3) or k < 1 or shape[2:] != (k * s, k * s):
        raise _refuse(
            path,
            f"on a 1x3x{s}x{s} input it returns {shape}, so the scale cannot be read from "
            "shapes (expected 1x3x(k·H)x(k·W))",
            "give an image-to-image super-resolution graph",
        )
    if given is not None and given != k:
        raise _refuse(path, f"it upscales x{k}, not x{given} as given", f"pass scale={k}")
    return k


def load_onnx_source(
    path: Path, data_range: float = 1.0, scale: int | None = None, name: str | None = None
) -> LoadedModel:
    """Check and wrap an ONNX file as a :class:`LoadedModel` whose model is an
    :class:`OnnxModel` (see the module docstring); ``data_range``: the input range the graph
    expects (1 or 255)."""
    model, data = _read(path)
    old_in, old_out = _check_io(path, model)
    graph = _renamed(model, old_in, old_out).SerializeToString()
    wrapped = OnnxModel(graph)
    k = _scale(path, wrapped, scale)
    recipe = Recipe(
        name=name or path.stem,
        arch=f"onnx:{path.name}",
        scale=k,
        data_range=data_range,
        description=f"ONNX file {path.name}, compiled as given",
    )
    ckpt = LoadedCheckpoint(
        path=path, sha256=hashlib.sha256(data).hexdigest(), state_dict={}, nested_key=None,
        placeholders=(),
    )  # fmt: skip
    note = (
        f"Using the ONNX file {path.name} as is: x{k}, input 0..{data_range:g}; no graph "
        "passes, the reference is the ONNX run in ONNX Runtime."
    )
    return LoadedModel(recipe=recipe, model=wrapped.eval(), checkpoint=ckpt, notes=(note,))


def onnx_metrics(model: onnx.ModelProto) -> dict[str, int]:
    """Convs, MACs (``weight.numel() · N · H_out · W_out``, as
    :mod:`esr_deploy.validate.metrics` counts them) and conv output activations at 1×3×256×256,
    from ONNX shape inference; a conv whose shapes inference cannot tell is counted as a conv
    but adds no MACs."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    for d, size in zip(dims, (1, 3, *METRICS_HW), strict=True):
        d.Clear()
        d.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(fixed)
    values = [*inferred.graph.value_info, *inferred.graph.output]
    shapes = {v.name: _dims(v) for v in values}
    weights = {t.name: list(t.dims) for t in inferred.graph.initializer}
    convs = flops = activations = 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        convs += 1
        w, out = weights.get(node.input[1]), shapes.get(node.output[0], [])
        if w and len(out) == 4 and all(isinstance(d, int) and d > 0 for d in out):
            sizes = [int(d) for d in out]
            flops += int(np.prod(w)) * sizes[0] * sizes[2] * sizes[3]
            activations += int(np.prod(sizes))
    return {"convs": convs, "flops": flops, "activations": activations}


def onnx_frontend(
    loaded: LoadedModel, options: CompileOptions, workdir: Path, timer: StageTimer
) -> Frontend:
    """The frontend of an ONNX source (:func:`load_onnx_source`): validation sets, input
    range, the graph written to ``workdir`` as the fp32 ONNX, and its metrics."""
    assert isinstance(loaded.model, OnnxModel)
    if options.passes or options.lossy_pruning:
        raise EsrDeployError(
            "Graph passes and pruning run on a PyTorch model — an ONNX file is compiled as "
            "given — drop the passes/pruning options, or compile the checkpoint instead."
        )
    sets, input_range = sets_and_input_range(loaded, options, timer)
    with timer.stage("export"):
        path = workdir / FRONTEND_ONNX
        path.write_bytes(loaded.model.graph)
        model = onnx.load_from_string(loaded.model.graph)
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        stats = graph_stats(model)
        export = ExportResult(
            path=path, exporter=ONNX_SOURCE, opset=opset, simplified=False,
            input_range=input_range, max_abs_error=0.0, stats=stats,
            notes=("compiled from the given ONNX file; nothing was exported",),
        )  # fmt: skip
    with timer.stage("metrics"):
        counted = onnx_metrics(model)
    metrics: dict[str, Any] = {
        "params": stats.params,
        "flops_256": counted["flops"],
        "activations_256": counted["activations"],
        "convs": counted["convs"],
        "onnx_convs": stats.convs,
        "onnx_params": stats.params,
    }
    metrics["training_form"] = {k: metrics[k] for k in ("params", "flops_256", "convs")}
    return Frontend(
        loaded=loaded, sets=sets, input_range=input_range, export=export,
        reference=memoized(loaded.model), parity_reference=None, deployed=None, metrics=metrics,
    )  # fmt: skip
