"""Targets: ``<backend>-<precision>``, what each needs, and whether it can run here.

One probe (:func:`availability`) serves ``esr-deploy targets``, ``compile`` (which refuses an
unavailable target before doing any work) and the test suite's skips. Backend modules are
imported here, lazily, and nowhere else.
"""

from __future__ import annotations

import importlib
import multiprocessing
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
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


#: backends whose modules import torch (about 1.5 s of CPU): probed in a forked process
_TORCH_BACKENDS = frozenset({"tensorrt", "onnxruntime_gpu", "aoti"})


def _probe(groups: Sequence[Sequence[Target]]) -> list[list[Availability]]:
    return [[availability(t) for t in group] for group in groups]


def _probe_torch_side(groups: list[list[Target]]) -> Future[list[list[Availability]]] | None:
    """The torch backends' probes started in a forked process, so that importing torch runs on
    another core while this process probes the rest; None where fork is not the safe default
    (not Linux), torch is imported already, or no process can be started."""
    if not groups or sys.platform != "linux" or "torch" in sys.modules:
        return None
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    except OSError:
        return None
    future = pool.submit(_probe, groups)
    pool.shutdown(wait=False)
    return future


def availability_all(targets: Sequence[Target] = TARGETS) -> list[tuple[Target, Availability]]:
    """Every target with its availability, in ``targets``' order: what ``esr-deploy targets``
    prints, probed in parallel: the backends that import torch in a forked process, the others
    on threads here (importing a backend, starting its runtime and timing its int8 kernels
    mostly waits on native code, which releases the GIL). Each answer is
    :func:`availability`'s."""
    groups: dict[str, list[Target]] = {}
    for target in targets:
        groups.setdefault(target.backend, []).append(target)
    heavy = [name for name in groups if name in _TORCH_BACKENDS]
    forked = _probe_torch_side([groups[name] for name in heavy])
    here = [name for name in groups if forked is None or name not in heavy]
    with ThreadPoolExecutor(max_workers=max(len(here), 1)) as pool:
        probed = dict(zip(here, pool.map(lambda n: _probe([groups[n]])[0], here), strict=True))
    if forked is not None:
        try:
            probed.update(zip(heavy, forked.result(), strict=True))
        except BrokenProcessPool:  # the child died (out of memory, killed): probe here
            probed.update(zip(heavy, _probe([groups[name] for name in heavy]), strict=True))
    found = {
        t.name: a
        for name, group in groups.items()
        for t, a in zip(group, probed[name], strict=True)
    }
    return [(t, found[t.name]) for t in targets]


def require_available(name: str) -> tuple[Target, Backend]:
    """The target and its backend, or :class:`TargetUnavailable` saying why and what runs."""
    target = get_target(name)
    status = availability(target)
    if not status.ok:
        usable = [t.name for t, a in availability_all() if a.ok]
        raise TargetUnavailable(
            f"Target '{name}' cannot run on this machine — {status.reason}. — Targets "
            f"available here: {', '.join(usable) or 'none'}."
        )
    return target, backend_for(target)
