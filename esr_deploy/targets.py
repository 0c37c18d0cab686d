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
    variant: str | None = None  # constructor argument of the backend class, if any


TARGETS: tuple[Target, ...] = (
    Target("ort-fp32", "onnxruntime", "fp32", "ONNX Runtime CPU, float32"),
    Target("ort-int8", "onnxruntime", "int8", "ONNX Runtime CPU, explicit Q/DQ int8 (QLinearConv)"),
    Target("ort-fp16", "onnxruntime", "fp16", "ONNX Runtime CPU, float16 (CPUs with fp16 kernels)"),
    Target("ov-fp32", "openvino", "fp32", "OpenVINO CPU, float32"),
    Target("ov-bf16", "openvino", "bf16", "OpenVINO CPU, bfloat16 (AVX-512 BF16 / AMX)"),
    Target("ov-int8", "openvino", "int8", "OpenVINO CPU, explicit Q/DQ int8 ONNX"),
    Target(
        "onnx-fp16",
        "portable",
        "fp16",
        "float16 ONNX for TensorRT, checked here with float16 rounding emulated",
    ),
    Target("onnx-int8", "portable", "int8", "explicit Q/DQ int8 ONNX for TensorRT, checked here"),
    Target("trt-fp32", "tensorrt", "fp32", "TensorRT, float32 (TF32 off)"),
    Target("trt-fp16", "tensorrt", "fp16", "TensorRT, strongly typed float16 ONNX"),
    Target("trt-int8", "tensorrt", "int8", "TensorRT, explicit Q/DQ int8 ONNX"),
    Target(
        "ort-cuda-fp32", "onnxruntime_gpu", "fp32", "ONNX Runtime CUDA provider, float32", "cuda"
    ),
    Target(
        "ort-cuda-fp16",
        "onnxruntime_gpu",
        "fp16",
        "ONNX Runtime CUDA provider, float16 ONNX",
        "cuda",
    ),
    Target(
        "ort-trt-fp16",
        "onnxruntime_gpu",
        "fp16",
        "ONNX Runtime TensorRT provider, float16 ONNX",
        "tensorrt",
    ),
    Target(
        "aoti-cpu-fp32", "aoti", "fp32", "AOTInductor package (.pt2) for this CPU, float32", "cpu"
    ),
    Target(
        "aoti-cpu-bf16",
        "aoti",
        "bf16",
        "AOTInductor package for this CPU, bfloat16 where safe (native bf16 CPUs)",
        "cpu",
    ),
    Target(
        "aoti-cuda-fp32", "aoti", "fp32", "AOTInductor package for this CUDA GPU, float32", "cuda"
    ),
    Target(
        "aoti-cuda-fp16",
        "aoti",
        "fp16",
        "AOTInductor package for this CUDA GPU, float16 where the ranges allow",
        "cuda",
    ),
)

_BACKEND_CLASSES = {
    "onnxruntime": "OnnxRuntimeCPU",
    "portable": "PortableOnnx",
    "tensorrt": "TensorRT",
    "onnxruntime_gpu": "OnnxRuntimeGPU",
    "openvino": "OpenVinoCPU",
    "aoti": "AOTInductor",
}


def get_target(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise EsrDeployError(
        f"Unknown target '{name}' — targets are: {', '.join(t.name for t in TARGETS)}, and "
        "auto (the fastest CPU target that passes validation; `esr-deploy targets` says "
        "which run here)."
    )


def backend_for(target: Target) -> Backend:
    module = importlib.import_module(f"esr_deploy.backends.{target.backend}")
    cls = getattr(module, _BACKEND_CLASSES[target.backend])
    backend = cls(target.variant) if target.variant else cls()
    assert isinstance(backend, Backend)
    return backend


#: packages of the compile side (the ``compile`` extra), absent from a runtime-only install
COMPILE_SIDE = frozenset({"torch", "onnxsim", "onnxscript", "torch_pruning"})


def missing_compile_side(exc: BaseException) -> str | None:
    """The compile-side package whose absence raised ``exc`` (a runtime-only install), else
    None."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    root = (exc.name or "").split(".")[0]
    return root if root in COMPILE_SIDE else None


def availability(target: Target) -> Availability:
    try:
        backend = backend_for(target)
    except ModuleNotFoundError as exc:
        missing = missing_compile_side(exc)
        if missing is None:
            raise
        return Availability(
            False,
            f"its backend needs {missing}, which this runtime-only install lacks "
            "(pip install 'esr-deploy[compile]')",
        )
    return backend.availability(target.precision)


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
