"""Passes, their results, and the manager that verifies each pass against its input.

A pass transforms a model (``nn.Module`` or ``fx.GraphModule``) into an equivalent one and
says what it changed. The :class:`PassManager` runs the model before and after every pass on
fixed inputs (seeded random tensors of odd sizes and real LR crops, borders included) and
rejects a pass whose outputs differ by more than its tolerance, relative to the model's
output range: ``max |after - before| / range <= tolerance`` with ``range`` the span of the
pass input's outputs on those inputs, at least the data range (exact algebraic passes: 1e-5,
design.md). A rejected or crashed pass raises :class:`PassError` naming the pass and the
passes before it; every accepted pass is recorded in the manifest with its counts.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from esr_deploy.errors import EsrDeployError, PassError
from esr_deploy.float64_reference import float32_instability
from esr_deploy.validate.metrics import ModelMetrics, model_metrics

log = logging.getLogger(__name__)

#: Tolerance of exact algebraic passes: max abs error relative to the output range.
EXACT_PASS_TOLERANCE = 1e-5
#: With accepted border drift: largest error allowed away from the border (a quarter of each
#: side cropped), relative to the output range. Drift stays near the border; a wrong fold
#: does not.
DRIFT_INTERIOR_TOLERANCE = 1e-2
#: Input size at which pass results count FLOPs (the NTIRE 256×256 LR).
METRICS_HW = (256, 256)


@dataclass(frozen=True)
class PassContext:
    """What passes may need to know about the model and the user's choices."""

    data_range: float
    sample_hw: tuple[int, int] = (64, 64)
    accept_border_drift: bool = False

    def sample(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.rand(1, 3, *self.sample_hw, generator=gen) * self.data_range


@dataclass(frozen=True)
class PassOutcome:
    """What a pass reports about itself (the manager adds counts and the measured error)."""

    model: nn.Module
    modified: bool
    details: tuple[str, ...] = ()
    border_drift: float = 0.0  # largest accepted relative border error (0: exact)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    """A pass as the manifest records it; ``before``/``after`` are the manager's counts of
    the pass's input and output (at 256×256, or another size a model insists on)."""

    name: str
    modified: bool
    before: ModelMetrics
    after: ModelMetrics
    max_abs_error: float  # relative to the output range, on the verification inputs
    border_drift: float = 0.0
    details: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    convs_before = property(lambda self: self.before.convs)
    convs_after = property(lambda self: self.after.convs)
    params_before = property(lambda self: self.before.params)
    params_after = property(lambda self: self.after.params)
    flops_before = property(lambda self: self.before.flops)
    flops_after = property(lambda self: self.after.flops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modified": self.modified,
            "convs_before": self.convs_before,
            "convs_after": self.convs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "max_abs_error": self.max_abs_error,
            "border_drift": self.border_drift,
            "details": list(self.details),
            **self.extra,
        }


class Pass(ABC):
    """One transformation. Subclasses set ``name`` (the CLI id) and implement ``run``."""

    name: ClassVar[str]
    #: True when ``run`` changes the model it is given (the manager then passes a copy).
    in_place: ClassVar[bool] = True
    #: may be set per instance (lossy passes report their cost instead of failing)
    tolerance: float = EXACT_PASS_TOLERANCE

    @abstractmethod
    def run(self, model: nn.Module, context: PassContext) -> PassOutcome: ...


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also copies tensor attributes which are not graph leaves
    (a weight computed from parameters in ``__init__`` or by a forward pre-hook), as
    detached clones: ``copy.deepcopy`` refuses those."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _counts(model: nn.Module, fallback_hw: tuple[int, int]) -> ModelMetrics:
    """Counts at 256×256, or at ``fallback_hw`` for models that accept only other sizes."""
    try:
        return model_metrics(model, input_hw=METRICS_HW)
    except RuntimeError:
        return model_metrics(model, input_hw=fallback_hw)


def _interior_error(a: torch.Tensor, b: torch.Tensor) -> float:
    h, w = a.shape[-2] // 4, a.shape[-1] // 4
    return float((a - b)[..., h : a.shape[-2] - h, w : a.shape[-1] - w].abs().max())


def _output_range(outputs: Sequence[torch.Tensor], data_range: float) -> float:
    """The span of the reference outputs (at least ``data_range``): float32 rounding of a
    reordered computation scales with the values, and random-weight test models produce
    outputs far outside the data range."""
    span = max(float(o.max() - o.min()) for o in outputs)
    return max(span, data_range)


def _outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in inputs]


class PassManager:
    """Runs passes in order, verifying each one (module docstring)."""

    def __init__(
        self, passes: Sequence[Pass], context: PassContext, inputs: Sequence[torch.Tensor]
    ) -> None:
        self.passes = list(passes)
        self.context = context
        self.inputs = list(inputs)

    def _error(
        self,
        model: nn.Module,
        after: Sequence[torch.Tensor],
        reference: Sequence[torch.Tensor],
        tolerance: float,
        name: str,
    ) -> float:
        """Largest |after - reference| relative to the output range; inputs on which float32
        is itself unstable and the pass output is as close to float64 as the reference is
        (:mod:`esr_deploy.float64_reference`) count at the tolerance, with a log line."""
        span = _output_range(reference, self.context.data_range)
        worst = 0.0
        for x, a, b in zip(self.inputs, after, reference, strict=True):
            error = float((a - b).abs().max()) / span
            if error > tolerance:
                excuse = float32_instability(model, x, b.numpy(), a.numpy(), span, tolerance)
                if excuse is not None:
                    log.info("pass %s on a %s input: %s", name, tuple(x.shape), excuse)
                    error = tolerance
            worst = max(worst, error)
        return worst

    def run(self, model: nn.Module) -> tuple[nn.Module, list[PassResult]]:
        results: list[PassResult] = []
        model = model.eval()
        reference = _outputs(model, self.inputs)
        hw = (int(self.inputs[0].shape[-2]), int(self.inputs[0].shape[-1]))
        counts = _counts(model, hw)
        for p in self.passes:
            done = [r.name for r in results]
            before = ", ".join(done) or "none"
            candidate = copy_model(model) if p.in_place else model
            try:
                outcome = p.run(candidate, self.context)
            except EsrDeployError:
                raise
            except Exception as exc:  # a pass bug must name the pass, not crash the CLI
                raise PassError(
                    f"Pass '{p.name}' failed (passes before it: {before}): "
                    f"{type(exc).__name__}: {exc} — skip it with --passes, and please report "
                    "the model."
                ) from exc
            # a pass that changed nothing hands back its input: the one it was given may carry
            # side effects of tracing (a forward that assigns module attributes)
            new = outcome.model.eval() if outcome.modified else model
            error = 0.0
            after = reference
            if outcome.modified:
                after = _outputs(new, self.inputs)
                error = self._error(model, after, reference, p.tolerance, p.name)
                gated, allowed = error, p.tolerance
                if outcome.border_drift:
                    # the user accepted drift at the image border: gate on the interior
                    # (a quarter of each side cropped), loosely, to still catch a wrong fold
                    gated = max(
                        _interior_error(a, b) for a, b in zip(after, reference, strict=True)
                    ) / _output_range(reference, self.context.data_range)
                    allowed = DRIFT_INTERIOR_TOLERANCE
                if gated > allowed:
                    raise PassError(
                        f"Pass '{p.name}' changed the model's output by {gated:.3g} × the "
                        f"output range (allowed {allowed:.3g}; passes before it: {before}) "
                        "— the pass was rejected; skip it with --passes and report the model."
                    )
            new_counts = _counts(new, hw) if outcome.modified else counts
            results.append(
                PassResult(
                    name=p.name,
                    modified=outcome.modified,
                    before=counts,
                    after=new_counts,
                    max_abs_error=error,
                    border_drift=outcome.border_drift,
                    details=outcome.details,
                    extra=dict(outcome.extra),
                )
            )
            log.info(
                "pass %s: modified=%s convs %d -> %d, error %.3g",
                p.name,
                outcome.modified,
                counts.convs,
                new_counts.convs,
                error,
            )
            model, counts, reference = new, new_counts, after
        return model, results
