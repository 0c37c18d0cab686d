"""Targets: ``<backend>-<precision>``, what each needs, and whether it can run here.

One probe (:func:`availability`) serves ``esr-deploy targets``, ``compile`` (which refuses an
unavailable target before doing any work) and the test suite's skips. Backend modules are
imported here, lazily, and nowhere else.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from esr_deploy.backends.base import Availability, Backend
from esr_deploy.errors import EsrDeployError, TargetUnavailable


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # module under esr_deploy.backends
    precision: str
    description: str


TARGETS: tuple[Target, ...] = (
    Target("ort-fp32", "onnxruntime", "fp32", "ONNX Runtime CPU, float32"),
    Target("trt-fp32", "tensorrt", "fp32", "TensorRT, float32"),
    Target("trt-fp16", "tensorrt", "fp16", "TensorRT, strongly typed float16 ONNX"),
    Target("trt-int8", "tensorrt", "int8", "TensorRT, explicit Q/DQ int8 ONNX"),
)

_BACKEND_CLASSES = {"onnxruntime": "OnnxRuntimeCPU"}


def get_target(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise EsrDeployError(
        f"Unknown target '{name}' — targets are: {', '.join(t.name for t in TARGETS)} "
        "(`esr-deploy targets` says which run here)."
    )


def _tensorrt_availability() -> Availability:
    if importlib.util.find_spec("tensorrt") is None:
        return Availability(
            False,
            "TensorRT is not installed (it needs an NVIDIA GPU; pip install "
            "'esr-deploy[tensorrt]' on a GPU machine",
        )
    return Availability(False, "the TensorRT backend is not implemented in this version")


def backend_for(target: Target) -> Backend:
    module = importlib.import_module(f"esr_deploy.backends.{target.backend}")
    return getattr(module, _BACKEND_CLASSES[target.backend])()  # type: ignore[no-any-return]


def availability(target: Target) -> Availability:
    if target.backend == "tensorrt":
        return _tensorrt_availability()
    return backend_for(target).availability(target.precision)


def require_available(name: str) -> tuple[Target, Backend]:
    """The target and its backend, or :class:`TargetUnavailable` saying why and what runs."""
    target = get_target(name)
    status = availability(target)
    if not status.ok:
        usable = [t.name for t in TARGETS if availability(t).ok]
        raise TargetUnavailable(
            f"Target '{name}' cannot run on this machine — {status.reason}. — Targets "
            f"available here: {', '.join(usable) or 'none'}."
        )
    return target, backend_for(target)
