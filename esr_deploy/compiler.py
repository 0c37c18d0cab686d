"""The compile pipeline: checkpoint → model → ONNX → engine → validation → bundle.

Cheap checks that can fail on user input run first (target available here, output writable,
checkpoint safe and complete, recipe, validation images readable), so a mistake is reported
in seconds and before anything is written. The bundle is staged in a hidden folder and moved
into place only after every validation check passed (:mod:`esr_deploy.bundle`).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from esr_deploy import __version__
from esr_deploy.auto import AUTO, compile_auto
from esr_deploy.backends.base import Backend, EngineSession, ModelBackend, ModelBuild
from esr_deploy.bundle import (
    REFERENCE_ONNX,
    REPORT,
    SCHEMA_VERSION,
    StagedBundle,
    check_writable,
)
from esr_deploy.data import ValidationSet, load_validation_set
from esr_deploy.errors import EsrDeployError, ValidationError
from esr_deploy.export import (
    EXPORTERS,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportResult,
    InputRange,
    derive_input_range,
    export_onnx,
)
from esr_deploy.export_check import export_check_inputs
from esr_deploy.loading.detect import LoadedModel, ModelSource, load_model
from esr_deploy.passes import DEFAULT_PASSES, build_passes
from esr_deploy.passes.base import METRICS_HW, PassContext, PassManager, PassResult, copy_model
from esr_deploy.paths import default_val_dir
from esr_deploy.precision.apply import (
    PrecisionOnnx,
    PrecisionOptions,
    check_precision_options,
    make_fp16,
    make_int8,
)
from esr_deploy.precision.calibration import calibration_set
from esr_deploy.precision.int8 import Int8Result
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.recipe import (
    Recipe,
    ShapeProfile,
)
from esr_deploy.targets import Target, require_available
from esr_deploy.validate.batch import check_batch, measure_throughput
from esr_deploy.validate.figures import COMPARISON_IMAGES, comparison_figures
from esr_deploy.validate.latency import measure_interleaved, measure_latency
from esr_deploy.validate.metrics import ModelMetrics, model_metrics
from esr_deploy.validate.parity import ReferenceRun, SetResult, evaluate_set, model_input
from esr_deploy.validate.report import write_report

log = logging.getLogger(__name__)

HW = tuple[int, int]
#: Default latency shapes (LR H×W): the NTIRE 256×256 and a 720p LR frame.
DEFAULT_LATENCY_SHAPES: tuple[HW, ...] = ((256, 256), (720, 1280))
DEFAULT_LATENCY_RUNS = 10
#: Shapes with more LR pixels than this are timed with one warm-up and LARGE_SHAPE_RUNS runs
#: (a 720p LR frame at x4 takes seconds per run on a 2-core CPU); ``--latency-runs`` and the
#: warm-up apply in full to the smaller shapes. More runs at large shapes: --large-runs.
LARGE_SHAPE_PIXELS = 512 * 512
LARGE_SHAPE_RUNS = 2
#: The ONNX at the target's precision (fp16 / Q/DQ int8) the engine is built from; TensorRT
#: consumes it as is.
PRECISION_ONNX = "model.onnx"
#: Precisions whose engine is built from a precision ONNX (bf16 is a runtime setting applied
#: to the fp32 ONNX).
PRECISION_ONNX_PRECISIONS = ("fp16", "int8")
#: Interleaved runs of the unpruned and the pruned engine for the lossy-pruning report.
PRUNE_LATENCY_RUNS = 5


@dataclass(frozen=True)
class CompileOptions:
    source: ModelSource
    target: str = "ort-fp32"
    exporter: str = "auto"  # esr_deploy.export.EXPORTERS
    val_dirs: tuple[Path, ...] = ()
    out: Path | None = None
    engines_dir: Path = Path("engines")
    latency_shapes: tuple[HW, ...] = DEFAULT_LATENCY_SHAPES
    latency_runs: int = DEFAULT_LATENCY_RUNS
    latency_warmup: int = 2
    large_runs: int = LARGE_SHAPE_RUNS
    passes: tuple[str, ...] | None = None  # None: DEFAULT_PASSES
    accept_border_drift: bool = False
    prune_ratio: float | None = None  # lossy prune-channels: fraction removed per group
    prune_to: int | None = None  # lossy prune-channels: channels kept per group
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)  # fp16/int8 targets
    auto_candidates: tuple[str, ...] | None = None  # --target auto: None = AUTO_CANDIDATES
    #: tighter PSNR-Y drop budget than the recipe's for this precision (dB); --target auto
    #: holds every candidate to AUTO_MAX_PSNR_DROP unless given
    max_psnr_drop: float | None = None

    @property
    def lossy_pruning(self) -> bool:
        return self.prune_ratio is not None or self.prune_to is not None


@dataclass(frozen=True)
class CompileResult:
    bundle: Path
    manifest: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: ``sha256:…`` of the canonical manifest (:mod:`esr_deploy.runtime.bundle_reader`)
    digest: str = ""


def check_options(options: CompileOptions) -> None:
    """Refuse contradictory or out-of-range options before any work (exit code 2)."""
    src = options.source
    if src.arch and src.recipe:
        raise EsrDeployError(
            "Give --arch or --recipe, not both — --recipe names a recipe that already has an "
            "architecture; --arch describes one that is not in a recipe."
        )
    if not src.arch and (src.scale is not None or src.data_range is not None):
        raise EsrDeployError(
            "--scale and --data-range go with --arch; a recipe (named or detected) states "
            "them — edit a copy of the recipe to change them."
        )
    if options.prune_ratio is not None and options.prune_to is not None:
        raise EsrDeployError("Give --prune-ratio or --prune-to, not both.")
    ratio = options.prune_ratio
    if ratio is not None and not 0.0 < ratio < 1.0:  # also refuses NaN
        raise EsrDeployError(f"--prune-ratio must be between 0 and 1 (exclusive), got {ratio}.")
    if options.max_psnr_drop is not None and not options.max_psnr_drop >= 0.0:
        raise EsrDeployError(f"--max-drop must be 0 dB or more, got {options.max_psnr_drop}.")
    if options.prune_to is not None and options.prune_to < 1:
        raise EsrDeployError(f"--prune-to must be at least 1 channel, got {options.prune_to}.")
    check_precision_options(options.precision)
    if options.exporter not in EXPORTERS:
        raise EsrDeployError(
            f"--exporter {options.exporter!r} is not an exporter — choose one of "
            f"{', '.join(EXPORTERS)}."
        )


def load_sets(val_dirs: Sequence[Path], scale: int) -> list[ValidationSet]:
    dirs = list(val_dirs) or [default_val_dir()]
    return [load_validation_set(d, scale) for d in dirs]


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
            stats = measure_latency(partial(session.run, x), warmup=warm, runs=n, on_step=advance)
        results[f"1x3x{h}x{w}"] = stats.to_dict()
    return results


def _usable_shapes(shapes: Sequence[HW], export: ExportResult) -> list[HW]:
    lo = export.input_range.min_hw
    usable = []
    for h, w in shapes:
        if h < lo[0] or w < lo[1]:
            log.warning("latency shape %dx%d is below the minimum input %s; skipped", h, w, lo)
            continue
        usable.append((h, w))
    return usable


def verification_inputs(
    recipe: Recipe, input_range: InputRange, sets: Sequence[ValidationSet]
) -> list[torch.Tensor]:
    """Fixed inputs the pass manager compares models on: odd-sized random tensors (seeded),
    the smallest accepted size, and a real LR image (a crop of the first validation image)."""
    gen = torch.Generator().manual_seed(0)
    min_h, min_w = input_range.min_hw
    sizes = [(max(min_h, 37), max(min_w, 53)), (min_h, min_w)]
    inputs = [torch.rand(1, 3, h, w, generator=gen) * recipe.data_range for h, w in sizes]
    for vset in sets[:1]:
        for pair in vset.pairs[:1]:
            lr = pair.lr[:64, :64]
            if lr.shape[0] >= min_h and lr.shape[1] >= min_w:
                inputs.append(model_input(np.ascontiguousarray(lr), recipe))
    return inputs


def run_passes(
    model: nn.Module,
    recipe: Recipe,
    input_range: InputRange,
    sets: Sequence[ValidationSet],
    names: Sequence[str] | None,
    accept_border_drift: bool,
    prune_ratio: float | None = None,
    prune_to: int | None = None,
) -> tuple[nn.Module, list[PassResult]]:
    """The deploy form of ``model`` (a copy; the training form is kept as the reference)."""
    names = DEFAULT_PASSES if names is None else tuple(names)
    if not names:
        return model, []
    min_h, min_w = input_range.min_hw
    context = PassContext(
        data_range=recipe.data_range,
        sample_hw=(max(min_h, 32), max(min_w, 32)),
        accept_border_drift=accept_border_drift,
    )
    manager = PassManager(
        build_passes(names, prune_ratio, prune_to),
        context,
        verification_inputs(recipe, input_range, sets),
    )
    return manager.run(copy_model(model))


@dataclass(frozen=True)
class DeployModels:
    """The deploy form, and for lossy pruning the same before pruning (for its report)."""

    model: nn.Module
    passes: list[PassResult]
    unpruned: nn.Module | None = None


def deploy_form(
    loaded: LoadedModel,
    options: CompileOptions,
    input_range: InputRange,
    sets: Sequence[ValidationSet],
) -> DeployModels:
    """Run the passes; lossy pruning runs alone after the others so its cost can be shown."""
    names = DEFAULT_PASSES if options.passes is None else tuple(options.passes)
    args = (loaded.recipe, input_range, sets)
    if not options.lossy_pruning:
        model, results = run_passes(loaded.model, *args, names, options.accept_border_drift)
        return DeployModels(model, results)
    if "prune-channels" not in names:
        build_passes(names, options.prune_ratio, options.prune_to)  # raises the clear error
    others = [n for n in names if n != "prune-channels"]
    unpruned, results = run_passes(loaded.model, *args, others, options.accept_border_drift)
    pruned, prune = run_passes(
        unpruned,
        *args,
        ("prune-channels",),
        options.accept_border_drift,
        options.prune_ratio,
        options.prune_to,
    )
    return DeployModels(pruned, results + prune, unpruned)


def pruning_report(
    deploy: DeployModels,
    options: CompileOptions,
    results: Sequence[SetResult],
    backend: Backend,
    recipe: Recipe,
    input_range: InputRange,
    shapes: Sequence[HW],
    pruned: EngineSession,
) -> dict[str, Any] | None:
    """What pruning removed and, for lossy pruning, what it cost (params, FLOPs, latency,
    PSNR-Y against the unpruned model), measured side by side; ``pruned`` is the engine
    the compile built, the unpruned one is built here for the comparison."""
    prune = next((p for p in deploy.passes if p.name == "prune-channels"), None)
    if prune is None:
        return None
    report: dict[str, Any] = {
        "mode": prune.extra.get("mode", "exact"),
        "removed_channels": prune.extra.get("removed", {}),
        "params_before": prune.params_before,
        "params_after": prune.params_after,
        "flops_256_before": prune.flops_before,
        "flops_256_after": prune.flops_after,
    }
    if deploy.unpruned is None:
        return report
    h, w = shapes[0] if shapes else (256, 256)
    x = (
        np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32) * recipe.data_range
    ).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        unpruned, _ = scratch_engine(deploy.unpruned, Path(tmp), backend, recipe, input_range)
        before, after = measure_interleaved(
            [partial(unpruned.run, x), partial(pruned.run, x)],
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
            "psnr_drop": {r.name: round(r.psnr_drop, 4) for r in results},
        }
    )
    return report


def metrics_256(model: nn.Module, known: ModelMetrics | None) -> ModelMetrics:
    """NTIRE metrics at 256×256 LR: ``known`` when it was counted at that size."""
    if known is not None and tuple(known.input_hw) == METRICS_HW:
        return known
    return model_metrics(model, input_hw=METRICS_HW)


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


def engine_profile(recipe: Recipe, input_range: InputRange) -> ShapeProfile:
    """The recipe's shape profile with the smallest input the exporter derived."""
    return replace(recipe.profile, min=input_range.min_hw)


def memoized(reference: ReferenceRun) -> ReferenceRun:
    """``reference`` computed once per distinct input (searches validate many candidates)."""
    cache: dict[tuple[tuple[int, ...], bytes], Any] = {}

    def run(x: torch.Tensor) -> Any:
        key = (tuple(x.shape), hashlib.sha1(x.numpy().tobytes()).digest())
        if key not in cache:
            cache[key] = reference(x)
        return cache[key]

    return run


def reduce_precision(
    target: Target,
    backend: Backend,
    folder: Path,
    fp32_onnx: Path,
    recipe: Recipe,
    sets: Sequence[ValidationSet],
    profile: ShapeProfile,
    check: Callable[[EngineSession], list[SetResult]],
    options: CompileOptions,
    progress: Progress,
) -> PrecisionOnnx:
    """Write the fp16 or int8 ONNX of ``fp32_onnx`` into ``folder`` (see
    :mod:`esr_deploy.precision.apply`); ``check`` validates an engine the way the compile
    gates it, which is what the int8 sensitivity search stops on."""
    assert profile.min is not None, "the exporter derives the minimum input first"
    calib = calibration_set(options.precision.calib_dir, sets, recipe, profile.min)
    out = folder / PRECISION_ONNX
    if target.precision == "fp16":
        inputs = validation_inputs(sets, recipe)
        return make_fp16(fp32_onnx, out, calib, inputs, options.precision, progress)

    def accept(candidate: Int8Result) -> tuple[bool, str]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PRECISION_ONNX
            onnx.save(candidate.model, str(path))
            built = backend.build(path, Path(tmp), target.precision, profile)
            results = check(backend.load(Path(tmp) / built.engine_file, built.settings))
        detail = "; ".join(
            f"{r.name}: drop {r.psnr_drop:.4f} dB, parity min {r.parity_min_psnr:.1f} dB"
            for r in results
        )
        return not any(r.failures() for r in results), detail

    return make_int8(
        fp32_onnx, out, calib, options.precision, accept, progress, backend.int8_kernels()
    )


def validation_inputs(sets: Sequence[ValidationSet], recipe: Recipe) -> list[np.ndarray]:
    """Every validation LR image as a model input (float32 1×3×H×W)."""
    return [model_input(p.lr, recipe).numpy() for s in sets for p in s.pairs]


def build_from_model(
    backend: ModelBackend,
    model: nn.Module,
    folder: Path,
    target: Target,
    recipe: Recipe,
    sets: Sequence[ValidationSet],
    profile: ShapeProfile,
    options: CompileOptions,
) -> ModelBuild:
    """The engine of a backend that compiles the PyTorch deploy form (AOTInductor); reduced
    precision calibrates on the same images as the ONNX precision passes."""
    calib = None
    if target.precision != "fp32":
        assert profile.min is not None, "the exporter derives the minimum input first"
        calib = calibration_set(options.precision.calib_dir, sets, recipe, profile.min)
    inputs = validation_inputs(sets, recipe)
    return backend.build_model(model, folder, target.precision, profile, calib, inputs)


def build_manifest(
    loaded: LoadedModel,
    target: Target,
    backend: Backend,
    export: ExportResult,
    engine_info: dict[str, Any],
    sets: Sequence[SetResult],
    latency: dict[str, Any],
    metrics: dict[str, Any],
    passes: Sequence[PassResult] = (),
) -> dict[str, Any]:
    recipe = loaded.recipe
    profile = recipe.profile.to_dict()
    profile["min"] = list(export.input_range.min_hw)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "target": target.name,
        "precision": target.precision,
        "backend": backend.name,
        "backend_version": backend.version(),
        "scale": recipe.scale,
        "data_range": recipe.data_range,
        "color_order": recipe.color_order,
        "layout": "NCHW",
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 3, "H", "W"]}],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": ["N", 3, f"H*{recipe.scale}", f"W*{recipe.scale}"],
            }
        ],
        "profile": profile,
        "checkpoint": {
            "path": str(loaded.checkpoint.path.resolve()),
            "sha256": loaded.checkpoint.sha256,
            "nested_key": loaded.checkpoint.nested_key,
            "placeholders": list(loaded.checkpoint.placeholders),
        },
        "recipe": recipe.to_dict(),
        "detection": loaded.detection,
        "arch": recipe.arch,
        "arch_args": dict(recipe.arch_args),
        "engine": engine_info,
        "reference_onnx": REFERENCE_ONNX,
        "export": export.to_dict(),
        "passes": [p.to_dict() for p in passes],
        "metrics": metrics,
        "validation": {s.name: s.to_dict() for s in sets},
        "latency_ms": latency,
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "esr_deploy_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def compile_model(
    options: CompileOptions,
    progress: Progress | None = None,
    on_note: Callable[[str], None] | None = None,
) -> CompileResult:
    """Run the whole pipeline; see the module docstring. Raises EsrDeployError subclasses.

    ``on_note`` receives sentences a user should see as they happen (which recipe was
    chosen, what was skipped); the CLI prints them.
    """
    progress = progress or NullProgress()
    torch.manual_seed(0)
    check_options(options)
    if options.target == AUTO:
        return compile_auto(options, progress, on_note)
    target, backend = require_available(options.target)
    if options.out is not None:
        check_writable(options.out)
    loaded = load_model(options.source)
    for note in loaded.notes:
        log.info("%s", note)
        if on_note is not None:
            on_note(note)
    recipe = loaded.recipe
    destination = options.out or options.engines_dir / f"{recipe.name}-{target.name}"
    check_writable(destination)
    sets = load_sets(options.val_dirs, recipe.scale)
    tolerance = recipe.tolerance(target.precision)
    if options.max_psnr_drop is not None and options.max_psnr_drop < tolerance.max_psnr_drop:
        tolerance = replace(tolerance, max_psnr_drop=options.max_psnr_drop)

    input_range = derive_input_range(loaded.model, recipe.scale)
    deployed = deploy_form(loaded, options, input_range, sets)
    deploy, pass_results = deployed.model, deployed.passes
    parity_reference = deploy if deployed.unpruned is not None else None
    with StagedBundle(destination) as staged:
        export = export_onnx(
            deploy,
            staged.dir / REFERENCE_ONNX,
            recipe.scale,
            recipe.data_range,
            max_hw=recipe.profile.max,
            input_range=input_range,
            check_inputs=export_check_inputs(
                [(p.name, p.lr) for p in sets[0].pairs],
                partial(model_input, recipe=recipe),
                input_range.min_hw,
                recipe.data_range,
            ),
            exporter=options.exporter,
        )
        reference = memoized(loaded.model)

        def check(session: EngineSession, quiet: bool = True) -> list[SetResult]:
            shown = NullProgress() if quiet else progress
            return [
                evaluate_set(s, reference, session.run, recipe, tolerance, shown, parity_reference)
                for s in sets
            ]

        profile = engine_profile(recipe, input_range)
        if isinstance(backend, ModelBackend):  # compiles the PyTorch deploy form, not the ONNX
            model_build = build_from_model(
                backend, deploy, staged.dir, target, recipe, sets, profile, options
            )
            built, precision_info = model_build.engine, model_build.precision_info
        else:
            source, precision_info = export.path, None
            if target.precision in PRECISION_ONNX_PRECISIONS:
                reduced = reduce_precision(
                    target,
                    backend,
                    staged.dir,
                    export.path,
                    recipe,
                    sets,
                    profile,
                    check,
                    options,
                    progress,
                )
                source, precision_info = reduced.path, reduced.info
            built = backend.build(source, staged.dir, target.precision, profile)
        engine_info = {
            "file": built.engine_file,
            "backend_version": built.backend_version,
            "device": dict(built.device),
            "settings": dict(built.settings),
        }
        session = backend.load(staged.dir / built.engine_file, built.settings)
        results = check(session, quiet=False)
        parity = check_batch(session, sets, recipe, input_range.min_hw, tolerance.parity_min_psnr)
        batch = {"range": export.to_dict()["batch"], "parity": parity}
        shapes = _usable_shapes(options.latency_shapes, export)
        if not backend.measures_latency:
            shapes = []
        if shapes:  # images/s at batch 1 and the batch profile's opt batch, first shape
            runs, warm = min(options.latency_runs, 10), options.latency_warmup
            batch["throughput"] = measure_throughput(session, shapes[0], recipe.data_range,
                                                     runs, warm)  # fmt: skip
        latency = measure_engine_latency(
            session,
            shapes,
            options.latency_runs,
            options.latency_warmup,
            recipe.data_range,
            progress,
            options.large_runs,
        )
        # the pass manager already counted both ends; count here only what it did not
        mm = metrics_256(deploy, pass_results[-1].after if pass_results else None)
        trained = metrics_256(loaded.model, pass_results[0].before) if pass_results else mm
        metrics = {
            "params": mm.params,
            "flops_256": mm.flops,
            "activations_256": mm.activations,
            "convs": mm.convs,
            "onnx_convs": export.stats.convs,
            "onnx_params": export.stats.params,
            "training_form": {
                "params": trained.params,
                "flops_256": trained.flops,
                "convs": trained.convs,
            },
        }
        manifest = build_manifest(
            loaded,
            target,
            backend,
            export,
            engine_info,
            results,
            latency,
            metrics,
            pass_results,
        )
        manifest["batch"] = batch
        if precision_info is not None:
            manifest["precision_onnx"] = dict(precision_info)
        pruning = pruning_report(
            deployed, options, results, backend, recipe, input_range, shapes, session
        )
        if pruning is not None:
            manifest["pruning"] = pruning
        failures = [f for r in results for f in r.failures()]
        if failures:
            manifest["failures"] = failures
            raise ValidationError(
                f"Validation of {recipe.name} on {target.name} failed — "
                + "; ".join(failures)
                + f" — nothing was written to {destination}. Fix the checkpoint, target or "
                f"validation set; loosen [tolerances.{target.precision}] in the recipe only "
                "where the loss is understood (--json prints every per-image number).",
                details=manifest,
            )
        manifest["report_figures"] = comparison_figures(
            staged.dir,
            sets[0].pairs[:COMPARISON_IMAGES],
            reference,
            session.run,
            recipe,
            engine_label=f"engine ({target.name})",
            set_name=sets[0].name,
        )
        write_report(staged.dir / REPORT, manifest)
        manifest = staged.write_manifest(manifest)
        bundle = staged.commit()
    return CompileResult(
        bundle=bundle, manifest=manifest, notes=loaded.notes, digest=staged.digest or ""
    )
