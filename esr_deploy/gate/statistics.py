"""The statistics of the latency gate: a paired percentile bootstrap of the ratio of medians.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from esr_deploy.gate.options import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
)

#: Run times in ms: a sequence of floats or a 1-D float array.
Samples = Sequence[float] | npt.NDArray[np.floating[Any]]


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
