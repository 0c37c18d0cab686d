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
2. **Export** with ``torch.onnx.export``, N, H and W symbolic (traced with a batch of 2: a
   batch of 1 would be specialised to the constant 1): ``--exporter auto`` (the default)
   tries dynamo/torch.export first and the TorchScript exporter (traced at an odd size) when
   dynamo fails to export *or its graph fails the check*; ``dynamo`` or ``torchscript`` uses
   that one only.
3. ``onnx.checker`` (full check, with shape inference), then **onnxsim** (kept only if it
   succeeds and its result still checks).
4. **The export check** (:mod:`esr_deploy.export_check`): ONNX Runtime runs the graph on real
   LR crops of the minimal, odd and full sizes (seeded random inputs when no image is given);
   the largest absolute difference to PyTorch, relative to the output span, must stay within
   :data:`EXPORT_TOLERANCE` (against float64 where float32 itself is unstable). A graph that
   fails at some size, or differs, is rejected naming the input and the node; so is a graph
   that computes an image of a batch of 2 differently from the same image alone (a lost
   dynamic batch). When no exporter passes, :class:`ExportError` (exit 2) says so, and whether
   a fixed-size export would have worked.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from esr_deploy.errors import ExportError
from esr_deploy.export_check import (
    INPUT_NAME,
    OUTPUT_NAME,
    CheckFailure,
    CheckInput,
    CheckResult,
    batch_failure,
    check_graph,
    export_check_inputs,
    first_differing_value,
)
from esr_deploy.threads import single_thread

log = logging.getLogger(__name__)

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
    checked_on: tuple[str, ...] = ()  # the inputs of the export check

    def to_dict(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "checked_on": list(self.checked_on),
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


def _run_probe(model: nn.Module, h: int, w: int, scale: int) -> BaseException | None:
    """``None`` when the model maps an h×w input to an (s·h)×(s·w) tensor, else why not."""
    x = torch.zeros(1, _CHANNELS, h, w)
    try:
        with torch.no_grad():
            y = model(x)
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
        return exc
    if isinstance(y, torch.Tensor) and tuple(y.shape[-2:]) == (h * scale, w * scale):
        return None
    got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
    return ValueError(f"the output is {got}")


def _runs(model: nn.Module, h: int, w: int, scale: int) -> bool:
    return _run_probe(model, h, w, scale) is None


def derive_input_range(model: nn.Module, scale: int, sweep: bool = True) -> InputRange:
    """Probe the smallest H and W the model accepts (see the module docstring).

    Square inputs n×n for n = 1..PROBE_LIMIT give the smallest size ``m`` from which every
    square works; then each axis alone is probed below ``m`` with the other side at
    ``max(m, _PROBE_OTHER_SIDE)``, since one side can be allowed to be smaller than the other.

    ``sweep=False`` (``inspect``, which describes and builds nothing) stops the squares at the
    first that runs: ``m`` is then the smallest working square, and sizes above it that fail
    go unlisted (a compile sweeps them all and exports only what it verified).
    """
    with single_thread():  # see esr_deploy.threads
        return _probe_input_range(model, scale, sweep)


def _probe_input_range(model: nn.Module, scale: int, sweep: bool) -> InputRange:
    ok = []
    for n in range(1, PROBE_LIMIT):
        ok.append(_runs(model, n, n, scale))
        if ok[-1] and not sweep:
            ok.extend([True] * (PROBE_LIMIT - 1 - n))
            break
    why = _run_probe(model, PROBE_LIMIT, PROBE_LIMIT, scale)
    ok.append(why is None)
    if why is not None:
        from esr_deploy.loading.user_code import user_frame

        where = user_frame(why)
        raise ExportError(
            f"The model does not run on a {PROBE_LIMIT}×{PROBE_LIMIT} LR input or its output "
            f"is not {scale}× the input — {type(why).__name__}: {str(why)[:300]}"
            f"{f' at {where}' if where else ''} — check the recipe's scale and the "
            "architecture arguments."
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
) -> Any:
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
    return program


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


#: ``--exporter`` values: ``auto`` tries dynamo, then TorchScript when dynamo fails to export
#: or its graph fails the check.
EXPORTERS: tuple[str, ...] = ("auto", "dynamo", "torchscript")
_EXPORTER_NAMES = {"dynamo": "torch.export (dynamo)", "torchscript": "torchscript"}


def _trace_sample(min_hw: Sequence[int]) -> torch.Tensor:
    """TorchScript traces one size: an odd one, so that padding to a window or patch
    multiple (``if h % 8: pad``) is recorded rather than skipped."""
    h, w = (max(min_hw[0], 64) + 3) | 1, (max(min_hw[1], 64) + 3) | 1
    gen = torch.Generator().manual_seed(_SEED)
    return torch.rand(_TRACE_BATCH, _CHANNELS, h, w, generator=gen)


@dataclass(frozen=True)
class _Attempt:
    exporter: str
    proto: onnx.ModelProto | None
    program: Any = None
    error: str = ""


def _attempt(
    kind: str, model: nn.Module, min_hw: Sequence[int], max_hw: Sequence[int], opset: int
) -> _Attempt:
    """Export with one exporter; an exporter crash is recorded, not raised."""
    sample_hw = (max(min_hw[0], 64), max(min_hw[1], 64))
    gen = torch.Generator().manual_seed(_SEED)
    sample = torch.rand(_TRACE_BATCH, _CHANNELS, *sample_hw, generator=gen)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            if kind == "dynamo":
                program = _export_dynamo(model, sample, min_hw, max_hw, opset)
                return _Attempt(kind, program.model_proto, program)
            return _Attempt(kind, _export_torchscript(model, _trace_sample(min_hw), opset))
    except Exception as exc:  # the exporters raise many untyped errors
        log.warning("%s export failed (%s)", kind, str(exc)[:300])
        return _Attempt(kind, None, error=f"{type(exc).__name__}: {str(exc)[:400]}")


def replaced_parameters(model: nn.Module, min_hw: Sequence[int]) -> list[str]:
    """Parameters whose storage ``model``'s forward replaces (``p.data = ...``): networks
    that re-derive a folded weight on every call (SPAN's ``Conv3XC.update_params``).
    torch.export cannot trace that (it crashes the process in torch 2.13), so ``auto``
    exports such a model with the TorchScript exporter, which records the call as run."""
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    x = torch.zeros(1, _CHANNELS, max(min_hw[0], 8), max(min_hw[1], 8))
    with torch.no_grad():
        model(x)
    return [n for n, p in model.named_parameters() if before.get(n) != p.data_ptr()]


def _check_and_simplify(
    proto: onnx.ModelProto, simplify: bool, notes: list[str]
) -> tuple[onnx.ModelProto, bool]:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"The exported ONNX graph is invalid: {exc}") from exc
    if simplify:
        candidate, problem = _simplify(proto)
        if problem:
            notes.append(problem)
            log.warning("%s", problem)
        else:
            return candidate, True
    return proto, False


def _export_failed(
    attempts: Sequence[tuple[_Attempt, CheckFailure | None]], inputs: Sequence[CheckInput]
) -> ExportError:
    """The error when no exporter gave a graph that passes the check (exit 2)."""
    said = []
    fixed_size = False
    for attempt, failure in attempts:
        if failure is None:
            said.append(f"the {attempt.exporter} exporter failed: {attempt.error}")
            continue
        said.append(f"the {attempt.exporter} export fails {failure.describe()}")
        fixed_size |= failure.size_dependent
    advice = (
        "the graph holds only at the size it was traced at: the export lost the dynamic "
        "H×W (shape-dependent Python in forward, e.g. `if h % window: pad`, or adaptive "
        "pooling to a size computed from the input); a fixed-size export would work, and "
        "tiling can then serve any size — make the padding unconditional or the pooling "
        "size fixed, or try --exporter"
        if fixed_size
        else "an exporter mistranslated an op; try --exporter, or report the model"
    )
    checked = ", ".join(label for label, _ in inputs)
    return ExportError(
        f"Could not export a graph that matches PyTorch at every size — {'; '.join(said)} "
        f"(checked on {checked}) — {advice}."
    )


def _compare_with_pytorch(
    path: Path,
    attempt: _Attempt,
    model: nn.Module,
    data_range: float,
    inputs: Sequence[CheckInput],
) -> CheckResult:
    """The graph saved at ``path`` against PyTorch on ``inputs`` (to
    :data:`EXPORT_TOLERANCE`; the first differing node named when torch.export gave a
    program), then on a batch of :data:`_TRACE_BATCH` when every single input passed."""
    program = attempt.program
    check = check_graph(
        path,
        model,
        data_range,
        inputs,
        EXPORT_TOLERANCE,
        locate=(
            None
            if program is None
            else partial(first_differing_value, program, tolerance=EXPORT_TOLERANCE)
        ),
    )
    if check.failure is None:
        check = replace(check, failure=batch_failure(path, inputs, _TRACE_BATCH))
    return check


def export_onnx(
    model: nn.Module,
    path: Path,
    scale: int,
    data_range: float,
    max_hw: Sequence[int] = (1080, 1920),
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    input_range: InputRange | None = None,
    check_inputs: Sequence[CheckInput] | None = None,
    exporter: str = "auto",
) -> ExportResult:
    """Export ``model`` (eval mode, float32) to ``path``; see the module docstring.

    ``input_range``: the smallest accepted input, when the caller already probed it.
    ``check_inputs``: labelled inputs of the export check (real LR crops,
    :func:`esr_deploy.export_check.export_check_inputs`); seeded random ones when ``None``.
    ``exporter``: one of :data:`EXPORTERS`.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"Unknown exporter '{exporter}' — choose one of {', '.join(EXPORTERS)}.")
    model = model.eval()
    input_range = input_range or derive_input_range(model, scale)
    min_hw = input_range.min_hw
    inputs = list(check_inputs or export_check_inputs((), torch.from_numpy, min_hw, data_range))
    notes: list[str] = []
    tried: list[tuple[_Attempt, CheckFailure | None]] = []
    kinds: tuple[str, ...] = ("dynamo", "torchscript") if exporter == "auto" else (exporter,)
    replaced = replaced_parameters(model, min_hw) if exporter == "auto" else []
    if replaced:
        kinds = ("torchscript",)
        notes.append(
            f"forward replaces {len(replaced)} parameters on every call (e.g. {replaced[0]}): "
            "exported with the TorchScript exporter, which torch.export cannot trace"
        )
    for kind in kinds:
        attempt = _attempt(kind, model, min_hw, max_hw, opset)
        if attempt.proto is None:
            tried.append((attempt, None))
            notes.append(f"{kind} exporter failed: {attempt.error[:300]}")
            continue
        proto, simplified = _check_and_simplify(attempt.proto, simplify, notes)
        proto.producer_name = "esr-deploy"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
        check = _compare_with_pytorch(path, attempt, model, data_range, inputs)
        notes.extend(check.notes)
        if check.failure is None:
            break
        tried.append((attempt, check.failure))
        notes.append(f"{kind} export rejected: {check.failure.describe()}")
        log.warning("%s export rejected %s", kind, check.failure.describe())
    else:
        path.unlink(missing_ok=True)
        raise _export_failed(tried, inputs)
    stats = graph_stats(proto)
    log.info(
        "exported %s: %d nodes, %d convs, %d params, max error %.3g",
        path,
        stats.nodes,
        stats.convs,
        stats.params,
        check.max_error,
    )
    return ExportResult(
        path=path,
        exporter=_EXPORTER_NAMES[kind],
        opset=opset if kind == "dynamo" else min(opset, 17),
        simplified=simplified,
        input_range=input_range,
        max_abs_error=check.max_error,
        stats=stats,
        notes=tuple(notes),
        checked_on=tuple(label for label, _ in inputs),
    )
