"""The two comparisons of the gate: a candidate bundle against another bundle timed here,
or against the latency its baseline manifest recorded (see :mod:`esr_deploy.gate`)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from esr_deploy.bundle import MANIFEST
from esr_deploy.errors import BundleError, EsrDeployError
from esr_deploy.gate.engines import (
    LoadedEngine,
    bench_inputs,
    check_run,
    input_key,
    make_report,
    open_engine,
    resolve_shape,
    timed_rounds,
    timing,
)
from esr_deploy.gate.options import BenchOptions
from esr_deploy.gate.report import BenchReport, EngineTiming
from esr_deploy.gate.statistics import baseline_interval, ratio_interval
from esr_deploy.shapes import HW
from esr_deploy.validate.latency import LatencyStats

log = logging.getLogger(__name__)


def bench_bundle(candidate: str | Path, options: BenchOptions | None = None) -> BenchReport:
    """Time one bundle at one shape; no reference, no verdict."""
    options = options or BenchOptions()
    options.check()
    engine = open_engine(candidate, options.expect_digest)
    shape = resolve_shape(options, [engine])
    (x,) = bench_inputs([engine], shape, options.seed)
    check_run(engine, x)
    (stats,), _ = timed_rounds([partial(engine.session.run, x)], options)
    log.info("bench %s at %s: median %.3f ms", engine.label, shape, stats.median_ms)
    return make_report(
        options, shape, input_key(engine.manifest, shape), timing("candidate", engine, stats)
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
    shape = resolve_shape(options, [cand, ref])
    x_cand, x_ref = bench_inputs([cand, ref], shape, options.seed)
    warnings: list[str] = []
    out_cand, out_ref = check_run(cand, x_cand), check_run(ref, x_ref)
    if out_cand != out_ref:
        warnings.append(
            f"the engines' outputs differ in shape ({'x'.join(map(str, out_cand))} vs "
            f"{'x'.join(map(str, out_ref))}): they do different work, the ratio compares "
            "different models"
        )
    for key in ("name", "target", "scale"):
        mine, theirs = getattr(cand.manifest, key), getattr(ref.manifest, key)
        if mine != theirs:
            warnings.append(f"{key} differs: candidate {mine!r}, reference {theirs!r}")
    (stats_cand, stats_ref), times = timed_rounds(
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
    return make_report(
        options,
        shape,
        input_key(cand.manifest, shape),
        timing("candidate", cand, stats_cand),
        timing("reference", ref, stats_ref),
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
    shape = resolve_shape(options, [engine])
    key = input_key(engine.manifest, shape)
    recorded = _recorded_latency(baseline_file, base["latency_ms"], key, shape)
    f0 = float(recorded["median"])
    base_engine = base.get("engine") or {}
    recorded_device = base_engine.get("device") or {}
    warnings = _baseline_warnings(base, engine, recorded_device)
    notes = (
        "a recorded baseline is comparable only on the same machine type: it was recorded on "
        f"{_describe(recorded_device)}, this is {_describe(engine.here)}; the interval covers "
        "this run's noise only",
    )
    (x,) = bench_inputs([engine], shape, options.seed)
    check_run(engine, x)
    (stats,), times = timed_rounds([partial(engine.session.run, x)], options)
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
    return make_report(
        options,
        shape,
        key,
        timing("candidate", engine, stats),
        reference,
        "baseline",
        (ratio, low, high),
        warnings,
        notes,
    )


def _recorded_latency(
    baseline_file: Path, recorded_all: Mapping[str, Any], key: str, shape: HW
) -> Mapping[str, Any]:
    """The baseline's latency entry for input ``key``, with a positive finite median.

    Raises:
        EsrDeployError: no entry for ``key`` (the message lists the keys there are), or a
            median that is not a time.
    """
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
    return recorded


def _baseline_warnings(
    base: Mapping[str, Any], engine: LoadedEngine, recorded_device: Mapping[str, Any]
) -> list[str]:
    """Why the baseline's median may not be comparable: another machine type (CPU model,
    cores, flags, GPU, backend version) or another target."""
    base_engine = base.get("engine") or {}
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
    return warnings


def _describe(device: Mapping[str, Any]) -> str:
    what = device.get("model") or device.get("name") or device.get("kind") or "an unknown device"
    cores = device.get("cores")
    return f"{what}, {cores} cores" if cores else str(what)
