"""This GPU: whether a CUDA device is visible, what it is, and a key for per-GPU caches.

The GPU backends (TensorRT, ONNX Runtime GPU, AOTInductor CUDA) share these probes, so that
``esr-deploy targets``, the test skips and the manifests all say the same about a machine.
The device is read through PyTorch's CUDA API (a CUDA build of PyTorch is what the GPU
targets run with); ``torch`` is imported when a probe runs, not when this module is imported.

- A GPU is *fast enough* for a precision when its compute capability is at least
  :data:`MIN_COMPUTE_CAPABILITY` for it (float16 arithmetic from 5.3, int8 dot products, DP4A,
  from 6.1).
- A compute capability is written ``"major.minor"`` in manifests; :func:`cc_tuple` turns it
  (or ``(major, minor)``) into a tuple that compares in order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from esr_deploy.backends.base import Availability

#: Lowest compute capability with fast arithmetic for each precision (float16: 5.3,
#: int8 dot products DP4A: 6.1).
MIN_COMPUTE_CAPABILITY: Mapping[str, tuple[int, int]] = {
    "fp32": (0, 0),
    "fp16": (5, 3),
    "int8": (6, 1),
}


def gpu_info() -> dict[str, Any]:
    """The current CUDA device as a manifest records it, through PyTorch's CUDA API:
    ``kind``, ``name``, ``compute_capability`` ("major.minor"), ``memory_mib``, ``cuda``
    (PyTorch's CUDA version). ``name`` and ``compute_capability`` are ``None`` without a
    visible GPU."""
    import torch

    info: dict[str, Any] = {
        "kind": "gpu",
        "name": None,
        "compute_capability": None,
        "cuda": torch.version.cuda,
    }
    if not torch.cuda.is_available():
        return info
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    info["name"] = torch.cuda.get_device_name(index)
    info["compute_capability"] = f"{major}.{minor}"
    info["memory_mib"] = int(torch.cuda.get_device_properties(index).total_memory) >> 20
    return info


def cuda_availability(precision: str) -> Availability:
    """A CUDA GPU visible to PyTorch, fast enough for ``precision``."""
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda
        seen = (
            f"PyTorch {torch.__version__} built for CUDA {build}"
            if build
            else f"PyTorch {torch.__version__} is a CPU-only build"
        )
        return Availability(
            False,
            f"no CUDA GPU is visible to PyTorch on this machine ({seen}) — run on a machine "
            "with an NVIDIA GPU, its driver and a CUDA build of PyTorch",
        )
    cc = torch.cuda.get_device_capability()
    need = MIN_COMPUTE_CAPABILITY.get(precision, (0, 0))
    if cc < need:
        return Availability(
            False,
            f"{precision} needs a GPU of compute capability ≥ {need[0]}.{need[1]}; "
            f"{torch.cuda.get_device_name()} has {cc[0]}.{cc[1]} — use an fp32 target "
            "or a newer GPU",
        )
    return Availability(True)


def cc_tuple(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"8.6"`` or ``(8, 6)`` → ``(8, 6)``; ``None`` (no GPU) stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        return (int(major), int(minor or 0))
    return (int(value[0]), int(value[1]))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def gpu_slug(gpu_name: str, compute_capability: str | Sequence[int]) -> str:
    """``"NVIDIA H100 80GB HBM3", "9.0"`` → ``"nvidia-h100-80gb-hbm3-sm90"``: a file-name-safe
    key for caches that are valid for one GPU model only."""
    cc = cc_tuple(compute_capability)
    assert cc is not None
    return f"{_slug(gpu_name)}-sm{cc[0]}{cc[1]}"
