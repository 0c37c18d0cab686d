"""From the fp32 ONNX to the ONNX of the target's precision (what the engine is built from).

- ``fp16``: calibrate (``absmax`` of every tensor), :func:`esr_deploy.precision.fp16.convert_fp16`,
  then :func:`fp16_range` checks on the given images that no float16 tensor of the result
  leaves the float16 range (by running it with float16 rounding emulated).
- ``int8``: calibrate (histograms), :func:`esr_deploy.precision.int8.quantize_int8` with the
  chosen threshold method, then the sensitivity search
  (:mod:`esr_deploy.precision.sensitivity`) keeps layers in float until ``accept`` passes.

The returned ``info`` is the manifest's ``precision`` section: calibration data and cache
use, what stayed in higher precision and why, and the search's steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from esr_deploy.errors import DataError, EsrDeployError, ValidationError
from esr_deploy.precision import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from esr_deploy.precision.calibration import CalibrationSet, collect_stats
from esr_deploy.precision.int8 import (
    INT8_MAX,
    Int8Result,
    name_nodes,
    quantize_int8,
    sensitivity_candidates,
)
from esr_deploy.precision.int8_kernels import Int8Kernels
from esr_deploy.precision.sensitivity import Accept, search
from esr_deploy.progress import NullProgress, Progress

log = logging.getLogger(__name__)

FP16_MAX = 65504.0


@dataclass(frozen=True)
class PrecisionOptions:
    calib_dir: Path | None = None
    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    #: nodes the user keeps in float whatever the search says (int8)
    keep_float: tuple[str, ...] = ()
    #: run the sensitivity search (int8); without it every quantisable layer is int8
    search: bool = True
    cache_dir: Path | None = None


def check_precision_options(options: PrecisionOptions) -> None:
    if options.method not in METHODS:
        raise EsrDeployError(
            f"Unknown calibration method '{options.method}' — choose one of {', '.join(METHODS)}."
        )
    if options.calib_dir is not None and not options.calib_dir.is_dir():
        raise DataError(
            f"Calibration folder {options.calib_dir} does not exist or is not a folder — pass "
            "--calib a folder of LR images (png, jpg, ...)."
        )
    if not 50.0 < options.percentile <= 100.0:  # also refuses NaN
        raise EsrDeployError(
            f"--calib-percentile must be in (50, 100], got {options.percentile} — e.g. 99.999."
        )


@dataclass(frozen=True)
class PrecisionOnnx:
    path: Path
    info: dict[str, Any] = field(default_factory=dict)


def fp16_range(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> tuple[float, str]:
    """Largest |value| any float16 tensor of ``model`` takes on ``inputs`` (before rounding)
    and the tensor that takes it; float16 rounding is emulated at every op boundary."""
    from esr_deploy.backends.onnxruntime import cpu_session
    from esr_deploy.precision.fp16 import emulate_fp16

    emulated = emulate_fp16(model, expose_raw=True)
    session = cpu_session(emulated.SerializeToString(), optimize=False)
    names = [o.name for o in session.get_outputs()]
    raw = [i for i, n in enumerate(names) if n.endswith("__raw")]
    worst, where = 0.0, ""
    for x in inputs:
        outs = session.run(None, {session.get_inputs()[0].name: x})
        for i in raw:
            a = outs[i]
            m = float(np.max(np.abs(a))) if a.size else 0.0
            if not np.isfinite(m) or m > worst:
                worst, where = (
                    (float("inf") if not np.isfinite(m) else m),
                    names[i][: -len("__raw")],
                )
    return worst, where


def make_fp16(
    fp32_path: Path,
    out_path: Path,
    calib: CalibrationSet,
    check_inputs: Sequence[np.ndarray],
    options: PrecisionOptions,
    progress: Progress | None = None,
) -> PrecisionOnnx:
    from esr_deploy.precision.fp16 import convert_fp16

    model = name_nodes(onnx.load(str(fp32_path)))
    stats = collect_stats(model, calib, progress, options.cache_dir)
    result = convert_fp16(model, stats.absmax())
    worst, where = fp16_range(result.model, check_inputs)
    onnx.save(result.model, str(out_path))
    info = {
        "precision": "fp16",
        "onnx": out_path.name,
        "calibration": {**calib.to_dict(), "from_cache": stats.from_cache},
        "fp16": result.to_dict(),
        "fp16_max_abs_on_validation": worst,
        "fp16_max_abs_tensor": where,
    }
    if worst >= FP16_MAX:
        raise ValidationError(
            f"The float16 ONNX overflows on the validation images — tensor '{where}' reaches "
            f"{worst:.4g} (float16 max {FP16_MAX:.0f}) although the calibration images kept it "
            "in range — calibrate on images like the validation ones (--calib DIR).",
            details={"precision": info},
        )
    return PrecisionOnnx(out_path, info)


def make_int8(
    fp32_path: Path,
    out_path: Path,
    calib: CalibrationSet,
    options: PrecisionOptions,
    accept: Accept,
    progress: Progress | None = None,
    kernels: Int8Kernels | None = None,
) -> PrecisionOnnx:
    """``kernels``: what the engine's runtime measured on this CPU; its ``weight_max`` sets
    the weights' range (None: a runtime that accumulates in int32, full ±127)."""
    progress = progress or NullProgress()
    weight_max = INT8_MAX if kernels is None else kernels.weight_max
    if weight_max is None:
        raise EsrDeployError(
            f"int8 is not offered on this CPU — {kernels.reason if kernels else ''}."
        )
    model = name_nodes(onnx.load(str(fp32_path)))
    stats = collect_stats(model, calib, progress, options.cache_dir)

    def quantize(exclude: Sequence[str]) -> Int8Result:
        return quantize_int8(
            model,
            lambda t: stats.amax(t, options.method, options.percentile),
            (*options.keep_float, *exclude),
            weight_max,
        )

    candidates = [n for n in sensitivity_candidates(model) if n not in options.keep_float]
    info: dict[str, Any] = {
        "precision": "int8",
        "onnx": out_path.name,
        "calibration": {
            **calib.to_dict(),
            "method": options.method,
            "percentile": options.percentile if options.method == "percentile" else None,
            "from_cache": stats.from_cache,
        },
        "activations": "per-tensor symmetric int8, zero point 0",
        "weights": f"per-output-channel symmetric int8 in ±{weight_max}, bias float32",
        "kept_float_by_user": list(options.keep_float),
    }
    if kernels is not None:
        info["int8_kernels"] = kernels.to_dict()
    if options.search:
        found = search(model, quantize, candidates, calib.inputs, accept, progress)
        result = found.result
        info["search"] = found.to_dict()
    else:
        result = quantize(())
    info["int8"] = result.to_dict()
    onnx.save(result.model, str(out_path))
    return PrecisionOnnx(out_path, info)
