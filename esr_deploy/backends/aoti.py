"""AOTInductor backend (targets ``aoti-cpu-fp32``, ``aoti-cpu-bf16``, ``aoti-cuda-fp32``,
``aoti-cuda-fp16``): the deploy-form PyTorch model compiled ahead of time into a ``.pt2``
package that a server loads without the model code.

Build (:meth:`AOTInductor.build_model`):

1. ``torch.export.export`` of the deploy form on the target device with a dynamic batch
   (1..:data:`MAX_BATCH`) and dynamic H and W from the profile's ``min`` up to the longer
   side of its ``max`` (so portrait and landscape frames both fit). Where export refuses
   that range (RLFN's ESA pools to 1×1 for LR sides 15..20, a size export specialises), the
   smallest minimum it accepts is searched (same offset on both axes, bisection up to
   :data:`MIN_SEARCH` pixels above) and recorded as ``min_hw``.
2. Reduced precision (``bf16`` on CPU, ``fp16`` on CUDA): the rules of the fp16 ONNX pass
   on the exported ATen graph (:mod:`esr_deploy.precision.torch_graph`): ranges measured on
   the calibration images, unsafe ops and ops that come near the dtype's range stay float32
   behind explicit casts, input and output stay float32; the largest value a
   low-precision node reaches on the validation images must stay inside the range. The
   converted graph is exported again.
3. ``torch._inductor.aoti_compile_and_package`` with freezing (weights are constants:
   folded, cast and laid out at compile time) into ``engine.pt2``.

Load: ``torch._inductor.aoti_load_package``; the session takes and returns float32 NCHW,
refuses inputs outside the compiled range with the range, and on CUDA replays a CUDA graph
per input shape (captured after one plain run; a capture failure falls back to plain runs).

The package holds machine code for one device and one PyTorch: the manifest records the
CPU (model and ISA flags) or the GPU (name, compute capability, CUDA, driver) and the torch
version, and :func:`check_aoti_engine` refuses another GPU, another compute capability or
another torch version with both values. bf16 on CPU is offered only where the CPU has
native bf16 arithmetic (``avx512_bf16`` or ``amx_bf16``): elsewhere it is emulated and slow.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from esr_deploy.backends.base import (
    Availability,
    BuiltEngine,
    EngineSession,
    ModelBackend,
    ModelBuild,
)
from esr_deploy.cpu import bf16_unavailable_reason, cpu_info
from esr_deploy.errors import BundleError, DataError, ExportError, ValidationError
from esr_deploy.gpu import cuda_availability, gpu_info
from esr_deploy.runtime.bundle_reader import check_cpu_flags
from esr_deploy.shapes import ShapeProfile

if TYPE_CHECKING:
    from torch.export import ExportedProgram

    from esr_deploy.precision.calibration import CalibrationSet

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.pt2"
PRECISIONS: Mapping[str, tuple[str, ...]] = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16")}
LOW_DTYPES: Mapping[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
INDUCTOR_CONFIGS: Mapping[str, Any] = {"freezing": True}
MAX_BATCH = 16
#: How far above the profile's minimum the accepted minimum is searched (pixels).
MIN_SEARCH = 64
HW = tuple[int, int]


def native_bf16(have: frozenset[str] | None = None) -> Availability:
    """Whether this CPU (or one with the flags ``have``) computes bf16 natively
    (:func:`esr_deploy.cpu.bf16_unavailable_reason`)."""
    reason = bf16_unavailable_reason(have)
    return Availability(not reason, reason)


def _cpp_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def driver_version() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None where it cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


class _ChannelsLast(nn.Module):
    """The model reading its input as channels_last (the layout the conv kernels prefer)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def export_program(
    module: nn.Module, lo: HW, max_side: int, device: torch.device, proven: bool = False
) -> ExportedProgram:
    """``proven``: the range was already accepted for the same shapes (the float32 program of
    a mixed-precision graph): export keeps guards it cannot prove as runtime checks instead
    of refusing them (``Dim.DYNAMIC``)."""
    from torch.export import Dim

    h, w = max(lo[0], 64), max(lo[1], 64)
    sample = torch.rand(2, 3, min(h, max_side), min(w, max_side), device=device)
    dims: dict[int, Any] = {0: Dim("batch", min=1, max=MAX_BATCH)}
    if proven:
        dims[2] = Dim.DYNAMIC(min=lo[0], max=max_side)
        dims[3] = Dim.DYNAMIC(min=lo[1], max=max_side)
    else:
        dims[2] = Dim("h", min=lo[0], max=max_side)
        dims[3] = Dim("w", min=lo[1], max=max_side)
    with torch.no_grad():
        return torch.export.export(module, (sample,), dynamic_shapes=(dims,))


def export_dynamic(
    module: nn.Module, min_hw: HW, max_side: int, device: torch.device
) -> tuple[ExportedProgram, HW]:
    """``module`` exported for H×W from ``min_hw`` (or the smallest minimum export accepts,
    see the module docstring) up to ``max_side``; the program and that minimum."""

    def attempt(k: int) -> ExportedProgram | Exception:
        try:
            return export_program(module, (min_hw[0] + k, min_hw[1] + k), max_side, device)
        except Exception as exc:  # torch.export raises many untyped errors
            return exc

    first = attempt(0)
    if not isinstance(first, Exception):
        return first, min_hw
    top = attempt(MIN_SEARCH)
    if isinstance(top, Exception):
        raise ExportError(
            f"torch.export cannot export the model with dynamic H×W from {min_hw} to "
            f"{max_side} — it said: {str(first).strip()[:600]} — make forward() free of "
            "data-dependent control flow, or choose an ONNX target."
        ) from first
    bad, good, program = 0, MIN_SEARCH, top
    while good - bad > 1:
        mid = (bad + good) // 2
        result = attempt(mid)
        if isinstance(result, Exception):
            bad = mid
        else:
            good, program = mid, result
    found = (min_hw[0] + good, min_hw[1] + good)
    log.info("torch.export accepts H×W from %s (the profile's minimum is %s)", found, min_hw)
    return program, found


def check_aoti_engine(
    engine: Mapping[str, Any], found_device: Mapping[str, Any], found_torch: str
) -> None:
    """Refuse an AOTInductor package compiled for another torch, GPU or compute capability
    (CUDA), or for CPU flags this CPU lacks; :class:`BundleError` names both values."""
    built = engine.get("device") or {}
    built_torch = str(engine.get("backend_version"))
    if built_torch != found_torch:
        raise BundleError(
            f"The AOTInductor package was compiled with PyTorch {built_torch}; this machine "
            f"has PyTorch {found_torch} — its compiled code runs only with the torch that "
            "made it: install that version or recompile the bundle here."
        )
    if built.get("kind") != "gpu":
        check_cpu_flags(built.get("flags") or (), found_device)
        return
    expected = f"{built.get('name')} (compute capability {built.get('compute_capability')})"
    found = (
        f"{found_device.get('name')} (compute capability {found_device.get('compute_capability')})"
    )
    if found_device.get("name") is None:
        raise BundleError(
            f"The AOTInductor package was compiled for {expected}; no CUDA GPU is visible "
            "here — run it on that GPU."
        )
    if (built.get("name"), built.get("compute_capability")) != (
        found_device.get("name"),
        found_device.get("compute_capability"),
    ):
        raise BundleError(
            f"The AOTInductor package was compiled for {expected}; this GPU is {found} — its "
            "kernels were generated and tuned for the other GPU: recompile the bundle here."
        )


class AotiSession(EngineSession):
    """A loaded package; float32 NCHW in and out (see the module docstring)."""

    def __init__(
        self, runner: Any, device: torch.device, min_hw: HW, max_side: int, cuda_graph: bool
    ) -> None:
        self._runner = runner
        self.device = device
        self.min_hw, self.max_side = min_hw, max_side
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self._graph: Any = None
        self._graph_shape: tuple[int, ...] | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y = self._runner(x)
        return y[0] if isinstance(y, (list, tuple)) else y

    def _check(self, shape: tuple[int, ...]) -> None:
        n, _, h, w = shape
        if not (1 <= n <= MAX_BATCH and self.min_hw[0] <= h <= self.max_side) or not (
            self.min_hw[1] <= w <= self.max_side
        ):
            raise DataError(
                f"The AOTInductor engine was compiled for inputs N×3×H×W with N ≤ {MAX_BATCH}, "
                f"{self.min_hw[0]} ≤ H ≤ {self.max_side} and {self.min_hw[1]} ≤ W ≤ "
                f"{self.max_side}; got {'×'.join(map(str, shape))} — tile or pad the image, "
                "or recompile with a larger [profile] max."
            )

    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        """One plain run on static buffers, then the capture; the plain run's output."""
        self._graph = None
        self._static_in = x.clone()
        out = self._call(self._static_in)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._static_out = self._call(self._static_in)
        except RuntimeError as exc:
            log.warning("AOTInductor run not capturable as a CUDA graph (%s); plain runs", exc)
            self.cuda_graph = False
            return out
        self._graph, self._graph_shape = graph, tuple(x.shape)
        return out

    def run_torch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (NCHW, any device) → the output on the engine's device, a tensor of its own."""
        x = x.to(device=self.device, dtype=torch.float32).contiguous()
        self._check(tuple(x.shape))
        with torch.inference_mode():
            if not self.cuda_graph:
                return self._call(x)
            if self._graph is None or tuple(x.shape) != self._graph_shape:
                return self._capture(x)
            assert self._static_in is not None and self._static_out is not None
            self._static_in.copy_(x)
            self._graph.replay()
            return self._static_out.clone()

    def run(self, lr: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(lr, dtype=np.float32))
        return self.run_torch(x).float().cpu().numpy()


class AOTInductor(ModelBackend):
    """AOTInductor packages on the CPU or a CUDA GPU (``device``: ``"cpu"``, ``"cuda"``)."""

    name = "aotinductor"

    def __init__(self, device: str = "cpu") -> None:
        assert device in PRECISIONS, device
        self.kind = device

    def availability(self, precision: str) -> Availability:
        if precision not in PRECISIONS[self.kind]:
            return Availability(
                False,
                f"{precision} is not an AOTInductor {self.kind} precision here — "
                f"aoti-{self.kind} targets are {', '.join(PRECISIONS[self.kind])}",
            )
        if self.kind == "cuda":
            cuda = cuda_availability(precision)
            if not cuda.ok:
                return cuda
            if importlib.util.find_spec("triton") is None:
                return Availability(
                    False,
                    "Triton is not installed: AOTInductor generates its CUDA kernels with "
                    "Triton — install the triton that matches this PyTorch",
                )
            return Availability(True)
        if _cpp_compiler() is None:
            return Availability(
                False,
                "no C++ compiler (g++, c++ or clang++; or $CXX) is on the PATH: AOTInductor "
                "compiles the model to C++ — install one (apt-get install g++)",
            )
        return native_bf16() if precision == "bf16" else Availability(True)

    def version(self) -> str:
        return str(torch.__version__)

    def device(self) -> dict[str, Any]:
        if self.kind == "cpu":
            info = cpu_info()
        else:
            info = gpu_info()
            info["driver"] = driver_version()
        info["torch"] = str(torch.__version__)
        return info

    def check_engine(self, manifest: Mapping[str, Any]) -> None:
        """torch version, and GPU and compute capability or CPU flags
        (:func:`check_aoti_engine`)."""
        check_aoti_engine(manifest.get("engine", {}), self.device(), self.version())

    def build_model(
        self,
        model: nn.Module,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile,
        calibration: CalibrationSet | None,
        check_inputs: Sequence[np.ndarray],
    ) -> ModelBuild:
        device = torch.device(self.kind)
        module = _ChannelsLast(copy.deepcopy(model).eval().to(device)).eval()
        min_hw = profile.min or (1, 1)
        max_side = max(*profile.max, min_hw[0], min_hw[1])
        program, min_hw = export_dynamic(module, min_hw, max_side, device)
        info = None
        if precision in LOW_DTYPES:
            assert calibration is not None, "reduced precision needs calibration images"
            mixed, info = self._reduce(
                program.module(), precision, calibration, check_inputs, min_hw, max_side
            )
            # casts change no shape: the float32 program's range holds for the mixed one
            # (where export cannot prove a guard on its own, e.g. bf16 bilinear resizing)
            program = export_program(mixed, min_hw, max_side, device, proven=True)
        inductor = importlib.import_module("torch._inductor")
        start = time.perf_counter()
        try:
            inductor.aoti_compile_and_package(
                program,
                package_path=str(bundle_dir / ENGINE_FILE),
                inductor_configs=dict(INDUCTOR_CONFIGS),
            )
        except Exception as exc:  # Inductor raises many untyped errors
            raise ExportError(
                f"AOTInductor could not compile the model for {self.kind}: "
                f"{type(exc).__name__}: {str(exc).strip()[:600]} — choose an ONNX target, or "
                "report the model with this message."
            ) from exc
        seconds = time.perf_counter() - start
        log.info("AOTInductor compiled %s %s in %.1f s", self.kind, precision, seconds)
        settings = {
            "device": self.kind,
            "precision": precision,
            "min_hw": list(min_hw),
            "max_side": max_side,
            "max_batch": MAX_BATCH,
            "channels_last": True,
            "inductor_configs": dict(INDUCTOR_CONFIGS),
            "cuda_graph": self.kind == "cuda",
            "compile_seconds": round(seconds, 1),
        }
        built = BuiltEngine(ENGINE_FILE, self.version(), self.device(), settings)
        return ModelBuild(built, info)

    def _reduce(
        self,
        graph: torch.fx.GraphModule,
        precision: str,
        calibration: CalibrationSet,
        check_inputs: Sequence[np.ndarray],
        min_hw: HW,
        max_side: int,
    ) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
        """The mixed-precision graph and its report (the manifest's precision section)."""
        from esr_deploy.precision.torch_graph import (
            apply_precision,
            low_precision_range,
            measure_ranges,
            plan_precision,
        )

        device = torch.device(self.kind)
        dtype = LOW_DTYPES[precision]

        def accepted(xs: Sequence[np.ndarray]) -> list[torch.Tensor]:
            """The inputs the graph accepts (its guards refuse the others), on the device."""
            return [
                torch.from_numpy(np.ascontiguousarray(x)).to(device)
                for x in xs
                if min_hw[0] <= x.shape[2] <= max_side and min_hw[1] <= x.shape[3] <= max_side
            ]

        calib = accepted(calibration.inputs)
        if not calib:
            raise DataError(
                f"No calibration image fits the compiled input range ({min_hw[0]}×{min_hw[1]} "
                f"to {max_side}×{max_side}) — calibrate on larger LR images (--calib DIR)."
            )
        plan = plan_precision(graph, measure_ranges(graph, calib), dtype)
        mixed, casts = apply_precision(graph, plan)
        worst, where = low_precision_range(graph, plan, accepted(check_inputs))
        info = {
            "precision": precision,
            "graph": "torch.export ATen graph compiled by AOTInductor (no ONNX)",
            "calibration": {**calibration.to_dict(), "from_cache": False},
            "low_precision": plan.to_dict(casts),
            "max_abs_on_validation": worst,
            "max_abs_tensor": where,
        }
        limit = float(torch.finfo(dtype).max)
        if not worst < limit:
            raise ValidationError(
                f"The {precision} graph overflows on the validation images — node '{where}' "
                f"reaches {worst:.4g} ({precision} max {limit:.6g}) although the calibration "
                "images kept it in range — calibrate on images like the validation ones "
                "(--calib DIR).",
                details={"precision_onnx": info},
            )
        return mixed, info

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> AotiSession:
        kind = str(settings.get("device", self.kind))
        if kind != self.kind:
            raise BundleError(
                f"The AOTInductor package {engine_path} was compiled for {kind}; this backend "
                f"runs {self.kind} packages — use the target the manifest names."
            )
        inductor = importlib.import_module("torch._inductor")
        try:
            runner = inductor.aoti_load_package(str(engine_path))
        except Exception as exc:  # the loader raises untyped errors
            raise BundleError(
                f"Cannot load the AOTInductor package {engine_path}: {str(exc).strip()[:400]} "
                "— it runs only with the torch and on the device it was compiled for (see the "
                "manifest); recompile the bundle here."
            ) from exc
        min_hw = settings.get("min_hw") or (1, 1)
        return AotiSession(
            runner,
            torch.device(kind),
            (int(min_hw[0]), int(min_hw[1])),
            int(settings.get("max_side") or 1 << 30),
            bool(settings.get("cuda_graph", False)),
        )
