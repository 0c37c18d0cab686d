"""This CPU: its model, cores and the ISA extensions the CPU engines depend on.

Nothing here assumes an ISA; it reads what the kernel reports (``/proc/cpuinfo``) and says
what follows from it. The CPUs esr-deploy is built and run on differ (AVX2-only Zen 3,
AVX-512 with VNNI/BF16 Zen 4, AMX Sapphire Rapids), so every precision decision that depends
on the hardware goes through one function here and is recorded in the manifest.

- **bf16** is *native* when the CPU has AVX-512 BF16 (``avx512_bf16``: ``vdpbf16ps``) or AMX
  BF16 (``amx_bf16``). Elsewhere runtimes emulate it with float32 arithmetic plus rounding,
  which is slower than float32 (PyTorch eager bf16 on a Zen 3 ran 7× slower than fp32), so no
  bf16 target is offered there.
- **int8** dot products accumulate straight into int32 with VNNI (``avx512_vnni``,
  ``avx_vnni``) or AMX (``amx_int8``). Without them the kernels may saturate: whether they do
  is *measured* per backend (:mod:`esr_deploy.precision.int8_kernels`), not inferred from
  these flags, which are recorded beside the measurement.

``ESR_CPUINFO`` names another file to read instead of ``/proc/cpuinfo``: an emulated CPU
(``qemu-x86_64 -cpu EPYC-Milan``) shows the host's ``/proc/cpuinfo``, so tests that run under
emulation pass the emulated CPU's flags this way.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Any

#: the flags recorded in manifests and compared when a bundle is loaded elsewhere
RECORDED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT32_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def default_threads() -> int:
    """Intra-op threads: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """The first ``model name`` and the first ``flags`` line of a ``/proc/cpuinfo`` text."""
    model: str | None = None
    flags: frozenset[str] | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return model, flags or frozenset()


@functools.cache
def _read() -> tuple[str | None, frozenset[str]]:
    source = Path(os.environ.get("ESR_CPUINFO", "/proc/cpuinfo"))
    try:
        return parse_cpuinfo(source.read_text())
    except OSError:
        return None, frozenset()


def flags() -> frozenset[str]:
    """Every ISA flag this CPU reports (empty where the kernel does not say)."""
    return _read()[1]


def cpu_info() -> dict[str, Any]:
    """CPU model, cores and the ISA flags that matter for the CPU engines (manifest form)."""
    model, have = _read()
    info: dict[str, Any] = {
        "kind": "cpu",
        "machine": platform.machine(),
        "cores": default_threads(),
    }
    if model is not None:
        info["model"] = model
    if have:
        info["flags"] = [f for f in RECORDED_FLAGS if f in have]
    return info


def describe(have: frozenset[str] | None = None) -> str:
    """One line for messages: ``AMD EPYC (avx2, fma, avx512f, …)``."""
    model, found = _read()
    have = found if have is None else have
    shown = [f for f in RECORDED_FLAGS if f in have]
    return f"{model or 'this CPU'} ({', '.join(shown) or 'no AVX2/AVX-512/AMX flags'})"


def bf16_unavailable_reason(have: frozenset[str] | None = None) -> str:
    """Empty where bf16 is native on this CPU; else why no bf16 target is offered."""
    have = flags() if have is None else have
    if any(f in have for f in NATIVE_BF16_FLAGS):
        return ""
    return (
        f"bf16 is not native on {describe(have)}: it needs AVX-512 BF16 or AMX-BF16, and "
        "emulated bf16 is slower than fp32 — use an fp32 or int8 target here"
    )


def has_int32_dot_products(have: frozenset[str] | None = None) -> bool:
    """Whether the CPU has int8 dot products that accumulate into int32 (VNNI or AMX)."""
    have = flags() if have is None else have
    return any(f in have for f in INT32_DOT_PRODUCT_FLAGS)
