"""The per-target half of a compile: precision → build → validate, from a :class:`Frontend`.

:func:`build_target` writes the target's files (the fp32 reference ONNX, the precision ONNX
for fp16/int8, the engine) into a folder, loads the engine and validates it against the
frontend's reference on every validation set and at batch > 1. It publishes nothing: the
pipeline builds into the staging folder of the bundle, ``--target auto`` into a scratch
folder per candidate (:mod:`esr_deploy.compiling.auto`). Latency, the manifest and the report
follow in :mod:`esr_deploy.compiling.publish`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from esr_deploy.backends.base import Backend, EngineSession, ModelBackend, ModelBuild
from esr_deploy.bundle import REFERENCE_ONNX
from esr_deploy.compiling.frontend import Frontend
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.data import ValidationSet
from esr_deploy.errors import EsrDeployError
from esr_deploy.export import InputRange
from esr_deploy.precision.apply import PrecisionOnnx, make_fp16, make_int8
from esr_deploy.precision.calibration import calibration_set
from esr_deploy.precision.int8 import Int8Result
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.recipe import Recipe, ShapeProfile, Tolerances
from esr_deploy.targets import Target
from esr_deploy.validate.batch import check_batch
from esr_deploy.validate.parity import SetResult, evaluate_set, model_input

#: The ONNX at the target's precision (fp16 / Q/DQ int8) the engine is built from; TensorRT
#: consumes it as is.
PRECISION_ONNX = "model.onnx"
#: Precisions whose engine is built from a precision ONNX (bf16 is a runtime setting applied
#: to the fp32 ONNX).
PRECISION_ONNX_PRECISIONS = ("fp16", "int8")


class Check(Protocol):
    """Validates an engine on every set; quietly unless ``shown`` is given."""

    def __call__(
        self, session: EngineSession, shown: Progress | None = None
    ) -> list[SetResult]: ...


@dataclass(frozen=True)
class TargetBuild:
    """One target's engine, built in ``folder`` and validated (not yet published)."""

    target: Target
    backend: Backend
    folder: Path
    #: the manifest's ``engine`` section
    engine: dict[str, Any]
    precision_info: dict[str, Any] | None
    session: EngineSession
    results: list[SetResult]
    #: the manifest's ``batch`` section (range and batch parity)
    batch: dict[str, Any]
    tolerance: Tolerances
    #: this target's stages (precision, build, validate), in seconds
    seconds: dict[str, float]

    def failures(self) -> list[str]:
        return [f for r in self.results for f in r.failures()]


def engine_profile(recipe: Recipe, input_range: InputRange) -> ShapeProfile:
    """The recipe's shape profile with the smallest input the exporter derived."""
    return replace(recipe.profile, min=input_range.min_hw)


def target_tolerance(recipe: Recipe, precision: str, max_psnr_drop: float | None) -> Tolerances:
    """The recipe's tolerance for ``precision``, its PSNR drop budget tightened to
    ``max_psnr_drop`` when that is smaller."""
    tolerance = recipe.tolerance(precision)
    if max_psnr_drop is not None and max_psnr_drop < tolerance.max_psnr_drop:
        tolerance = replace(tolerance, max_psnr_drop=max_psnr_drop)
    return tolerance


def validation_inputs(sets: Sequence[ValidationSet], recipe: Recipe) -> list[np.ndarray]:
    """Every validation LR image as a model input (float32 1×3×H×W)."""
    return [model_input(p.lr, recipe).numpy() for s in sets for p in s.pairs]


def reduce_precision(
    target: Target,
    backend: Backend,
    folder: Path,
    fp32_onnx: Path,
    frontend: Frontend,
    profile: ShapeProfile,
    check: Check,
    options: CompileOptions,
    progress: Progress,
) -> PrecisionOnnx:
    """Write the fp16 or int8 ONNX of ``fp32_onnx`` into ``folder`` (see
    :mod:`esr_deploy.precision.apply`); ``check`` validates an engine the way the compile
    gates it, which is what the int8 sensitivity search stops on."""
    assert profile.min is not None, "the exporter derives the minimum input first"
    recipe, sets = frontend.recipe, frontend.sets
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


def build_from_model(
    backend: ModelBackend,
    frontend: Frontend,
    folder: Path,
    target: Target,
    profile: ShapeProfile,
    options: CompileOptions,
) -> ModelBuild:
    """The engine of a backend that compiles the PyTorch deploy form (AOTInductor); reduced
    precision calibrates on the same images as the ONNX precision passes."""
    if frontend.deployed is None:
        raise EsrDeployError(
            f"{target.name} compiles the PyTorch model — an ONNX file was given, which has "
            "none — choose an ONNX Runtime, OpenVINO or TensorRT target, or compile the "
            "checkpoint."
        )
    recipe, sets = frontend.recipe, frontend.sets
    calib = None
    if target.precision != "fp32":
        assert profile.min is not None, "the exporter derives the minimum input first"
        calib = calibration_set(options.precision.calib_dir, sets, recipe, profile.min)
    inputs = validation_inputs(sets, recipe)
    model = frontend.deployed.model
    return backend.build_model(model, folder, target.precision, profile, calib, inputs)


def make_check(frontend: Frontend, tolerance: Tolerances) -> Check:
    """Validate an engine on every set against the frontend's reference (quietly unless a
    progress is given)."""

    def check(session: EngineSession, shown: Progress | None = None) -> list[SetResult]:
        shown = shown or NullProgress()
        run = frontend.reference, frontend.parity_reference
        return [
            evaluate_set(s, run[0], session.run, frontend.recipe, tolerance, shown, run[1])
            for s in frontend.sets
        ]

    return check


def build_target(
    frontend: Frontend,
    target: Target,
    backend: Backend,
    folder: Path,
    options: CompileOptions,
    progress: Progress,
) -> TargetBuild:
    """Precision → build → validate ``target`` from ``frontend`` into ``folder`` (see the
    module docstring). Raises :class:`~esr_deploy.errors.ValidationError` when batch parity
    fails; failures on the validation sets are returned in the results, not raised."""
    timer = StageTimer()
    recipe = frontend.recipe
    tolerance = target_tolerance(recipe, target.precision, options.max_psnr_drop)
    check = make_check(frontend, tolerance)
    profile = engine_profile(recipe, frontend.input_range)
    fp32_onnx = folder / REFERENCE_ONNX
    shutil.copyfile(frontend.export.path, fp32_onnx)
    precision_info: dict[str, Any] | None = None
    if isinstance(backend, ModelBackend):  # compiles the PyTorch deploy form, not the ONNX
        with timer.stage("build"):
            model_build = build_from_model(backend, frontend, folder, target, profile, options)
        built = model_build.engine
        info = model_build.precision_info
        precision_info = dict(info) if info is not None else None
    else:
        source = fp32_onnx
        if target.precision in PRECISION_ONNX_PRECISIONS:
            with timer.stage("precision"):
                reduced = reduce_precision(
                    target, backend, folder, fp32_onnx, frontend, profile, check, options,
                    progress,
                )  # fmt: skip
            source, precision_info = reduced.path, dict(reduced.info)
        with timer.stage("build"):
            built = backend.build(source, folder, target.precision, profile)
    session = backend.load(folder / built.engine_file, built.settings)
    with timer.stage("validate"):
        results = check(session, progress)
        min_hw, floor = frontend.input_range.min_hw, tolerance.parity_min_psnr
        parity = check_batch(session, frontend.sets, recipe, min_hw, floor)
    engine = {
        "file": built.engine_file,
        "backend_version": built.backend_version,
        "device": dict(built.device),
        "settings": dict(built.settings),
    }
    batch = {"range": frontend.export.to_dict()["batch"], "parity": parity}
    return TargetBuild(
        target=target, backend=backend, folder=folder, engine=engine,
        precision_info=precision_info, session=session, results=results, batch=batch,
        tolerance=tolerance, seconds=timer.seconds(),
    )  # fmt: skip
