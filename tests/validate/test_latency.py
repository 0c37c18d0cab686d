"""Tests of esr_deploy.validate.latency (lower bounds only: the machine is noisy)."""

from __future__ import annotations

import time

import pytest

from esr_deploy.validate.latency import LatencyStats, measure_latency


def test_sleep_gives_at_least_its_duration() -> None:
    steps: list[int] = []
    calls: list[int] = []

    def run() -> None:
        calls.append(1)
        time.sleep(0.005)

    stats = measure_latency(run, warmup=2, runs=7, on_step=lambda: steps.append(1))
    assert isinstance(stats, LatencyStats)
    assert len(calls) == 9 and len(steps) == 9
    assert stats.runs == 7
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.median_ms >= 5.0 and stats.p10_ms >= 5.0 and stats.mean_ms >= 5.0


def test_to_dict_keys() -> None:
    stats = measure_latency(lambda: None, warmup=0, runs=3)
    d = stats.to_dict()
    assert set(d) == {"median", "p10", "p90", "mean", "runs"}
    assert d["runs"] == 3 and d["median"] == stats.median_ms
    assert 0.0 <= d["p10"] <= d["median"] <= d["p90"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="runs"):
        measure_latency(lambda: None, warmup=0, runs=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_latency(lambda: None, warmup=-1, runs=1)


def test_measure_interleaved_times_each_callable_in_turn() -> None:
    from esr_deploy.validate.latency import measure_interleaved

    order: list[str] = []

    def slow() -> None:
        order.append("slow")
        time.sleep(0.004)

    def fast() -> None:
        order.append("fast")

    slow_stats, fast_stats = measure_interleaved([slow, fast], warmup=1, rounds=3, rewarm=False)
    assert order == ["slow", "fast"] * 4  # warm-up round, then 3 timed rounds alternating
    assert slow_stats.runs == fast_stats.runs == 3
    assert slow_stats.median_ms >= 4.0 > fast_stats.median_ms
    order.clear()
    slow_stats, fast_stats = measure_interleaved([slow, fast], warmup=1, rounds=2)
    # by default each timed call follows an untimed call of the same callable (re-warm)
    assert order == ["slow", "fast"] + ["slow", "slow", "fast", "fast"] * 2
    assert slow_stats.runs == fast_stats.runs == 2
    assert slow_stats.median_ms >= 4.0 > fast_stats.median_ms
    with pytest.raises(ValueError):
        measure_interleaved([fast], warmup=0, rounds=0)


def test_time_budget_stops_slow_runs_early_and_keeps_fast_ones() -> None:
    from esr_deploy.validate.latency import measure_interleaved

    steps: list[int] = []
    slow = measure_latency(
        lambda: time.sleep(0.02), warmup=1, runs=50, on_step=lambda: steps.append(1),
        budget_s=0.05, min_runs=2,
    )  # fmt: skip
    # each run sleeps >= 20 ms: the budget is spent after the 3rd run at the latest
    assert 2 <= slow.runs <= 3 and len(steps) == 1 + slow.runs
    assert slow.median_ms >= 20.0
    fast = measure_latency(lambda: None, warmup=0, runs=20, budget_s=0.5, min_runs=2)
    assert fast.runs == 20  # well inside the budget: every run asked for
    few = measure_latency(lambda: time.sleep(0.01), warmup=0, runs=2, budget_s=0.0, min_runs=5)
    assert few.runs == 2  # min_runs never exceeds runs
    a, b = measure_interleaved(
        [lambda: time.sleep(0.01), lambda: None], warmup=0, rounds=40, budget_s=0.03,
        min_rounds=2,
    )  # fmt: skip
    assert a.runs == b.runs and 2 <= a.runs <= 3
    with pytest.raises(ValueError, match="min_runs"):
        measure_latency(lambda: None, warmup=0, runs=3, budget_s=1.0, min_runs=0)
    with pytest.raises(ValueError, match="budget_s"):
        measure_latency(lambda: None, warmup=0, runs=3, budget_s=-1.0)
