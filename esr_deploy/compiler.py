"""Former home of the compile pipeline, now :mod:`esr_deploy.compiling`; these names are
re-exported for the modules, tests and benchmarks that still import them from here."""

from __future__ import annotations

from esr_deploy.compiling.auto import AUTO, AUTO_CANDIDATES, AUTO_MAX_PSNR_DROP, compile_auto
from esr_deploy.compiling.backend import PRECISION_ONNX, engine_profile
from esr_deploy.compiling.frontend import (
    DeployModels,
    deploy_form,
    load_sets,
    memoized,
    metrics_256,
    run_passes,
    verification_inputs,
)
from esr_deploy.compiling.options import (
    DEFAULT_LATENCY_RUNS,
    DEFAULT_LATENCY_SHAPES,
    LARGE_SHAPE_PIXELS,
    LARGE_SHAPE_RUNS,
    CompileOptions,
    CompileResult,
    check_options,
)
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.compiling.publish import measure_engine_latency, scratch_engine
from esr_deploy.loading.detect import LoadedModel, ModelSource, load_model

__all__ = [
    "AUTO",
    "AUTO_CANDIDATES",
    "AUTO_MAX_PSNR_DROP",
    "DEFAULT_LATENCY_RUNS",
    "DEFAULT_LATENCY_SHAPES",
    "LARGE_SHAPE_PIXELS",
    "LARGE_SHAPE_RUNS",
    "CompileOptions",
    "CompileResult",
    "DeployModels",
    "LoadedModel",
    "PRECISION_ONNX",
    "ModelSource",
    "check_options",
    "compile_auto",
    "compile_model",
    "deploy_form",
    "engine_profile",
    "load_model",
    "load_sets",
    "measure_engine_latency",
    "memoized",
    "metrics_256",
    "run_passes",
    "scratch_engine",
    "verification_inputs",
]
