"""The latency regression gate: is a candidate engine significantly slower than a reference?

``esr-deploy bench`` (and a CI job) time a *candidate* engine bundle against a *reference*:

- another bundle, run here in the same process, interleaved with the candidate
  (:func:`compare_bundles`), e.g. the engine of the last release;
- or the median a manifest *recorded* when its bundle was compiled (:func:`compare_to_baseline`),
  when the reference engine is not at hand.

Both engines get the same seeded random input ``u * data_range``, ``u ~ U[0, 1)`` of shape
``1xCxHxW`` (``numpy.random.default_rng(seed)``; each engine scaled by its own manifest's
``data_range``). Each engine runs once untimed as a check that it accepts the shape, then
``warmup`` untimed and ``runs`` timed rounds through
:func:`esr_deploy.validate.latency.interleaved_times`: in every round the candidate, then
the reference, each as one untimed call directly followed by one timed call of the same
engine (``c, c*, f, f*``; ``*`` timed). Interleaving at this grain makes machine noise —
another job, frequency scaling — hit both engines alike; the untimed call before each timed
one makes the timed call see the engine's steady state (its thread pool awake, its weights
and buffers in cache), as a server calling one engine does, instead of the cost of switching
from the other engine (on a 2-core CPU that cost was about 60 ms on a 90 ms engine, the same
for both, biasing the ratio towards 1). It also matches the recorded baselines, which
``compile`` measures with consecutive calls of one engine.

Statistic (interleaved comparison)
----------------------------------
Round ``i = 1..n`` gives the pair ``(c_i, f_i)`` in ms (candidate, reference).

- Point estimate: ``r̂ = med(c) / med(f)``, the ratio of the median latencies (medians are
  robust to the occasional stalled run).
- Paired percentile bootstrap: for ``b = 1..B`` draw round indices
  ``I_b = (i_1, ..., i_n)`` uniformly with replacement from ``{1..n}`` — the *same* indices
  for both engines, so a round that noise slowed down stays slowed down for both — and compute
  ``r*_b = med(c[I_b]) / med(f[I_b])``.
- The ``γ`` interval (default ``γ = 0.95``, ``B = 2000``, generator seeded) is
  ``[Q_{α/2}(r*), Q_{1-α/2}(r*)]`` with ``α = 1 - γ`` and ``Q`` the empirical quantile of the
  ``B`` bootstrap ratios (linear interpolation, ``numpy.quantile``'s default).

Regression: ``low > 1 + m``, ``m`` the allowed slowdown (``--max-regression``, e.g. 0.1).
A slowdown is flagged only when the whole interval lies above ``1 + m``: it is significant
*and* larger than the margin. A real but small slowdown (interval above 1, not above
``1 + m``) and a noisy measurement (a wide interval reaching below ``1 + m``) both pass: the
gate prefers a missed small regression to a red CI run caused by noise. For a candidate exactly
at the margin the false-alarm rate is about ``α/2`` (for independent rounds; load that drifts
over seconds is shared by the two engines of a round and cancels in the paired resampling).
The bootstrap median of ``n`` runs takes values among the order statistics, so the interval is
coarse for small ``n``; at least :data:`MIN_RUNS` runs are required and 9 to 20 are advised.

Statistic (recorded baseline)
-----------------------------
The reference is one number ``f₀``: the ``median`` of the baseline manifest's
``latency_ms["1xCxHxW"]``. ``r̂ = med(c) / f₀`` and ``r*_b = med(c[I_b]) / f₀``, same
interval, same gate. The interval covers this run's noise only, not the baseline's; and a
number recorded on another machine is not comparable at all — a baseline is meaningful only on
the same machine type (CPU model, ISA flags, cores; GPU name for GPU engines) with the same
backend version. The recorded device is compared with this machine and differences are
reported as warnings, not failures (a CI runner pool may change hardware under you: prefer
``--against`` with the reference engine, which measures both here).

Nothing here prints: :class:`BenchReport` is what the CLI shows, and a regression is raised as
:class:`LatencyRegression` (exit code 3) by :meth:`BenchReport.raise_for_regression`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from esr_deploy.bundle import MANIFEST
from esr_deploy.errors import EXIT_VALIDATION_FAILED, BundleError, EsrDeployError
from esr_deploy.runtime.bundle_reader import Bundle, open_bundle
from esr_deploy.validate.latency import LatencyStats, interleaved_times
from esr_deploy.validate.latency import summarise as summarise_latency

if TYPE_CHECKING:  # the backends import torch; the CLI imports this module's defaults
    from esr_deploy.backends.base import EngineSession

__all__ = [
    "BenchOptions",
    "BenchReport",
    "EngineTiming",
    "LatencyRegression",
    "baseline_interval",
    "bench_bundle",
    "compare_bundles",
    "compare_to_baseline",
    "parse_max_regression",
    "parse_shape",
    "ratio_interval",
]

log = logging.getLogger(__name__)

HW = tuple[int, int]
#: Run times in ms: a sequence of floats or a 1-D float array.
Samples = Sequence[float] | npt.NDArray[np.floating[Any]]

#: Defaults of ``esr-deploy bench`` (one table; the CLI reads them from here).
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 1
DEFAULT_MAX_REGRESSION = 0.10
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
#: LR shape timed when neither ``--shape`` nor the manifest's ``profile.opt`` says one.
FALLBACK_SHAPE: HW = (256, 256)
#: Fewest timed rounds accepted: below this a bootstrap interval of a median means nothing.
MIN_RUNS = 3
MIN_RESAMPLES = 100


class LatencyRegression(EsrDeployError):
    """The candidate engine is slower than its reference by more than the allowed margin,
    with the whole confidence interval of the ratio above it."""

    exit_code = EXIT_VALIDATION_FAILED


# ------------------------------------------------------------------------------ statistics


def _checked_samples(name: str, samples: Samples) -> np.ndarray:
    values = np.asarray(samples, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be a non-empty sequence of times, got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name} must hold positive finite times")
    return values


def _check_interval_args(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def _bootstrap_medians(samples: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``resamples`` bootstrap resamples of the columns of ``samples`` (k × n), with
    the same resampled column indices for every row: shape (k, resamples)."""
    n = samples.shape[1]
    idx = rng.integers(0, n, size=(resamples, n))
    return np.median(samples[:, idx], axis=2)


def _interval(ratios: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def ratio_interval(
    candidate_ms: Samples,
    reference_ms: Samples,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    paired: bool = True,
) -> tuple[float, float, float]:
    """``(r̂, low, high)``: the ratio of medians ``med(candidate) / med(reference)`` and its
    percentile-bootstrap interval (see the module docstring).

    ``paired`` (the default, for interleaved rounds): ``candidate_ms[i]`` and
    ``reference_ms[i]`` were measured in the same round and are resampled together; the two
    sequences must have the same length. ``paired=False``: independent samples, resampled
    independently (lengths may differ).

    Raises:
        ValueError: empty or non-positive times, unequal lengths when paired, a confidence
            outside (0, 1) or ``resamples < 1``.
    """
    cand = _checked_samples("candidate_ms", candidate_ms)
    ref = _checked_samples("reference_ms", reference_ms)
    _check_interval_args(confidence, resamples)
    rng = np.random.default_rng(seed)
    if paired:
        if cand.size != ref.size:
            raise ValueError(
                f"paired samples need equal lengths, got {cand.size} and {ref.size} "
                "(pass paired=False for independent samples)"
            )
        medians = _bootstrap_medians(np.stack([cand, ref]), resamples, rng)
        cand_star, ref_star = medians[0], medians[1]
    else:
        cand_star = _bootstrap_medians(cand[None, :], resamples, rng)[0]
        ref_star = _bootstrap_medians(ref[None, :], resamples, rng)[0]
    ratio = float(np.median(cand) / np.median(ref))
    low, high = _interval(cand_star / ref_star, confidence)
    return ratio, low, high


def baseline_interval(
    candidate_ms: Samples,
    reference_median_ms: float,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """``(r̂, low, high)`` against one recorded median ``f₀``: ``med(candidate) / f₀`` and the
    percentile-bootstrap interval of ``med(candidate*) / f₀`` (this run's noise only).

    Raises:
        ValueError: as :func:`ratio_interval`, or ``reference_median_ms`` not positive.
    """
    cand = _checked_samples("candidate_ms", candidate_ms)
    if not (math.isfinite(reference_median_ms) and reference_median_ms > 0):
        raise ValueError(f"reference_median_ms must be positive, got {reference_median_ms}")
    _check_interval_args(confidence, resamples)
    rng = np.random.default_rng(seed)
    cand_star = _bootstrap_medians(cand[None, :], resamples, rng)[0]
    ratio = float(np.median(cand) / reference_median_ms)
    low, high = _interval(cand_star / reference_median_ms, confidence)
    return ratio, low, high


# ------------------------------------------------------------------------------ options


def parse_max_regression(text: str) -> float:
    """``"10%"`` or ``"0.1"`` → 0.1. A bare number is a fraction and must be at most 1
    (``"10"`` is refused as ambiguous: write ``10%``); more than doubling is ``"150%"``.

    Raises:
        EsrDeployError: not a number, negative, not finite, or a bare number above 1.
    """
    raw = text.strip()
    percent = raw.endswith("%")
    number = raw[:-1].strip() if percent else raw
    try:
        value = float(number)
    except ValueError:
        raise EsrDeployError(
            f"--max-regression '{text}' is not a number — give the allowed slowdown as a "
            "percentage or a fraction, e.g. 10% or 0.1."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise EsrDeployError(
            f"--max-regression '{text}' is {'negative' if value < 0 else 'not finite'} — the "
            "allowed slowdown is 0 or more, e.g. 10% or 0.1 (0 flags any significant slowdown)."
        )
    if percent:
        return value / 100.0
    if value > 1:
        raise EsrDeployError(
            f"--max-regression '{text}' is ambiguous: a bare number is a fraction (0.1 = 10%), "
            f"and {value:g} would allow a {value * 100:g}% slowdown — write {value:g}% if that "
            f"is what you meant, or {value / 100:g}."
        )
    return value


def parse_shape(text: str, option: str = "--shape") -> HW:
    """``"64x64"`` → (64, 64), an LR input H×W.

    Raises:
        EsrDeployError: not ``HxW`` with positive integer sides.
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise EsrDeployError(
            f"{option} '{text}' is not a shape — write it as HxW (LR height x width), e.g. 256x256."
        ) from None
    if h < 1 or w < 1:
        raise EsrDeployError(
            f"{option} '{text}' has a side below 1 — give positive sides, e.g. 256x256."
        )
    return h, w


@dataclass(frozen=True)
class BenchOptions:
    """How to time: the LR shape (None: the candidate's ``profile.opt``), rounds, the allowed
    slowdown and the bootstrap's settings."""

    shape: HW | None = None
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    max_regression: float = DEFAULT_MAX_REGRESSION
    confidence: float = DEFAULT_CONFIDENCE
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    #: Precede each timed call by an untimed call of the same engine (module docstring).
    rewarm: bool = True
    #: the candidate's pinned digest (``--expect-digest``); None: not pinned
    expect_digest: str | None = None

    def check(self) -> None:
        """Raises :class:`EsrDeployError` (exit 2) on settings that cannot give an answer."""
        if self.runs < MIN_RUNS:
            raise EsrDeployError(
                f"--runs {self.runs}: too few timed rounds for a confidence interval — give "
                f"at least {MIN_RUNS} (9 to 20 are advised)."
            )
        if self.warmup < 0:
            raise EsrDeployError(f"--warmup {self.warmup} is negative — give 0 or more.")
        if not (math.isfinite(self.max_regression) and self.max_regression >= 0):
            raise EsrDeployError(
                f"max_regression {self.max_regression} — the allowed slowdown is 0 or more."
            )
        if not 0.0 < self.confidence < 1.0:
            raise EsrDeployError(
                f"confidence {self.confidence} is not in (0, 1) — e.g. 0.95 for 95%."
            )
        if self.resamples < MIN_RESAMPLES:
            raise EsrDeployError(
                f"resamples {self.resamples}: give at least {MIN_RESAMPLES} (default "
                f"{DEFAULT_RESAMPLES})."
            )


# ------------------------------------------------------------------------------ results


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


# ------------------------------------------------------------------------------ engines


@dataclass(frozen=True)
class LoadedEngine:
    """A verified bundle, its session, and this machine as its backend describes it."""

    bundle: Bundle
    session: EngineSession
    here: Mapping[str, Any]
    backend_version: str

    @property
    def manifest(self) -> Mapping[str, Any]:
        return self.bundle.manifest

    @property
    def label(self) -> str:
        return f"{self.manifest.get('name', '?')} ({self.manifest.get('target', '?')})"


def open_engine(path: str | Path, digest: str | None = None) -> LoadedEngine:
    """Load a bundle the way a serving runtime does: checksums, target available here, engine
    built for this backend version and CPU, session loaded.

    Raises:
        BundleError, TargetUnavailable, EsrDeployError: the bundle cannot be timed here.
    """
    from esr_deploy.targets import require_available

    bundle = open_bundle(path, digest=digest)  # refuses a manifest without target/engine
    manifest = bundle.manifest
    _, backend = require_available(str(manifest["target"]))
    if not backend.measures_latency:
        raise EsrDeployError(
            f"Cannot time {bundle.path}: target {manifest['target']} is a hand-off artefact "
            "checked here by emulation, its speed here means nothing — bench the engine built "
            "from it (e.g. a trt-* bundle) on the machine it is meant for."
        )
    backend.check_engine(manifest)
    session = backend.load(bundle.engine_path, manifest["engine"].get("settings", {}))
    return LoadedEngine(bundle, session, dict(backend.device()), backend.version())


def default_shape(manifest: Mapping[str, Any]) -> HW:
    """The profile's ``opt`` LR shape, else :data:`FALLBACK_SHAPE`."""
    opt = (manifest.get("profile") or {}).get("opt")
    if opt and len(opt) == 2:
        return int(opt[0]), int(opt[1])
    return FALLBACK_SHAPE


def input_channels(manifest: Mapping[str, Any]) -> int:
    try:
        channels = manifest["inputs"][0]["shape"][1]
    except (KeyError, IndexError, TypeError):
        return 3
    return channels if isinstance(channels, int) else 3


def input_key(manifest: Mapping[str, Any], shape: HW) -> str:
    """The manifest's ``latency_ms`` key of an LR shape: ``1xCxHxW``."""
    return f"1x{input_channels(manifest)}x{shape[0]}x{shape[1]}"


def check_shape(engine: LoadedEngine, shape: HW) -> None:
    """Refuse an LR shape outside the engine's profile (``min``..``max``)."""
    profile = engine.manifest.get("profile") or {}
    h, w = shape
    low, high = profile.get("min"), profile.get("max")
    if low and (h < low[0] or w < low[1]):
        raise EsrDeployError(
            f"--shape {h}x{w} is below the smallest input {low[0]}x{low[1]} that "
            f"{engine.label} at {engine.bundle.path} accepts — bench a shape of at least "
            f"{low[0]}x{low[1]}."
        )
    if high and (h > high[0] or w > high[1]):
        raise EsrDeployError(
            f"--shape {h}x{w} is above the largest input {high[0]}x{high[1]} of the profile of "
            f"{engine.label} at {engine.bundle.path} — bench a shape within it."
        )


def _inputs(engines: Sequence[LoadedEngine], shape: HW, seed: int) -> list[np.ndarray]:
    """One seeded uniform draw, scaled to each engine's ``data_range``."""
    channels = input_channels(engines[0].manifest)
    u = np.random.default_rng(seed).random((1, channels, *shape), dtype=np.float32)
    return [(u * float(e.manifest.get("data_range", 1.0))).astype(np.float32) for e in engines]


def _check_run(engine: LoadedEngine, x: np.ndarray) -> tuple[int, ...]:
    """One untimed run: the engine accepts the input; returns its output shape."""
    try:
        y = engine.session.run(x)
    except Exception as exc:  # runtimes raise their own untyped errors
        text = str(exc).strip().splitlines()
        raise BundleError(
            f"The engine of {engine.label} at {engine.bundle.path} failed on a "
            f"{'x'.join(map(str, x.shape))} input: {text[0] if text else type(exc).__name__} — "
            "check the shape against the bundle's profile, or recompile the bundle here."
        ) from exc
    return tuple(np.shape(y))


def _timed_rounds(
    runs: Sequence[Callable[[], object]], options: BenchOptions
) -> tuple[list[LatencyStats], np.ndarray]:
    """Time ``runs`` in interleaved rounds (:func:`interleaved_times`, re-warmed before each
    timed call unless ``options.rewarm`` is off) and keep every timed round: the statistics
    of each callable and its per-round times in ms, shape (len(runs), rounds)."""
    times_ns = interleaved_times(runs, options.warmup, options.runs, options.rewarm)
    return [summarise_latency(t) for t in times_ns], times_ns.astype(np.float64) / 1e6


def _timing(role: str, engine: LoadedEngine, stats: LatencyStats) -> EngineTiming:
    m = engine.manifest
    return EngineTiming(
        role=role,
        source=str(engine.bundle.path),
        name=str(m.get("name", "?")),
        target=str(m.get("target", "?")),
        device=engine.here,
        stats=stats,
    )


def _resolve_shape(options: BenchOptions, engines: Sequence[LoadedEngine]) -> HW:
    shape = options.shape or default_shape(engines[0].manifest)
    for engine in engines:
        check_shape(engine, shape)
    return shape


def _report(
    options: BenchOptions,
    shape: HW,
    key: str,
    candidate: EngineTiming,
    reference: EngineTiming | None = None,
    reference_kind: str = "none",
    interval: tuple[float | None, float | None, float | None] = (None, None, None),
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> BenchReport:
    """A :class:`BenchReport` with the settings it was timed with taken from ``options``;
    ``interval``: (ratio, CI low, CI high)."""
    ratio, low, high = interval
    return BenchReport(
        shape=shape,
        input_key=key,
        runs=options.runs,
        warmup=options.warmup,
        candidate=candidate,
        reference=reference,
        reference_kind=reference_kind,
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        confidence=options.confidence,
        resamples=options.resamples,
        max_regression=options.max_regression,
        rewarm=options.rewarm,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------ benches


def bench_bundle(candidate: str | Path, options: BenchOptions | None = None) -> BenchReport:
    """Time one bundle at one shape; no reference, no verdict."""
    options = options or BenchOptions()
    options.check()
    engine = open_engine(candidate, options.expect_digest)
    shape = _resolve_shape(options, [engine])
    (x,) = _inputs([engine], shape, options.seed)
    _check_run(engine, x)
    (stats,), _ = _timed_rounds([partial(engine.session.run, x)], options)
    log.info("bench %s at %s: median %.3f ms", engine.label, shape, stats.median_ms)
    return _report(
        options, shape, input_key(engine.manifest, shape), _timing("candidate", engine, stats)
    )


def compare_bundles(
    candidate: str | Path, reference: str | Path, options: BenchOptions | None = None
) -> BenchReport:
    """Time ``candidate`` and ``reference`` interleaved on the same input; the ratio of their
    medians and its paired bootstrap interval (module docstring). Never raises for a
    regression: call :meth:`BenchReport.raise_for_regression`."""
    options = options or BenchOptions()
    options.check()
    cand = open_engine(candidate, options.expect_digest)
    ref = open_engine(reference)
    shape = _resolve_shape(options, [cand, ref])
    x_cand, x_ref = _inputs([cand, ref], shape, options.seed)
    warnings: list[str] = []
    out_cand, out_ref = _check_run(cand, x_cand), _check_run(ref, x_ref)
    if out_cand != out_ref:
        warnings.append(
            f"the engines' outputs differ in shape ({'x'.join(map(str, out_cand))} vs "
            f"{'x'.join(map(str, out_ref))}): they do different work, the ratio compares "
            "different models"
        )
    for key in ("name", "target", "scale"):
        if cand.manifest.get(key) != ref.manifest.get(key):
            warnings.append(
                f"{key} differs: candidate {cand.manifest.get(key)!r}, reference "
                f"{ref.manifest.get(key)!r}"
            )
    (stats_cand, stats_ref), times = _timed_rounds(
        [partial(cand.session.run, x_cand), partial(ref.session.run, x_ref)], options
    )
    ratio, low, high = ratio_interval(
        times[0], times[1], options.confidence, options.resamples, options.seed, paired=True
    )
    log.info(
        "bench %s vs %s at %s: ratio %.3f, CI [%.3f, %.3f]",
        cand.label,
        ref.label,
        shape,
        ratio,
        low,
        high,
    )
    return _report(
        options,
        shape,
        input_key(cand.manifest, shape),
        _timing("candidate", cand, stats_cand),
        _timing("reference", ref, stats_ref),
        "bundle",
        (ratio, low, high),
        warnings,
    )


def read_baseline(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A baseline manifest: a ``manifest.json`` file, or a bundle folder holding one. Only
    the JSON is read: the baseline's engine need not be there.

    Raises:
        BundleError: missing, unreadable or not a manifest with ``latency_ms``.
    """
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise BundleError(
            f"Cannot read the baseline {path}: no such file — pass the manifest.json saved "
            "from an earlier build (or its bundle folder)."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"The baseline {file} is not a readable JSON manifest: {exc} — pass the "
            "manifest.json that `esr-deploy compile` wrote."
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("latency_ms"), dict):
        raise BundleError(
            f"The baseline {file} has no 'latency_ms' table — it is not an esr-deploy "
            "manifest; pass the manifest.json that `esr-deploy compile` wrote."
        )
    return file, data


def machine_differences(
    recorded: Mapping[str, Any], here: Mapping[str, Any], recorded_backend: Any, backend: str
) -> list[str]:
    """How the machine a baseline was recorded on differs from this one (empty: same type)."""
    diffs = []
    for key in ("model", "name", "cores", "compute_capability"):
        if key in recorded or key in here:
            if recorded.get(key) != here.get(key):
                diffs.append(f"{key} {recorded.get(key)!r} there, {here.get(key)!r} here")
    if sorted(recorded.get("flags", [])) != sorted(here.get("flags", [])):
        diffs.append(
            f"CPU flags {sorted(recorded.get('flags', []))} there, "
            f"{sorted(here.get('flags', []))} here"
        )
    if recorded_backend != backend:
        diffs.append(f"backend version {recorded_backend!r} there, {backend!r} here")
    return diffs


def compare_to_baseline(
    candidate: str | Path, baseline: str | Path, options: BenchOptions | None = None
) -> BenchReport:
    """Time ``candidate`` and compare its median with the one a baseline manifest recorded at
    the same shape (module docstring). A baseline recorded on another machine type is reported
    in ``warnings``, not refused.

    Raises:
        EsrDeployError: the baseline has no latency at this shape (the message lists the
            shapes it has); the errors of :func:`open_engine` and :func:`read_baseline`.
    """
    options = options or BenchOptions()
    options.check()
    baseline_file, base = read_baseline(baseline)
    engine = open_engine(candidate, options.expect_digest)
    shape = _resolve_shape(options, [engine])
    key = input_key(engine.manifest, shape)
    recorded_all: dict[str, Any] = base["latency_ms"]
    recorded = recorded_all.get(key)
    if not isinstance(recorded, dict) or "median" not in recorded:
        has = ", ".join(recorded_all) or "none (it was compiled with --no-latency)"
        hint = (
            f" — bench at a shape it has (e.g. --shape {next(iter(recorded_all)).split('x', 2)[2]})"
            if recorded_all
            else " — recompile the baseline with --latency-shape"
        )
        raise EsrDeployError(
            f"The baseline {baseline_file} recorded no latency for {key} — it has: {has}"
            f"{hint}, or record the baseline at this shape "
            f"(esr-deploy compile --latency-shape {shape[0]}x{shape[1]})."
        )
    f0 = float(recorded["median"])
    if not (math.isfinite(f0) and f0 > 0):
        raise EsrDeployError(
            f"The baseline {baseline_file} records a median of {recorded['median']!r} ms for "
            f"{key} — not a time; recompile the baseline."
        )
    base_engine = base.get("engine") or {}
    recorded_device = base_engine.get("device") or {}
    diffs = machine_differences(
        recorded_device, engine.here, base_engine.get("backend_version"), engine.backend_version
    )
    warnings = []
    if diffs:
        warnings.append(
            "the baseline was recorded on another machine type ("
            + "; ".join(diffs)
            + "): its latency is not comparable with this machine's — run the gate on the "
            "machine type the baseline was recorded on, or use --against with the reference "
            "engine"
        )
    if base.get("target") != engine.manifest.get("target"):
        warnings.append(
            f"target differs: candidate {engine.manifest.get('target')!r}, baseline "
            f"{base.get('target')!r}"
        )
    notes = (
        "a recorded baseline is comparable only on the same machine type: it was recorded on "
        f"{_describe(recorded_device)}, this is {_describe(engine.here)}; the interval covers "
        "this run's noise only",
    )
    (x,) = _inputs([engine], shape, options.seed)
    _check_run(engine, x)
    (stats,), times = _timed_rounds([partial(engine.session.run, x)], options)
    ratio, low, high = baseline_interval(
        times[0], f0, options.confidence, options.resamples, options.seed
    )
    log.info(
        "bench %s at %s vs baseline %s (%.3f ms): ratio %.3f, CI [%.3f, %.3f]",
        engine.label,
        shape,
        baseline_file,
        f0,
        ratio,
        low,
        high,
    )
    reference = EngineTiming(
        role="reference",
        source=str(baseline_file),
        name=str(base.get("name", "?")),
        target=str(base.get("target", "?")),
        device=recorded_device,
        stats=LatencyStats(
            median_ms=f0,
            p10_ms=float(recorded.get("p10", f0)),
            p90_ms=float(recorded.get("p90", f0)),
            mean_ms=float(recorded.get("mean", f0)),
            runs=int(recorded.get("runs", 0)),
        ),
        measured=False,
    )
    return _report(
        options,
        shape,
        key,
        _timing("candidate", engine, stats),
        reference,
        "baseline",
        (ratio, low, high),
        warnings,
        notes,
    )


def _describe(device: Mapping[str, Any]) -> str:
    what = device.get("model") or device.get("name") or device.get("kind") or "an unknown device"
    cores = device.get("cores")
    return f"{what}, {cores} cores" if cores else str(what)
