"""From the fp32 ONNX to the ONNX of the target's precision (what the engine is built from).

- ``fp16``: calibrate (``absmax`` of every tensor), then the :class:`~.passes.ConvertFp16`
  pass, whose guarantee ``fp16-in-range`` is checked with :func:`~.base.fp16_range` on the given
  images: no float16 tensor of the result leaves the float16 range (float16 rounding
  emulated).
- ``int8``: calibrate (histograms), then the :class:`~.passes.QuantizeInt8` pass with the
  chosen threshold method and the weight range of the target's kernels, through the
  sensitivity search (:mod:`esr_deploy.precision.sensitivity`), which keeps layers in float
  until ``accept`` passes.

Both passes run under :class:`~.base.PrecisionPassManager`, which checks what each requires
of its input and guarantees of its output.

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

from esr_deploy.errors import DataError, EsrDeployError
from esr_deploy.precision import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from esr_deploy.precision.base import PrecisionContext, PrecisionPassManager
from esr_deploy.precision.calibration import CalibrationSet, collect_stats
from esr_deploy.precision.int8 import INT8_MAX, name_nodes, sensitivity_candidates
from esr_deploy.precision.int8_kernels import Int8Kernels
from esr_deploy.precision.passes import ConvertFp16, QuantizeInt8
from esr_deploy.precision.sensitivity import Accept, Quantize, SensitivityResult, search
from esr_deploy.progress import NullProgress, Progress

log = logging.getLogger(__name__)


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


def make_fp16(
    fp32_path: Path,
    out_path: Path,
    calib: CalibrationSet,
    check_inputs: Sequence[np.ndarray],
    options: PrecisionOptions,
    progress: Progress | None = None,
) -> PrecisionOnnx:
    model = name_nodes(onnx.load(str(fp32_path)))
    stats = collect_stats(model, calib, progress, options.cache_dir)
    manager = PrecisionPassManager(
        [ConvertFp16(stats.absmax())], PrecisionContext(check_inputs=check_inputs)
    )
    converted, (record,) = manager.run(model)
    onnx.save(converted, str(out_path))
    info = {
        "precision": "fp16",
        "onnx": out_path.name,
        "calibration": {**calib.to_dict(), "from_cache": stats.from_cache},
        **record.info,
        **record.facts,
        "guarantees": sorted(ConvertFp16.guarantees),
    }
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
    candidates = [n for n in sensitivity_candidates(model) if n not in options.keep_float]

    def run_search(fp32: onnx.ModelProto, quantize: Quantize) -> SensitivityResult:
        return search(fp32, quantize, candidates, calib.inputs, accept, progress)

    quantize = QuantizeInt8(
        lambda t: stats.amax(t, options.method, options.percentile),
        options.keep_float,
        weight_max,
        run_search if options.search else None,
    )
    manager = PrecisionPassManager([quantize], PrecisionContext(weight_max=weight_max))
    quantized, (record,) = manager.run(model)
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
        **record.info,
        "guarantees": sorted(QuantizeInt8.guarantees),
    }
    if kernels is not None:
        info["int8_kernels"] = kernels.to_dict()
    onnx.save(quantized, str(out_path))
    return PrecisionOnnx(out_path, info)
