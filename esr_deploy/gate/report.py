"""What a bench measured and its verdict; a regression is raised as :class:`LatencyRegression`
(exit code 3)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from esr_deploy.errors import EXIT_VALIDATION_FAILED, EsrDeployError
from esr_deploy.shapes import HW
from esr_deploy.validate.latency import LatencyStats


class LatencyRegression(EsrDeployError):
    """The candidate engine is slower than its reference by more than the allowed margin,
    with the whole confidence interval of the ratio above it."""

    exit_code = EXIT_VALIDATION_FAILED


@dataclass(frozen=True)
class EngineTiming:
    """One side of a comparison: which engine and its latency statistics (ms).

    ``measured`` is True for timings taken in this run, False for a baseline's recorded ones.
    """

    role: str  # "candidate" or "reference"
    source: str  # bundle folder, or the baseline manifest's path
    name: str
    target: str
    device: Mapping[str, Any]
    stats: LatencyStats
    measured: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "source": self.source,
            "name": self.name,
            "target": self.target,
            "device": dict(self.device),
            "measured": self.measured,
            "latency_ms": self.stats.to_dict(),
        }


@dataclass(frozen=True)
class BenchReport:
    """The outcome of a bench: statistics of each engine, the ratio and its interval, and
    whether it is a regression (see the module docstring). ``reference_kind``: ``"bundle"``
    (interleaved with another engine), ``"baseline"`` (a recorded median) or ``"none"``
    (timing only; ``ratio``, ``ci_low`` and ``ci_high`` are None)."""

    shape: HW
    input_key: str  # the manifest's latency key, "1xCxHxW"
    runs: int
    warmup: int
    candidate: EngineTiming
    reference: EngineTiming | None
    reference_kind: str
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    resamples: int
    max_regression: float
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    rewarm: bool = True

    @property
    def threshold(self) -> float:
        """The largest ratio allowed: ``1 + max_regression``."""
        return 1.0 + self.max_regression

    @property
    def regression(self) -> bool:
        return self.ci_low is not None and self.ci_low > self.threshold

    @property
    def statistic(self) -> str:
        if self.reference_kind == "bundle":
            return (
                "median(candidate)/median(reference) over interleaved rounds; "
                f"paired percentile bootstrap, {self.resamples} resamples"
            )
        if self.reference_kind == "baseline":
            return (
                "median(candidate)/recorded median(baseline); percentile bootstrap of this "
                f"run's rounds, {self.resamples} resamples"
            )
        return "none (no reference)"

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document (stable keys, for CI scripts)."""
        return {
            "shape": self.input_key,
            "hw": list(self.shape),
            "runs": self.runs,
            "warmup": self.warmup,
            "rewarm": self.rewarm,
            "reference_kind": self.reference_kind,
            "candidate": self.candidate.to_dict(),
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "ratio": self.ratio,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "confidence": self.confidence,
            "statistic": self.statistic,
            "max_regression": self.max_regression,
            "threshold": self.threshold,
            "regression": self.regression,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def verdict(self) -> str:
        """One sentence: the ratio, its interval, the allowed maximum and the outcome."""
        if self.ratio is None or self.ci_low is None or self.ci_high is None:
            return (
                f"{self.candidate.name} ({self.candidate.target}) at {self.input_key}: median "
                f"{self.candidate.stats.median_ms:.2f} ms over {self.runs} runs (no reference)."
            )
        outcome = (
            "REGRESSION"
            if self.regression
            else "ok"
            if self.ci_low <= self.threshold and self.ratio <= self.threshold
            else "ok (not significant beyond the margin)"
        )
        return (
            f"ratio candidate/reference {self.ratio:.3f}x, {self.confidence:.0%} CI "
            f"[{self.ci_low:.3f}x, {self.ci_high:.3f}x], allowed at most {self.threshold:.3f}x "
            f"(max regression {self.max_regression:.0%}): {outcome}"
        )

    def raise_for_regression(self) -> None:
        """Raise :class:`LatencyRegression` (with this report as its ``--json`` details) when
        the lower end of the interval exceeds ``1 + max_regression``."""
        if not self.regression:
            return
        assert self.reference is not None and self.ratio is not None
        ref = self.reference
        ref_what = (
            f"the reference {ref.name} ({ref.target}, {ref.source})"
            if ref.measured
            else f"the baseline median recorded in {ref.source}"
        )
        how = (
            f"over {self.runs} interleaved rounds"
            if self.reference_kind == "bundle"
            else f"over {self.runs} runs against one recorded number"
        )
        raise LatencyRegression(
            f"Latency regression at {self.input_key}: {self.candidate.name} "
            f"({self.candidate.target}, {self.candidate.source}) takes a median "
            f"{self.candidate.stats.median_ms:.2f} ms vs {ref.stats.median_ms:.2f} ms for "
            f"{ref_what} — ratio {self.ratio:.3f}x, {self.confidence:.0%} CI "
            f"[{self.ci_low:.3f}x, {self.ci_high:.3f}x] {how}, entirely above the allowed "
            f"{self.threshold:.3f}x (--max-regression {self.max_regression:.0%}). — Find the "
            "change that slowed the engine (compare the two manifests' passes, target, precision "
            "and engine settings); if the slowdown is intended, raise --max-regression or "
            "update the reference.",
            details=self.to_dict(),
        )
