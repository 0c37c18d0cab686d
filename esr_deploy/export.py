"""nn.Module → ONNX (float32, dynamic batch, H and W), checked, simplified, verified vs PyTorch.

The graph has one input ``lr`` (N×3×H×W, float32, range [0, data_range]) and one output ``sr``
(N×3×sH×sW); the batch ``N`` is dynamic from 1 to :data:`MAX_BATCH` (recorded in the
result's ``batch`` range), so a server can stack same-size requests. Steps:

1. **Valid input range.** Some networks reject small inputs: RLFN/RFDN's ESA block applies a
   3×3 stride-2 conv without padding and then a 7×7 stride-3 max-pool, so an LR side ``n``
   needs ``floor((n - 3) / 2) + 1 >= 7``, i.e. ``n >= 15``. The exporter does not guess this
   from the architecture: it runs the PyTorch model on every side length from 1 up and
   records the smallest ``n`` from which every size it tried works (height and width
   separately), together with any larger size that still failed.
2. **Export** with ``torch.onnx.export`` (dynamo/torch.export first, the TorchScript exporter
   as a fallback), N, H and W symbolic (traced with a batch of 2: a batch of 1 would be
   specialised to the constant 1).
3. ``onnx.checker`` (full check, with shape inference), then **onnxsim** (kept only if it
   succeeds and its result still checks).
4. **Verification**: ONNX Runtime runs the graph on seeded random inputs of odd and minimal
   sizes, and on a batch of 2 different images; the largest absolute difference to PyTorch,
   relative to ``data_range``, must stay within :data:`EXPORT_TOLERANCE`.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from esr_deploy.errors import ExportError

log = logging.getLogger(__name__)

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
DEFAULT_OPSET = 18
#: Max |onnx - torch| / max(data_range, output span) accepted for the fp32 export (reordered
#: float sums only).
EXPORT_TOLERANCE = 1e-4
#: Side lengths probed for the minimum input; the model must work on every size above the
#: minimum up to this bound.
PROBE_LIMIT = 64
_PROBE_OTHER_SIDE = 32
_SEED = 20260
_CHANNELS = 3
#: the largest batch the exported graph declares (its batch dimension is symbolic, 1..MAX_BATCH)
MAX_BATCH = 64
_TRACE_BATCH = 2


@dataclass(frozen=True)
class InputRange:
    """The LR sizes the graph accepts: ``min_hw`` and sizes above it that still failed."""

    min_hw: tuple[int, int]
    failing_above_min: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_hw": list(self.min_hw),
            "failing_above_min": [list(f) for f in self.failing_above_min],
            "probed_up_to": PROBE_LIMIT,
        }


@dataclass(frozen=True)
class GraphStats:
    """Counts of an ONNX graph (the deploy graph's NTIRE-style structure numbers)."""

    nodes: int
    convs: int
    params: int
    op_types: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    opset: int
    simplified: bool
    input_range: InputRange
    max_abs_error: float  # relative to data_range
    stats: GraphStats
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "opset": self.opset,
            "simplified": self.simplified,
            "input_range": self.input_range.to_dict(),
            "max_abs_error": self.max_abs_error,
            "batch": {"min": 1, "max": MAX_BATCH},
            "nodes": self.stats.nodes,
            "convs": self.stats.convs,
            "params": self.stats.params,
            "op_types": self.stats.op_types,
            "notes": list(self.notes),
        }


def _runs(model: nn.Module, h: int, w: int, scale: int) -> bool:
    x = torch.zeros(1, _CHANNELS, h, w)
    try:
        with torch.no_grad():
            y = model(x)
    except (RuntimeError, ValueError, IndexError):
        return False
    return isinstance(y, torch.Tensor) and tuple(y.shape[-2:]) == (h * scale, w * scale)


def derive_input_range(model: nn.Module, scale: int) -> InputRange:
    """Probe the smallest H and W the model accepts (see the module docstring).

    Square inputs n×n for n = 1..PROBE_LIMIT give the smallest size ``m`` from which every
    square works; then each axis alone is probed below ``m`` with the other side at
    ``max(m, _PROBE_OTHER_SIDE)``, since one side can be allowed to be smaller than the other.
    """
    ok = [_runs(model, n, n, scale) for n in range(1, PROBE_LIMIT + 1)]
    if not ok[-1]:
        raise ExportError(
            f"The model does not run on a {PROBE_LIMIT}×{PROBE_LIMIT} LR input or its output "
            f"is not {scale}× the input — check the recipe's scale and the architecture "
            "arguments."
        )
    square_min = ok.index(True) + 1
    failing = [
        (axis, n)
        for n in range(square_min, PROBE_LIMIT + 1)
        if not ok[n - 1]
        for axis in ("h", "w")
    ]
    other = max(square_min, _PROBE_OTHER_SIDE)
    mins = []
    for axis in ("h", "w"):
        lo = square_min
        for n in range(square_min - 1, 0, -1):
            if not (
                _runs(model, n, other, scale) if axis == "h" else _runs(model, other, n, scale)
            ):
                break
            lo = n
        mins.append(lo)
    if failing:
        log.warning("model fails on some sizes above its minimum: %s", failing[:10])
    return InputRange(min_hw=(mins[0], mins[1]), failing_above_min=tuple(failing))


#: ONNX element types that hold weights (int64 shape constants are not parameters).
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def graph_stats(model: onnx.ModelProto) -> GraphStats:
    """Node, conv and parameter counts; parameters are the floating-point initializers and
    Constant-node tensors (weights folded into constants count too)."""
    ops = Counter(n.op_type for n in model.graph.node)
    params = sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES
    )
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    params += int(np.prod(attr.t.dims))
    return GraphStats(
        nodes=len(model.graph.node),
        convs=ops.get("Conv", 0) + ops.get("ConvTranspose", 0),
        params=params,
        op_types=dict(sorted(ops.items())),
    )


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per torchvision op it cannot register; hide them."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_dynamo(
    model: nn.Module, sample: torch.Tensor, min_hw: Sequence[int], max_hw: Sequence[int], opset: int
) -> onnx.ModelProto:
    dims = {
        0: torch.export.Dim("n", min=1, max=MAX_BATCH),
        2: torch.export.Dim("h", min=max(2, min_hw[0]), max=max(max_hw[0], 4096)),
        3: torch.export.Dim("w", min=max(2, min_hw[1]), max=max(max_hw[1], 4096)),
    }
    program = torch.onnx.export(
        model,
        (sample,),
        None,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamo=True,
        dynamic_shapes=(dims,),
        opset_version=opset,
        optimize=True,
        verbose=False,
    )
    if program is None:  # pragma: no cover - dynamo export always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _export_torchscript(model: nn.Module, sample: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (sample,),
            buf,  # type: ignore[arg-type]  # file objects are accepted at run time
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "n", 2: "h", 3: "w"},
                OUTPUT_NAME: {0: "n", 2: "H", 3: "W"},
            },
            opset_version=min(opset, 17),
            dynamo=False,
        )
    return onnx.load_from_string(buf.getvalue())


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    try:
        import onnxsim
    except ImportError:
        return model, "onnxsim is not installed; graph left unsimplified"
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim raises untyped errors from C++
        return model, f"onnxsim failed ({type(exc).__name__}: {exc}); graph left unsimplified"
    if not ok:
        return model, "onnxsim could not validate its result; graph left unsimplified"
    return simplified, None


def _verify(
    path: Path, model: nn.Module, data_range: float, sizes: Sequence[tuple[int, int]]
) -> float:
    from esr_deploy.backends.onnxruntime import cpu_session  # the CPU runtime's one home

    session = cpu_session(path, optimize=False)
    gen = torch.Generator().manual_seed(_SEED)
    worst = 0.0
    for batch, (h, w) in [(1, hw) for hw in sizes] + [(_TRACE_BATCH, sizes[-1])]:
        x = torch.rand(batch, _CHANNELS, h, w, generator=gen) * data_range
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(
                f"The exported ONNX returns shape {got.shape} for a {h}×{w} input where "
                f"PyTorch returns {ref.shape} — the export lost the dynamic batch or H×W."
            )
        # relative to the output's span (at least the data range): float32 rounding scales
        # with the values, and a model that is not trained (or pruned without fine-tuning)
        # can produce outputs far outside the data range
        span = max(data_range, float(ref.max() - ref.min()))
        worst = max(worst, float(np.max(np.abs(got - ref))) / span)
    return worst


def export_onnx(
    model: nn.Module,
    path: Path,
    scale: int,
    data_range: float,
    max_hw: Sequence[int] = (1080, 1920),
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    input_range: InputRange | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode, float32) to ``path``; see the module docstring.

    ``input_range``: the smallest accepted input, when the caller already probed it.
    """
    model = model.eval()
    input_range = input_range or derive_input_range(model, scale)
    min_hw = input_range.min_hw
    sample_hw = (max(min_hw[0], 64), max(min_hw[1], 64))
    gen = torch.Generator().manual_seed(_SEED)
    sample = torch.rand(_TRACE_BATCH, _CHANNELS, *sample_hw, generator=gen)
    notes: list[str] = []
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            proto = _export_dynamo(model, sample, min_hw, max_hw, opset)
        exporter = "torch.export (dynamo)"
    except Exception as exc:  # the dynamo exporter raises many untyped errors
        log.warning("dynamo export failed (%s); falling back to the TorchScript exporter", exc)
        notes.append(f"dynamo exporter failed: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            proto = _export_torchscript(model, sample, opset)
        except Exception as exc2:  # same: untyped exporter errors
            raise ExportError(
                f"Could not export the model to ONNX — the dynamo exporter said "
                f"'{str(exc)[:400]}' and the TorchScript exporter said '{str(exc2)[:400]}' — "
                "make forward() free of data-dependent Python control flow and in-place "
                "ops on inputs."
            ) from exc2
        exporter = "torchscript"
        opset = min(opset, 17)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"The exported ONNX graph is invalid: {exc}") from exc
    simplified = False
    if simplify:
        candidate, problem = _simplify(proto)
        if problem:
            notes.append(problem)
            log.warning("%s", problem)
        else:
            proto, simplified = candidate, True
    proto.producer_name = "esr-deploy"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    odd = (max(min_hw[0], 37) | 1, max(min_hw[1], 53) | 1)
    error = _verify(path, model, data_range, [min_hw, odd])
    if error > EXPORT_TOLERANCE:
        raise ExportError(
            f"The exported ONNX differs from PyTorch by {error:.3g} × data_range (allowed "
            f"{EXPORT_TOLERANCE:g}) — the exporter mistranslated an op; try the other "
            "exporter or report the model."
        )
    stats = graph_stats(proto)
    log.info(
        "exported %s: %d nodes, %d convs, %d params, max error %.3g",
        path,
        stats.nodes,
        stats.convs,
        stats.params,
        error,
    )
    return ExportResult(
        path=path,
        exporter=exporter,
        opset=opset,
        simplified=simplified,
        input_range=input_range,
        max_abs_error=error,
        stats=stats,
        notes=tuple(notes),
    )
