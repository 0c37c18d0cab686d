"""TensorRT backend (targets ``trt-fp32``, ``trt-fp16``, ``trt-int8``), TensorRT 10 and 11 API.

Build = parse the ONNX into a **strongly typed** network and let TensorRT pick, for this GPU,
the fastest kernels (tactics) for every layer at the optimisation profiles' shapes; the
serialized plan is the engine (``engine.plan``).

Precision. TensorRT 10 deprecated and TensorRT 11 removed the precision builder flags
(``FP16``, ``INT8``, ...) and implicit INT8 calibration. A strongly typed network takes every
tensor's type from the ONNX, so the precision is whatever ONNX is given: the fp32 export, the
float16 ONNX of :mod:`esr_deploy.precision.fp16`, or the explicit Q/DQ ONNX of
:mod:`esr_deploy.precision.int8`. :func:`check_onnx_precision` refuses an ONNX that does not
hold the precision asked for (e.g. the fp32 export for ``trt-fp16``), since TensorRT would
silently build a float32 engine from it.

Shapes. An engine with dynamic H×W accepts only the shapes of its optimisation profiles,
each a box ``min ≤ shape ≤ max`` (per dimension) tuned for ``opt``. With the recipe's LR
profile (opt, max, min), :func:`optimization_profiles` makes one profile with
``max = (H_max, W_max)`` and, when ``H_max ≠ W_max``, a second with ``max = (W_max, H_max)``:
every landscape frame up to the max fits the first, every portrait frame the second. At run
time :func:`select_profile` picks the first profile whose box contains the input shape.

Builds are slow (tactic timing), so the timing cache is kept per GPU model, compute capability
and TensorRT version under the esr-deploy cache folder (:func:`timing_cache_path`) and reused.

Runtime: I/O through PyTorch CUDA tensors (``set_tensor_address`` + ``execute_async_v3`` on
the current PyTorch stream); optionally replayed as a CUDA graph for a fixed shape.

Compatibility: a plan runs only with the TensorRT version and on the GPU compute capability
it was built for, unless built *version-compatible* (runs on the same or a newer TensorRT) or
*hardware-compatible* (``AMPERE_PLUS``: runs on any GPU of compute capability ≥ 8.0);
:func:`check_gpu_engine` checks a bundle's manifest against this machine.

``tensorrt`` is imported here only and is optional: without it (or with only the
``tensorrt-stubs`` type stubs installed) the module imports and :meth:`TensorRT.availability`
says why TensorRT cannot be used.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.errors import (
    BundleError,
    EsrDeployError,
    ExportError,
    RecipeError,
    TargetUnavailable,
)
from esr_deploy.paths import cache_root
from esr_deploy.shapes import ShapeProfile

log = logging.getLogger(__name__)

try:  # the only place tensorrt is imported
    import tensorrt as trt
except ImportError:
    trt = None  # type: ignore[assignment]

ENGINE_FILE = "engine.plan"
SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8")
#: Lowest compute capability with fast arithmetic for each precision (float16: 5.3,
#: int8 dot products DP4A: 6.1).
MIN_COMPUTE_CAPABILITY: Mapping[str, tuple[int, int]] = {
    "fp32": (0, 0),
    "fp16": (5, 3),
    "int8": (6, 1),
}
#: Hardware-compatible (``AMPERE_PLUS``) engines run on, and are built on, these GPUs.
AMPERE = (8, 0)
#: TensorRT major versions whose Python API this module uses.
SUPPORTED_TRT_MAJORS = (10, 11)
#: Smallest LR size used when the exporter has not derived the graph's minimum.
FALLBACK_MIN_HW = (1, 1)

NCHW = tuple[int, int, int, int]


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class TensorRTOptions:
    """Build options.

    ``optimization_level``: ``builder_optimization_level`` 0..5 (TensorRT's default 3;
    higher searches more tactics, builds slower, may run faster). ``workspace_mib``: limit of
    the scratch memory a tactic may use (``None``: TensorRT's default, the GPU's memory).
    ``hardware_compatible``: an engine for every GPU of compute capability ≥ 8.0 (Ampere and
    newer), at some speed cost. ``version_compatible``: an engine that runs on this TensorRT
    version and newer ones (the runtime must allow its embedded host code). ``cuda_graph``:
    replay inference as a CUDA graph for repeated shapes (lower launch overhead). ``tf32``:
    let float32 convolutions use TF32 tensor-core math (10-bit mantissa) on Ampere and newer;
    TensorRT enables it by default, esr-deploy disables it unless asked, so a float32 layer
    computes in float32 (TF32 is a math mode, not a precision: strongly typed networks keep
    the flag).
    """

    optimization_level: int = 3
    workspace_mib: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False
    cuda_graph: bool = False
    tf32: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise EsrDeployError(
                f"TensorRT builder optimization level {self.optimization_level} is out of "
                "range — use 0 (fastest build) to 5 (most tactics); 3 is TensorRT's default."
            )
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise EsrDeployError(
                f"TensorRT workspace of {self.workspace_mib} MiB is not positive — give a "
                "size in MiB, or none for TensorRT's default."
            )


@dataclass(frozen=True)
class ProfileShapes:
    """One optimisation profile of the engine's input: NCHW ``min ≤ opt ≤ max``."""

    min: NCHW
    opt: NCHW
    max: NCHW

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == 4 and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> ProfileShapes:
        return cls(_nchw(data["min"]), _nchw(data["opt"]), _nchw(data["max"]))

    def describe(self) -> str:
        return f"{_fmt_shape(self.min)} to {_fmt_shape(self.max)} (opt {_fmt_shape(self.opt)})"


def _nchw(values: Sequence[int]) -> NCHW:
    n, c, h, w = (int(v) for v in values)
    return (n, c, h, w)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _clip(value: int, lo: int, hi: int) -> int:
    return max(lo, min(value, hi))


def optimization_profiles(
    profile: ShapeProfile, batch: int = 1, channels: int = 3
) -> list[ProfileShapes]:
    """The engine's optimisation profiles for the LR ``profile`` (see the module docstring).

    Profile 1: ``max = (N, C, H_max, W_max)``; profile 2, only when ``H_max ≠ W_max``:
    ``max = (N, C, W_max, H_max)``. ``min`` is the exporter's derived minimum
    (:data:`FALLBACK_MIN_HW` when none was derived), the same in both: it is a property of
    the graph, per axis, not of the frame's orientation. ``opt`` is the recipe's opt
    (transposed for the transposed profile, so a portrait profile is tuned for the portrait
    form of the same frame) clipped into ``[min, max]`` per axis.
    """
    h_max, w_max = profile.max
    h_min, w_min = profile.min or FALLBACK_MIN_HW
    maxima = [(h_max, w_max)] + ([(w_max, h_max)] if h_max != w_max else [])
    profiles = []
    for index, (hi_h, hi_w) in enumerate(maxima):
        if h_min > hi_h or w_min > hi_w:
            raise RecipeError(
                f"The shape profile cannot hold a TensorRT optimisation profile: the smallest "
                f"input the graph accepts, {h_min}x{w_min}, exceeds the largest, "
                f"{hi_h}x{hi_w} — raise [profile] max in the recipe."
            )
        opt_h, opt_w = profile.opt if index == 0 else (profile.opt[1], profile.opt[0])
        profiles.append(
            ProfileShapes(
                min=(batch, channels, h_min, w_min),
                opt=(batch, channels, _clip(opt_h, h_min, hi_h), _clip(opt_w, w_min, hi_w)),
                max=(batch, channels, hi_h, hi_w),
            )
        )
    return profiles


def select_profile(profiles: Sequence[ProfileShapes], shape: Sequence[int]) -> int:
    """Index of the first profile whose ``[min, max]`` box contains ``shape``."""
    for index, candidate in enumerate(profiles):
        if candidate.contains(shape):
            return index
    ranges = "; ".join(p.describe() for p in profiles) or "none"
    raise EsrDeployError(
        f"The TensorRT engine cannot run an input of shape {_fmt_shape(shape)} — its "
        f"optimisation profiles accept {ranges} — tile the image into pieces that fit, or "
        "recompile with a larger [profile] max in the recipe."
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _cc_tuple(value: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"8.6"`` or ``(8, 6)`` → ``(8, 6)``; ``None`` (no GPU) stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        return (int(major), int(minor or 0))
    return (int(value[0]), int(value[1]))


def gpu_slug(gpu_name: str, compute_capability: str | Sequence[int]) -> str:
    """``"NVIDIA H100 80GB HBM3", "9.0"`` → ``"nvidia-h100-80gb-hbm3-sm90"``: a file-name-safe
    key for caches that are valid for one GPU model only."""
    cc = _cc_tuple(compute_capability)
    assert cc is not None
    return f"{_slug(gpu_name)}-sm{cc[0]}{cc[1]}"


def timing_cache_path(
    gpu_name: str,
    compute_capability: str | Sequence[int],
    trt_version: str,
    root: Path | None = None,
) -> Path:
    """``<root>/tensorrt/<gpu-name-slug>-sm<cc>-trt<version>.cache`` (root:
    :func:`cache_root`). Tactic timings are valid only for one GPU model and TensorRT
    version, hence one file per pair."""
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    name = f"{gpu_slug(gpu_name, compute_capability)}-trt{version}.cache"
    return (root if root is not None else cache_root()) / "tensorrt" / name


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename:
    a concurrent build never reads a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:4])


def check_onnx_precision(onnx_path: Path, precision: str) -> None:
    """Refuse an ONNX whose tensors do not hold ``precision`` (strongly typed builds take it
    from the ONNX): ``fp16`` needs float16 tensors, ``int8`` QuantizeLinear nodes, ``fp32``
    neither."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    fp16 = onnx.TensorProto.FLOAT16
    has_fp16 = (
        any(t.data_type == fp16 for t in graph.initializer)
        or any(
            n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
            for n in graph.node
        )
        or any(
            v.type.tensor_type.elem_type == fp16
            for v in [*graph.input, *graph.output, *graph.value_info]
        )
    )
    has_qdq = any(n.op_type == "QuantizeLinear" for n in graph.node)
    seen = ", ".join(
        [w for w, present in (("float16 tensors", has_fp16), ("Q/DQ nodes", has_qdq)) if present]
    )
    problem = {
        "fp32": "it holds " + seen if seen else "",
        "fp16": "" if has_fp16 else "it has no float16 tensor",
        "int8": "" if has_qdq else "it has no QuantizeLinear node",
    }.get(precision, f"{precision} is not a TensorRT precision")
    if problem:
        made_by = {
            "fp32": "the fp32 export",
            "fp16": "the float16 ONNX that esr-deploy's fp16 pass writes",
            "int8": "the explicit Q/DQ ONNX that esr-deploy's int8 pass writes",
        }.get(precision, "an ONNX of that precision")
        raise ExportError(
            f"TensorRT {precision} needs an ONNX in that precision: a strongly typed network "
            f"takes every tensor's type from the ONNX — {onnx_path.name}: {problem} — build "
            f"from {made_by}."
        )


def check_gpu_engine(
    manifest_engine: Mapping[str, Any],
    found_device: Mapping[str, Any],
    found_trt_version: str,
) -> None:
    """Refuse to run a TensorRT engine on a machine it was not built for.

    ``manifest_engine`` is the manifest's ``engine`` entry (``backend_version``, ``device``,
    ``settings``); ``found_device`` is :func:`gpu_info` (or :meth:`TensorRT.device`) here.

    - TensorRT version: must equal the one the engine was built with; a version-compatible
      engine also runs on any newer TensorRT 10.x/11.x.
    - Compute capability: must equal the one it was built for; a hardware-compatible
      (``ampere+``) engine runs on any GPU of compute capability ≥ 8.0.
    - GPU name: a different GPU model of the same compute capability runs the engine
      correctly (tactics timed on the other model may be slower here); this is only logged as
      a warning, never refused.

    Raises :class:`BundleError` naming what was expected and what was found.
    """
    built_device: Mapping[str, Any] = manifest_engine.get("device") or {}
    settings: Mapping[str, Any] = manifest_engine.get("settings") or {}
    built_trt = str(built_device.get("tensorrt") or manifest_engine.get("backend_version"))
    version_compatible = bool(
        settings.get("version_compatible", built_device.get("version_compatible", False))
    )
    hardware = str(
        settings.get("hardware_compatibility", built_device.get("hardware_compatibility", "none"))
    )

    found_v, built_v = _version_tuple(found_trt_version), _version_tuple(built_trt)
    if version_compatible:
        if not found_v or found_v < built_v or found_v[0] not in SUPPORTED_TRT_MAJORS:
            raise BundleError(
                f"The engine is version-compatible from TensorRT {built_trt} on (TensorRT "
                f"{'/'.join(map(str, SUPPORTED_TRT_MAJORS))}); this machine has TensorRT "
                f"{found_trt_version} — install TensorRT {built_trt} or newer, or recompile "
                "the bundle here."
            )
    elif found_v != built_v:
        raise BundleError(
            f"The engine was built with TensorRT {built_trt}; this machine has TensorRT "
            f"{found_trt_version} — install TensorRT {built_trt}, or recompile the bundle here "
            "(a version-compatible build runs on newer TensorRT)."
        )

    built_cc = _cc_tuple(built_device.get("compute_capability"))
    found_cc = _cc_tuple(found_device.get("compute_capability"))
    built_name, found_name = built_device.get("name"), found_device.get("name")
    expected = f"{built_name} (compute capability {built_device.get('compute_capability')})"
    found = f"{found_name} (compute capability {found_device.get('compute_capability')})"
    if found_cc is None:
        raise BundleError(
            f"The engine was built for {expected}; no CUDA GPU is visible here — run it on "
            "a machine with such a GPU."
        )
    if hardware == "ampere+":
        if found_cc < AMPERE:
            raise BundleError(
                f"The engine is hardware-compatible for GPUs of compute capability ≥ "
                f"{AMPERE[0]}.{AMPERE[1]} (Ampere and newer); this GPU is {found} — run it on "
                "an Ampere or newer GPU, or recompile the bundle here."
            )
    elif built_cc != found_cc:
        raise BundleError(
            f"The engine was built for {expected}; this GPU is {found} — recompile the "
            "bundle on this GPU (or build it hardware-compatible for Ampere and newer)."
        )
    if built_name and found_name and built_name != found_name:
        log.warning(
            "TensorRT engine built on %s runs on %s: it is compatible, but its kernels were "
            "timed on the other GPU; recompile here for the best latency",
            expected,
            found,
        )


# ------------------------------------------------------------------------- device and probe


def tensorrt_version() -> str:
    """The installed TensorRT's version; ``"missing"`` or ``"stubs only"`` otherwise."""
    if trt is None:
        return "missing"
    if not hasattr(trt, "Builder"):
        return "stubs only"
    return str(trt.__version__)


def gpu_info() -> dict[str, Any]:
    """The current CUDA device as a manifest records it, through PyTorch's CUDA API:
    ``kind``, ``name``, ``compute_capability`` ("major.minor"), ``memory_mib``, ``cuda``
    (PyTorch's CUDA version). ``name`` and ``compute_capability`` are ``None`` without a
    visible GPU."""
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


def _dims(dims: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` (tuple-like) as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise BundleError(
            f"The TensorRT engine has an input or output of type {dtype}, which esr-deploy "
            "cannot exchange with PyTorch — export the model with float32 IO."
        )
    return table[dtype]


class _LogRecorder:
    """TensorRT's log messages forwarded to :mod:`logging`; errors kept for error messages."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def record(self, severity: trt.ILogger.Severity, msg: str) -> None:
        if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
            self.errors.append(msg)
            del self.errors[:-50]
            log.error("TensorRT: %s", msg)
        elif severity == trt.ILogger.WARNING:
            log.warning("TensorRT: %s", msg)
        elif severity == trt.ILogger.INFO:
            log.debug("TensorRT: %s", msg)

    def clear(self) -> None:
        """Forget earlier errors (at the start of a build or load)."""
        self.errors.clear()

    def last_errors(self, count: int = 5) -> str:
        return "; ".join(self.errors[-count:]) or "TensorRT logged no error"


_LOGGER: tuple[trt.ILogger, _LogRecorder] | None = None


def _trt_logger() -> tuple[trt.ILogger, _LogRecorder]:
    """The process's one ``ILogger`` (TensorRT keeps the first logger it is given for the
    whole process, so every builder and runtime here shares it) and its recorder."""
    global _LOGGER
    if _LOGGER is None:
        recorder = _LogRecorder()

        class _Forward(trt.ILogger):  # defined here: tensorrt is optional
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                recorder.record(severity, msg)

        _LOGGER = (_Forward(), recorder)
    return _LOGGER


def _parser_errors(parser: trt.OnnxParser) -> list[str]:
    lines = []
    for i in range(parser.num_errors):
        error: trt.ParserError = parser.get_error(i)
        where = ""
        if error.node() >= 0:
            where = f"node {error.node()} '{error.node_name()}' ({error.node_operator()}): "
        lines.append(f"{where}{error.desc()}")
    return lines


# --------------------------------------------------------------------------------- session


class TensorRTSession(EngineSession):
    """A deserialized engine with one execution context; PyTorch CUDA tensors in and out.

    Work is enqueued on PyTorch's current CUDA stream, so it is ordered with the PyTorch ops
    around it. With ``cuda_graph`` the enqueue is captured once per input shape (after one
    plain run, which lets TensorRT do its shape-dependent setup outside the capture) and
    replayed; a new shape captures again.
    """

    def __init__(
        self,
        engine: trt.ICudaEngine,
        keepalive: Sequence[object],
        cuda_graph: bool = False,
    ) -> None:
        self._engine = engine
        self._keepalive = tuple(keepalive)  # runtime and logger must outlive the engine
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise BundleError(
                "TensorRT could not create an execution context for the engine (not enough "
                "GPU memory?) — free GPU memory or use a smaller shape profile."
            )
        self._context = context
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(name)
            else:
                outputs.append(name)
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(
                f"The TensorRT engine has inputs {inputs} and outputs {outputs}; esr-deploy "
                "runs engines with one image input and one image output — recompile the bundle."
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(engine.get_tensor_dtype(self.input_name))
        self._out_dtype = _torch_dtype(engine.get_tensor_dtype(self.output_name))
        self.profiles = self._engine_profiles()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._active_profile = 0
        self._input_shape: tuple[int, ...] | None = None
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_shape: tuple[int, ...] | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None

    def _engine_profiles(self) -> list[ProfileShapes]:
        static = _dims(self._engine.get_tensor_shape(self.input_name))
        if all(d >= 0 for d in static):
            fixed = _nchw(static)
            return [ProfileShapes(fixed, fixed, fixed)]
        profiles = []
        for index in range(self._engine.num_optimization_profiles):
            lo, opt, hi = self._engine.get_tensor_profile_shape(self.input_name, index)
            profiles.append(ProfileShapes(_nchw(_dims(lo)), _nchw(_dims(opt)), _nchw(_dims(hi))))
        return profiles

    def _prepare(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """Set profile, shape and addresses for ``x``; the output tensor they point at."""
        shape = tuple(x.shape)
        index = select_profile(self.profiles, shape)
        if index != self._active_profile:
            if not self._context.set_optimization_profile_async(index, stream):
                raise EsrDeployError(
                    f"TensorRT could not switch to optimisation profile {index} for an input "
                    f"of shape {_fmt_shape(shape)} — recompile the bundle."
                )
            self._active_profile = index
            self._input_shape = None
        if shape != self._input_shape:
            if not self._context.set_input_shape(self.input_name, shape):
                raise EsrDeployError(
                    f"TensorRT refused the input shape {_fmt_shape(shape)} — the engine "
                    f"accepts {'; '.join(p.describe() for p in self.profiles)}."
                )
            self._input_shape = shape
        out_shape = _dims(self._context.get_tensor_shape(self.output_name))
        out = torch.empty(out_shape, dtype=self._out_dtype, device=self.device)
        self._context.set_tensor_address(self.input_name, x.data_ptr())
        self._context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _enqueue(self, stream: int) -> None:
        if not self._context.execute_async_v3(stream):
            raise EsrDeployError(
                "TensorRT failed to enqueue inference (see the TensorRT errors logged above) "
                "— check the input shape and the free GPU memory."
            )

    def _as_input(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        return t.to(device=self.device, dtype=self._in_dtype).contiguous()

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        out = self._prepare(x, stream)
        self._enqueue(stream)
        return out

    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        """Warm up on static buffers holding ``x``, capture the enqueue; the warm-up output."""
        shape = tuple(x.shape)
        self._graph = None
        self._static_in = x.clone()
        self._static_out = self._plain(self._static_in)
        torch.cuda.current_stream(self.device).synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._enqueue(torch.cuda.current_stream(self.device).cuda_stream)
        except (RuntimeError, EsrDeployError) as exc:
            log.warning(
                "TensorRT inference could not be captured as a CUDA graph (%s); running "
                "without CUDA graphs",
                exc,
            )
            self.cuda_graph = False
            return self._static_out
        self._graph, self._graph_shape = graph, shape
        return self._static_out

    def _execute(self, x: torch.Tensor) -> torch.Tensor:
        """Run on a device tensor of the engine's input dtype. With CUDA graphs the result is
        the graph's static output buffer, overwritten by the next run."""
        if not self.cuda_graph:
            return self._plain(x)
        if self._graph is None or tuple(x.shape) != self._graph_shape:
            return self._capture(x)
        assert self._static_in is not None and self._static_out is not None
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out

    def run_torch(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (NCHW, any device) → the engine's output as a CUDA tensor of its own."""
        out = self._execute(self._as_input(x))
        return out.clone() if self.cuda_graph else out

    def run(self, lr: np.ndarray) -> np.ndarray:
        out = self._execute(self._as_input(np.asarray(lr, dtype=np.float32)))
        return out.float().cpu().numpy()

    def latency_ms(
        self, x: torch.Tensor | np.ndarray, warmup: int = 10, runs: int = 50
    ) -> list[float]:
        """GPU time (ms) of ``runs`` inferences on ``x`` after ``warmup``, each measured with
        CUDA events around the enqueue (input already on the GPU, no copies timed)."""
        t = self._as_input(x)
        for _ in range(warmup):
            self._execute(t)
        stream = torch.cuda.current_stream(self.device)
        times = []
        for _ in range(runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._execute(t)
            end.record(stream)
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        return times


# --------------------------------------------------------------------------------- backend


class TensorRT(Backend):
    """TensorRT engines from strongly typed ONNX; see the module docstring."""

    name = "tensorrt"

    def __init__(self, options: TensorRTOptions = TensorRTOptions()) -> None:
        self.options = options

    def availability(self, precision: str) -> Availability:
        if precision not in SUPPORTED_PRECISIONS:
            return Availability(
                False,
                f"{precision} is not a TensorRT precision here — TensorRT targets are "
                f"{', '.join('trt-' + p for p in SUPPORTED_PRECISIONS)}",
            )
        if trt is None or not hasattr(trt, "Builder"):
            seen = "it is not installed" if trt is None else "only its type stubs are installed"
            return Availability(
                False,
                f"TensorRT cannot be used: {seen} (TensorRT needs an NVIDIA GPU; pip install "
                "'esr-deploy[tensorrt]' on a GPU machine)",
            )
        version = _version_tuple(trt.__version__)
        if not version or version[0] not in SUPPORTED_TRT_MAJORS:
            return Availability(
                False,
                f"TensorRT {trt.__version__} is installed; esr-deploy uses the TensorRT "
                f"{'/'.join(map(str, SUPPORTED_TRT_MAJORS))} API (strongly typed networks, "
                "named I/O tensors) — pip install 'tensorrt>=10'",
            )
        cuda = cuda_availability(precision)
        if not cuda.ok:
            return cuda
        if self.options.hardware_compatible and torch.cuda.get_device_capability() < AMPERE:
            return Availability(
                False,
                "hardware-compatible TensorRT engines are built on GPUs of compute capability "
                f"≥ 8.0 (Ampere and newer); {torch.cuda.get_device_name()} is older — build "
                "without hardware compatibility",
            )
        return Availability(True)

    def _require(self, precision: str) -> None:
        status = self.availability(precision)
        if not status.ok:
            raise TargetUnavailable(f"TensorRT {precision} cannot run here — {status.reason}.")

    def version(self) -> str:
        return tensorrt_version()

    def device(self) -> dict[str, Any]:
        info = gpu_info()
        info["tensorrt"] = tensorrt_version()
        info["hardware_compatibility"] = "ampere+" if self.options.hardware_compatible else "none"
        info["version_compatible"] = self.options.version_compatible
        return info

    def _load_timing_cache(
        self, config: trt.IBuilderConfig, path: Path
    ) -> tuple[trt.ITimingCache, bool]:
        """The timing cache stored at ``path`` set on ``config`` (an empty one when there is
        none or TensorRT rejects it); whether the stored one was used."""
        data = b""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot read the TensorRT timing cache %s: %s", path, exc)
        if data:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return cache, True
            log.warning("TensorRT rejected the timing cache %s; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        return cache, False

    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        self._require(precision)
        check_onnx_precision(onnx_path, precision)
        opts = self.options
        logger, recorder = _trt_logger()
        recorder.clear()
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = _parser_errors(parser) or [recorder.last_errors()]
            raise ExportError(
                f"TensorRT {trt.__version__} could not parse {onnx_path.name}:\n  "
                + "\n  ".join(errors)
                + "\n— where a node is named, TensorRT has no importer for that op or those "
                "attributes: replace the op in the model, or choose an ONNX Runtime target; "
                "where it names an opset or IR version, upgrade TensorRT."
            )
        if network.num_inputs != 1 or network.num_outputs != 1:
            raise ExportError(
                f"{onnx_path.name} has {network.num_inputs} inputs and {network.num_outputs} "
                "outputs; esr-deploy builds engines with one image input and one output — "
                "export the model with a single NCHW input and output."
            )
        inp = network.get_input(0)
        in_shape = _dims(inp.shape)
        if len(in_shape) != 4:
            raise ExportError(
                f"The input '{inp.name}' of {onnx_path.name} has shape {in_shape}; esr-deploy "
                "engines take NCHW images — export the model with a 4-D input."
            )
        config = builder.create_builder_config()
        if any(d < 0 for d in in_shape[2:]):
            batch = in_shape[0] if in_shape[0] > 0 else 1
            channels = in_shape[1] if in_shape[1] > 0 else 3
            profiles = optimization_profiles(profile or ShapeProfile(), batch, channels)
            for shapes in profiles:
                p = builder.create_optimization_profile()
                p.set_shape(
                    inp.name,
                    trt.Dims(list(shapes.min)),
                    trt.Dims(list(shapes.opt)),
                    trt.Dims(list(shapes.max)),
                )
                config.add_optimization_profile(p)
        else:  # a static graph: the one shape it was exported with
            fixed = _nchw(in_shape)
            profiles = [ProfileShapes(fixed, fixed, fixed)]
        config.builder_optimization_level = opts.optimization_level
        if opts.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
        if opts.hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        if opts.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if not opts.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)

        device = self.device()
        cache_path = timing_cache_path(
            str(device["name"]), str(device["compute_capability"]), trt.__version__
        )
        _, cache_hit = self._load_timing_cache(config, cache_path)

        log.info(
            "building a TensorRT %s %s engine from %s (profiles %s); this takes a while",
            trt.__version__,
            precision,
            onnx_path.name,
            "; ".join(p.describe() for p in profiles),
        )
        start = time.perf_counter()
        plan: trt.IHostMemory | None = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
        if plan is None:
            raise ExportError(
                f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name}: "
                f"{recorder.last_errors()} — where it reports a missing tactic or out of "
                "memory, set a larger workspace or a smaller [profile] max; where it names a "
                "layer, that layer is not supported in this precision on this GPU."
            )
        (bundle_dir / ENGINE_FILE).write_bytes(bytes(memoryview(plan)))
        try:
            _write_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        except OSError as exc:
            log.warning("cannot save the TensorRT timing cache %s: %s", cache_path, exc)
        log.info("TensorRT engine built in %.1f s", seconds)
        return BuiltEngine(
            engine_file=ENGINE_FILE,
            backend_version=self.version(),
            device=device,
            settings={
                "precision": precision,
                "strongly_typed": True,
                "input": inp.name,
                "output": network.get_output(0).name,
                "profiles": [p.to_dict() for p in profiles],
                "builder_optimization_level": opts.optimization_level,
                "workspace_mib": opts.workspace_mib,
                "hardware_compatibility": device["hardware_compatibility"],
                "version_compatible": opts.version_compatible,
                "timing_cache": str(cache_path),
                "timing_cache_hit": cache_hit,
                "cuda_graph": opts.cuda_graph,
                "tf32": opts.tf32,
                "build_seconds": round(seconds, 3),
            },
        )

    def check_engine(self, manifest: Mapping[str, Any]) -> None:
        """GPU, compute capability and TensorRT version (see :func:`check_gpu_engine`)."""
        check_gpu_engine(manifest.get("engine", {}), self.device(), self.version())

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> TensorRTSession:
        precision = str(settings.get("precision", "fp32"))
        status = self.availability(precision)
        if not status.ok:
            raise BundleError(f"Cannot load the TensorRT engine {engine_path} — {status.reason}.")
        logger, recorder = _trt_logger()
        recorder.clear()
        runtime = trt.Runtime(logger)
        if settings.get("version_compatible"):
            # a version-compatible plan embeds the lean runtime it runs with
            runtime.engine_host_code_allowed = True
        try:
            data = engine_path.read_bytes()
        except OSError as exc:
            raise BundleError(
                f"Cannot read the TensorRT engine {engine_path}: {exc.strerror} — check the "
                "bundle (or recompile it)."
            ) from exc
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(
                f"TensorRT {trt.__version__} could not load the engine {engine_path}: "
                f"{recorder.last_errors()} — a TensorRT plan runs only with the TensorRT "
                "version and on the GPU it was built for (see the bundle's manifest); "
                "recompile the bundle on this machine."
            )
        return TensorRTSession(
            engine,
            keepalive=(runtime, logger),
            cuda_graph=bool(settings.get("cuda_graph", self.options.cuda_graph)),
        )
