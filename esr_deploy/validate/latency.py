"""Wall-clock latency of a callable: warm-up, then timed runs, robust statistics.

Each timed run is measured with ``time.perf_counter_ns`` around one call of ``run``; the
callable must itself wait for its work to finish (e.g. ``torch.cuda.synchronize()`` or a
blocking engine call), otherwise only the launch is timed.

**Time budget** (``budget_s``, optional): the timed runs (rounds) stop early once at least
``min_runs`` of them are done and their timed total reaches ``budget_s`` seconds, so a slow
shape (a 720p frame takes seconds on 2 cores) is timed fewer times and a fast one as often
as asked; the statistics say how many runs they summarise. Without it, exactly ``runs``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "LatencyStats",
    "interleaved_times",
    "measure_interleaved",
    "measure_latency",
    "summarise",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of ``runs`` timings in milliseconds.

    ``p10``/``median``/``p90`` are the 10th/50th/90th percentiles with linear interpolation
    between order statistics (``numpy.percentile``'s default): for sorted times
    ``t_0 ≤ … ≤ t_{n−1}``, ``P(q) = t_⌊i⌋ + (i − ⌊i⌋)(t_⌊i⌋+1 − t_⌊i⌋)`` with
    ``i = q/100 · (n − 1)``; ``mean_ms = Σ t_i / n``.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    runs: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        """The inverse of :meth:`to_dict`."""
        return cls(median_ms=float(d["median"]), p10_ms=float(d["p10"]), p90_ms=float(d["p90"]),
                   mean_ms=float(d["mean"]), runs=int(d["runs"]))  # fmt: skip

    def to_dict(self) -> dict[str, float | int]:
        """The manifest's form: ``{"median", "p10", "p90", "mean", "runs"}`` (ms)."""
        return {
            "median": self.median_ms,
            "p10": self.p10_ms,
            "p90": self.p90_ms,
            "mean": self.mean_ms,
            "runs": self.runs,
        }


def _check_budget(budget_s: float | None, min_runs: int) -> None:
    if budget_s is not None and not budget_s >= 0.0:  # also refuses NaN
        raise ValueError(f"budget_s must be >= 0 seconds, got {budget_s}")
    if min_runs < 1:
        raise ValueError(f"min_runs must be >= 1, got {min_runs}")


def _spent(done: int, total_ns: int, budget_s: float | None, min_runs: int) -> bool:
    """Whether the time budget ends the timed runs after ``done`` of them (module docstring)."""
    return budget_s is not None and done >= min_runs and total_ns >= budget_s * 1e9


def measure_latency(
    run: Callable[[], object],
    warmup: int,
    runs: int,
    on_step: Callable[[], None] | None = None,
    budget_s: float | None = None,
    min_runs: int = 3,
) -> LatencyStats:
    """Call ``run`` ``warmup`` times untimed, then ``runs`` times timed (fewer, but at least
    ``min(min_runs, runs)``, once ``budget_s`` seconds of timed runs are spent), and summarise.

    ``on_step`` (e.g. a progress bar's ``advance``) is called after every call, warm-up
    included, outside the timed interval.

    Raises:
        ValueError: ``warmup < 0``, ``runs < 1``, ``min_runs < 1`` or ``budget_s < 0``.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    _check_budget(budget_s, min_runs)
    for _ in range(warmup):
        run()
        if on_step is not None:
            on_step()
    times_ns = np.empty(runs, dtype=np.int64)
    done = 0
    while done < runs and not _spent(done, int(times_ns[:done].sum()), budget_s, min_runs):
        times_ns[done] = _timed_ns(run)
        done += 1
        if on_step is not None:
            on_step()
    return summarise(times_ns[:done])


def interleaved_times(
    runs: Sequence[Callable[[], object]],
    warmup: int,
    rounds: int,
    rewarm: bool = True,
    budget_s: float | None = None,
    min_rounds: int = 3,
) -> np.ndarray:
    """Time several callables in turn, round after round; every timed call in ns, shape
    ``(len(runs), rounds)`` (column ``r`` of every row measured within round ``r``).

    ``warmup`` untimed rounds first. With ``rewarm`` each timed call directly follows an
    untimed call of the same callable (a, a*, b, b*, a, a*, ...; * timed), so what is timed
    is each engine's steady state, as a server calling one engine sees it. Without it
    (a*, b*, a*, ...) every timed call pays for switching engines — waking the other
    session's thread pool, reloading its weights into the caches — which on a 2-core CPU
    added about 60 ms to a 90 ms engine, the same for both, biasing ratios towards 1.

    With ``budget_s``, fewer rounds (at least ``min(min_rounds, rounds)``) once the timed calls
    of all callables together reach ``budget_s`` seconds; the result then has fewer columns.
    """
    if warmup < 0 or rounds < 1:
        raise ValueError(f"need warmup >= 0 and rounds >= 1, got {warmup} and {rounds}")
    _check_budget(budget_s, min_rounds)
    for _ in range(warmup):
        for run in runs:
            run()
    times_ns = np.empty((len(runs), rounds), dtype=np.int64)
    done = 0
    while done < rounds and not _spent(done, int(times_ns[:, :done].sum()), budget_s, min_rounds):
        for i, run in enumerate(runs):
            if rewarm:
                run()
            times_ns[i, done] = _timed_ns(run)
        done += 1
    return times_ns[:, :done]


def measure_interleaved(
    runs: Sequence[Callable[[], object]],
    warmup: int,
    rounds: int,
    rewarm: bool = True,
    budget_s: float | None = None,
    min_rounds: int = 3,
) -> list[LatencyStats]:
    """:func:`interleaved_times` summarised: one :class:`LatencyStats` per callable, for
    ratios measured side by side."""
    times = interleaved_times(runs, warmup, rounds, rewarm, budget_s, min_rounds)
    return [summarise(t) for t in times]


def _timed_ns(run: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    run()
    return time.perf_counter_ns() - t0


def summarise(times_ns: np.ndarray) -> LatencyStats:
    ms = times_ns.astype(np.float64) / 1e6
    p10, median, p90 = np.percentile(ms, [10.0, 50.0, 90.0])
    stats = LatencyStats(
        median_ms=float(median),
        p10_ms=float(p10),
        p90_ms=float(p90),
        mean_ms=float(ms.mean()),
        runs=len(ms),
    )
    log.debug(
        "latency over %d runs: median %.3f ms (p10 %.3f, p90 %.3f)",
        stats.runs,
        stats.median_ms,
        stats.p10_ms,
        stats.p90_ms,
    )
    return stats
