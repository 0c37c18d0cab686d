"""The last stages of a target's compile: latency → manifest → report → bundle.

:func:`publish` times a validated :class:`~esr_deploy.compiling.backend.TargetBuild` (latency
at each shape, throughput, and for lossy pruning what pruning saved), builds its manifest
(:func:`~esr_deploy.compiling.manifest_build.build_manifest`) with the wall time of every
stage, renders the comparison figures and the report into the staging folder and writes the
manifest with the checksums of every file. The caller commits the staged bundle.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from esr_deploy.backends.base import Backend, EngineSession, ModelBackend
from esr_deploy.bundle import REPORT, StagedBundle
from esr_deploy.compiling.backend import TargetBuild, engine_profile
from esr_deploy.compiling.frontend import Frontend
from esr_deploy.compiling.manifest_build import build_manifest
from esr_deploy.compiling.options import (
    HW,
    LARGE_SHAPE_PIXELS,
    LARGE_SHAPE_RUNS,
    LATENCY_BUDGET_S,
    CompileOptions,
)
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.errors import ValidationError
from esr_deploy.export import ExportResult, InputRange, export_onnx
from esr_deploy.progress import Progress
from esr_deploy.recipe import Recipe
from esr_deploy.validate.batch import measure_throughput
from esr_deploy.validate.figures import COMPARISON_IMAGES, comparison_figures
from esr_deploy.validate.latency import measure_interleaved, measure_latency
from esr_deploy.validate.report import write_report

log = logging.getLogger(__name__)

#: Interleaved runs of the unpruned and the pruned engine for the lossy-pruning report.
PRUNE_LATENCY_RUNS = 5

#: Adds to a manifest (and its staging folder) before the report is rendered (``auto``).
Finish = Callable[[dict[str, Any], Path], None]


def measure_engine_latency(
    session: EngineSession,
    shapes: Sequence[HW],
    runs: int,
    warmup: int,
    data_range: float,
    progress: Progress,
    large_runs: int = LARGE_SHAPE_RUNS,
) -> dict[str, dict[str, Any]]:
    """Median/p10/p90 of the engine at each LR shape, keyed ``1x3xHxW``."""
    results: dict[str, dict[str, Any]] = {}
    gen = np.random.default_rng(0)
    for h, w in shapes:
        large = h * w > LARGE_SHAPE_PIXELS
        n = min(runs, large_runs) if large else runs
        warm = min(warmup, 1) if large else warmup
        x = (gen.random((1, 3, h, w), dtype=np.float32) * data_range).astype(np.float32)
        with progress.task(f"latency 1x3x{h}x{w}", warm + n) as advance:
            stats = measure_latency(
                partial(session.run, x),
                warmup=warm,
                runs=n,
                on_step=advance,
                budget_s=LATENCY_BUDGET_S,
                min_runs=1 if large else 3,
            )
        results[f"1x3x{h}x{w}"] = stats.to_dict()
    return results


def usable_shapes(shapes: Sequence[HW], export: ExportResult) -> list[HW]:
    """``shapes`` without those below the smallest input the graph accepts (logged)."""
    lo = export.input_range.min_hw
    usable = []
    for h, w in shapes:
        if h < lo[0] or w < lo[1]:
            log.warning("latency shape %dx%d is below the minimum input %s; skipped", h, w, lo)
            continue
        usable.append((h, w))
    return usable


def scratch_engine(
    model: nn.Module, folder: Path, backend: Backend, recipe: Recipe, input_range: InputRange
) -> tuple[EngineSession, ExportResult]:
    """Export ``model`` and build its fp32 engine in ``folder`` (for comparisons, not a
    bundle: nothing is validated); the session and what the export measured."""
    exported = export_onnx(
        model, folder / "model.onnx", recipe.scale, recipe.data_range, input_range=input_range
    )
    profile = engine_profile(recipe, input_range)
    if isinstance(backend, ModelBackend):
        built = backend.build_model(model, folder, "fp32", profile, None, []).engine
    else:
        built = backend.build(exported.path, folder, "fp32", profile)
    return backend.load(folder / built.engine_file, built.settings), exported


def pruning_report(
    frontend: Frontend, options: CompileOptions, build: TargetBuild, shapes: Sequence[HW]
) -> dict[str, Any] | None:
    """What pruning removed and, for lossy pruning, what it cost (params, FLOPs, latency,
    PSNR-Y against the unpruned model), measured side by side; the pruned engine is the one
    the compile built, the unpruned one is built here for the comparison."""
    prune = next((p for p in frontend.passes if p.name == "prune-channels"), None)
    if prune is None or frontend.deployed is None:
        return None
    report: dict[str, Any] = {
        "mode": prune.extra.get("mode", "exact"),
        "removed_channels": prune.extra.get("removed", {}),
        "params_before": prune.params_before,
        "params_after": prune.params_after,
        "flops_256_before": prune.flops_before,
        "flops_256_after": prune.flops_after,
    }
    if frontend.deployed.unpruned is None:
        return report
    recipe = frontend.recipe
    h, w = shapes[0] if shapes else (256, 256)
    x = (
        np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32) * recipe.data_range
    ).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        unpruned, _ = scratch_engine(
            frontend.deployed.unpruned, Path(tmp), build.backend, recipe, frontend.input_range
        )
        before, after = measure_interleaved(
            [partial(unpruned.run, x), partial(build.session.run, x)],
            warmup=1,
            rounds=PRUNE_LATENCY_RUNS,
        )
    b, a = before.median_ms, after.median_ms
    report.update(
        {
            "ratio": options.prune_ratio,
            "prune_to": options.prune_to,
            "latency_shape": f"1x3x{h}x{w}",
            "latency_ms_before": b,
            "latency_ms_after": a,
            "latency_ratio_before_over_after": b / a,
            "psnr_drop": {r.name: round(r.psnr_drop, 4) for r in build.results},
        }
    )
    return report


def validation_failure(
    frontend: Frontend, build: TargetBuild, destination: Path
) -> ValidationError:
    """The error of a target that failed validation; its details are the manifest it would
    have had (without latency), with the failures."""
    failures = build.failures()
    target, recipe = build.target, frontend.recipe
    manifest = build_manifest(frontend, target, build.backend, build.engine, build.results, {})
    manifest["batch"] = build.batch
    manifest["failures"] = failures
    return ValidationError(
        f"Validation of {recipe.name} on {target.name} failed — "
        + "; ".join(failures)
        + f" — nothing was written to {destination}. Fix the checkpoint, target or "
        f"validation set; loosen [tolerances.{target.precision}] in the recipe only "
        "where the loss is understood (--json prints every per-image number).",
        details=manifest,
    )


def _latency(
    frontend: Frontend, build: TargetBuild, options: CompileOptions, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Latency per shape, the ``batch`` section with throughput, and the pruning report."""
    data_range = frontend.recipe.data_range
    shapes = usable_shapes(options.latency_shapes, frontend.export)
    if not build.backend.measures_latency:
        shapes = []
    batch = dict(build.batch)
    if shapes:  # images/s at batch 1 and the batch profile's opt batch, first shape
        runs, warm = min(options.latency_runs, 10), options.latency_warmup
        batch["throughput"] = measure_throughput(build.session, shapes[0], data_range, runs, warm)
    latency = measure_engine_latency(
        build.session, shapes, options.latency_runs, options.latency_warmup, data_range,
        progress, options.large_runs,
    )  # fmt: skip
    return latency, batch, pruning_report(frontend, options, build, shapes)


def publish(
    frontend: Frontend,
    build: TargetBuild,
    staged: StagedBundle,
    options: CompileOptions,
    progress: Progress,
    timer: StageTimer,
    finish: Finish | None = None,
) -> dict[str, Any]:
    """Latency, manifest, figures and report of ``build`` (whose files are in ``staged``);
    returns the manifest as written. ``timer`` already holds the earlier stages."""
    with timer.stage("latency"):
        latency, batch, pruning = _latency(frontend, build, options, progress)
    with timer.stage("report"):
        target, recipe, vset = build.target, frontend.recipe, frontend.sets[0]
        manifest = build_manifest(
            frontend, target, build.backend, build.engine, build.results, latency
        )
        manifest["batch"] = batch
        if build.precision_info is not None:
            manifest["precision_onnx"] = dict(build.precision_info)
        if pruning is not None:
            manifest["pruning"] = pruning
        manifest["report_figures"] = comparison_figures(
            staged.dir,
            vset.pairs[:COMPARISON_IMAGES],
            frontend.reference,
            build.session.run,
            recipe,
            engine_label=f"engine ({target.name})",
            set_name=vset.name,
        )
        if finish is not None:
            finish(manifest, staged.dir)
    manifest["compile_seconds"] = timer.seconds()
    write_report(staged.dir / REPORT, manifest)
    return staged.write_manifest(manifest)
