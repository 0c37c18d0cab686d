"""The engines a bench times: opened through the runtime's one bundle reader, fed seeded inputs,
timed in interleaved rounds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esr_deploy.errors import BundleError, EsrDeployError
from esr_deploy.gate.options import FALLBACK_SHAPE, BenchOptions
from esr_deploy.gate.report import BenchReport, EngineTiming
from esr_deploy.runtime.bundle_reader import Bundle, open_bundle
from esr_deploy.runtime.manifest import Manifest
from esr_deploy.shapes import HW
from esr_deploy.validate.latency import LatencyStats, interleaved_times
from esr_deploy.validate.latency import summarise as summarise_latency

if TYPE_CHECKING:  # the backends import their runtimes
    from esr_deploy.backends.base import EngineSession


@dataclass(frozen=True)
class LoadedEngine:
    """A verified bundle, its session, and this machine as its backend describes it."""

    bundle: Bundle
    session: EngineSession
    here: Mapping[str, Any]
    backend_version: str

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def label(self) -> str:
        return f"{self.manifest.name} ({self.manifest.target})"


def open_engine(path: str | Path, digest: str | None = None) -> LoadedEngine:
    """Load a bundle the way a serving runtime does: checksums, target available here, engine
    built for this backend version and CPU, session loaded.

    Raises:
        BundleError, TargetUnavailable, EsrDeployError: the bundle cannot be timed here.
    """
    from esr_deploy.targets import require_available

    bundle = open_bundle(path, digest=digest)  # refuses a manifest without target/engine
    manifest = bundle.manifest
    _, backend = require_available(manifest.target)
    if not backend.measures_latency:
        raise EsrDeployError(
            f"Cannot time {bundle.path}: target {manifest.target} is a hand-off artefact "
            "checked here by emulation, its speed here means nothing — bench the engine built "
            "from it (e.g. a trt-* bundle) on the machine it is meant for."
        )
    backend.check_engine(manifest)
    session = backend.load(bundle.engine_path, manifest.engine.settings)
    return LoadedEngine(bundle, session, dict(backend.device()), backend.version())


def default_shape(manifest: Manifest) -> HW:
    """The profile's ``opt`` LR shape, else :data:`FALLBACK_SHAPE`."""
    return manifest.profile.opt or FALLBACK_SHAPE


def input_channels(manifest: Manifest) -> int:
    """The input's channel count as declared (3 when the shape does not say)."""
    return manifest.inputs[0].channels or 3


def input_key(manifest: Manifest, shape: HW) -> str:
    """The manifest's ``latency_ms`` key of an LR shape: ``1xCxHxW``."""
    return f"1x{input_channels(manifest)}x{shape[0]}x{shape[1]}"


def check_shape(engine: LoadedEngine, shape: HW) -> None:
    """Refuse an LR shape outside the engine's profile (``min``..``max``)."""
    profile = engine.manifest.profile
    h, w = shape
    low, high = profile.min, profile.max
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


def bench_inputs(engines: Sequence[LoadedEngine], shape: HW, seed: int) -> list[np.ndarray]:
    """One seeded uniform draw, scaled to each engine's ``data_range``."""
    channels = input_channels(engines[0].manifest)
    u = np.random.default_rng(seed).random((1, channels, *shape), dtype=np.float32)
    return [(u * e.manifest.data_range).astype(np.float32) for e in engines]


def check_run(engine: LoadedEngine, x: np.ndarray) -> tuple[int, ...]:
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


def timed_rounds(
    runs: Sequence[Callable[[], object]], options: BenchOptions
) -> tuple[list[LatencyStats], np.ndarray]:
    """Time ``runs`` in interleaved rounds (:func:`interleaved_times`, re-warmed before each
    timed call unless ``options.rewarm`` is off) and keep every timed round: the statistics
    of each callable and its per-round times in ms, shape (len(runs), rounds)."""
    times_ns = interleaved_times(runs, options.warmup, options.runs, options.rewarm)
    return [summarise_latency(t) for t in times_ns], times_ns.astype(np.float64) / 1e6


def timing(role: str, engine: LoadedEngine, stats: LatencyStats) -> EngineTiming:
    return EngineTiming(
        role=role,
        source=str(engine.bundle.path),
        name=engine.manifest.name,
        target=engine.manifest.target,
        device=engine.here,
        stats=stats,
    )


def resolve_shape(options: BenchOptions, engines: Sequence[LoadedEngine]) -> HW:
    shape = options.shape or default_shape(engines[0].manifest)
    for engine in engines:
        check_shape(engine, shape)
    return shape


def make_report(
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
