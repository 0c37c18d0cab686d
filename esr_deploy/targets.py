"""Targets: ``<backend>-<precision>``, what each needs, and whether it can run here.

One probe (:func:`availability`) serves ``esr-deploy targets``, ``compile`` (which refuses an
unavailable target before doing any work) and the test suite's skips. Backend modules are
imported here, lazily, and nowhere else.
"""

from __future__ import annotations

import importlib
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
    Target("ort-int8", "onnxruntime", "int8", "ONNX Runtime CPU, explicit Q/DQ int8 (QLinearConv)"),
    Target("ort-fp16", "onnxruntime", "fp16", "ONNX Runtime CPU, float16 (CPUs with fp16 kernels)"),
    Target(
        "onnx-fp16",
        "portable",
        "fp16",
        "float16 ONNX for TensorRT, checked here with float16 rounding emulated",
    ),
    Target("onnx-int8", "portable", "int8", "explicit Q/DQ int8 ONNX for TensorRT, checked here"),
    Target("trt-fp32", "tensorrt", "fp32", "TensorRT, float32"),
    Target("trt-fp16", "tensorrt", "fp16", "TensorRT, strongly typed float16 ONNX"),
    Target("trt-int8", "tensorrt", "int8", "TensorRT, explicit Q/DQ int8 ONNX"),
)

_BACKEND_CLASSES = {"onnxruntime": "OnnxRuntimeCPU", "portable": "PortableOnnx"}


def get_target(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise EsrDeployError(
        f"Unknown target '{name}' — targets are: {', '.join(t.name for t in TARGETS)} "
        "(`esr-deploy targets` says which run here)."
    )


def _tensorrt_availability() -> Availability:
    """TensorRT needs the real library (not only ``tensorrt-stubs``) and a CUDA GPU."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        trt = None
    if trt is None or not hasattr(trt, "Builder"):
        seen = "only its type stubs are installed" if trt is not None else "it is not installed"
        return Availability(
            False,
            f"TensorRT cannot be used: {seen} (TensorRT needs an NVIDIA GPU; pip install "
            "'esr-deploy[tensorrt]' on a GPU machine)",
        )
    import torch

    if not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU is visible to PyTorch on this machine")
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
