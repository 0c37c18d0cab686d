"""OpenVINO CPU backend (targets ``ov-fp32``, ``ov-bf16``, ``ov-int8``).

Build = OpenVINO reads the ONNX, the model is saved as OpenVINO IR (``engine.xml`` +
``engine.bin``), and compiled once for this CPU to check it. Loading compiles the IR with the
settings the manifest records; the inference precision is a compile setting, not a property
of the IR:

- ``fp32``: ``INFERENCE_PRECISION_HINT = f32`` (OpenVINO's default on CPUs with bf16 units is
  bf16, so fp32 must be asked for).
- ``bf16``: ``INFERENCE_PRECISION_HINT = bf16``, only where bf16 is native (AVX-512 BF16 or
  AMX-BF16, :func:`esr_deploy.cpu.bf16_unavailable_reason`) and OpenVINO reports it; emulated
  bf16 is slower than f32 and is not offered. Convolutions multiply bfloat16 values (8-bit
  mantissa) and accumulate in float32; OpenVINO keeps precision-sensitive ops in float32.
- ``int8``: the explicit Q/DQ ONNX of :mod:`esr_deploy.precision.int8` (the same file
  TensorRT builds from, with the weight range that this CPU's kernels compute exactly:
  :meth:`OpenVinoCPU.int8_kernels`). OpenVINO turns each Q/DQ pair into a FakeQuantize and
  runs the quantised convolutions with int8 kernels; the non-quantised rest runs at the
  ``bf16`` hint where bf16 is native, else f32 (recorded in the settings).

Latency hint, one stream, ``INFERENCE_NUM_THREADS`` = the cores this process may use. The
manifest records the CPU (model and ISA flags) and OpenVINO's capabilities, and a bundle is
refused on a CPU that lacks the flags it was built for.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.backends.onnxruntime import check_int8_settings, int8_settings
from esr_deploy.cpu import bf16_unavailable_reason, cpu_info, default_threads
from esr_deploy.errors import BundleError, ExportError
from esr_deploy.precision.int8_kernels import Int8Kernels, measure
from esr_deploy.shapes import ShapeProfile

log = logging.getLogger(__name__)

try:  # the only place openvino is imported
    import openvino as ov
except ImportError:  # pragma: no cover - openvino is a core dependency
    ov = None

ENGINE_FILE = "engine.xml"
SUPPORTED_PRECISIONS = ("fp32", "bf16", "int8")
_CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}


def _what_failed(exc: BaseException) -> str:
    """OpenVINO's message without its source-location lines (which come first)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))]
    return " ".join(useful or lines) or type(exc).__name__


def capabilities() -> list[str]:
    """OpenVINO's CPU optimisation capabilities (``FP32``, ``BF16``, ``INT8``, ...)."""
    if ov is None:
        return []
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def _hint(precision: str, caps: list[str]) -> str:
    if precision == "fp32":
        return "f32"
    if precision == "bf16":
        return "bf16"
    native = "BF16" in caps and not bf16_unavailable_reason()
    return "bf16" if native else "f32"  # int8: the non-quantised part


def _run_compiled(model: Any, x: np.ndarray) -> np.ndarray:
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1}
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    return np.asarray(next(iter(compiled.create_infer_request().infer({0: x}).values())))


@functools.cache
def _int8_kernels() -> Int8Kernels:
    return measure(f"OpenVINO {ov.__version__}", _run_compiled)


class OpenVinoSession(EngineSession):
    def __init__(self, compiled: Any) -> None:
        self._request = compiled.create_infer_request()

    def run(self, lr: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(lr, dtype=np.float32)
        out = self._request.infer({0: x})
        return np.array(next(iter(out.values())), dtype=np.float32, copy=True)


class OpenVinoCPU(Backend):
    name = "openvino"

    def availability(self, precision: str) -> Availability:
        if ov is None:
            return Availability(False, "openvino is not installed (pip install openvino)")
        if precision not in SUPPORTED_PRECISIONS:
            return Availability(
                False, f"{precision} is not an OpenVINO CPU precision here (fp32, bf16, int8)"
            )
        if precision == "bf16" and bf16_unavailable_reason():
            return Availability(False, bf16_unavailable_reason())
        if precision == "int8" and self.int8_kernels().weight_max is None:
            return Availability(False, self.int8_kernels().reason)
        caps = capabilities()
        if _CAPABILITY[precision] not in caps:
            model = cpu_info().get("model", "this CPU")
            return Availability(
                False,
                f"OpenVINO reports no {precision} support on {model} (capabilities: "
                f"{', '.join(caps)}); bf16 needs AVX-512 BF16 or AMX",
            )
        return Availability(True)

    def version(self) -> str:
        return str(ov.__version__) if ov is not None else "missing"

    def device(self) -> dict[str, Any]:
        info = cpu_info()
        info["openvino_capabilities"] = capabilities()
        return info

    def int8_kernels(self) -> Int8Kernels:
        return _int8_kernels()

    def _config(self, hint: str, threads: int) -> dict[str, Any]:
        return {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,
        }

    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        threads = default_threads()
        hint = _hint(precision, capabilities())
        int8: dict[str, Any] = {}
        if precision == "int8":
            import onnx

            doing = f"building {onnx_path.name}"
            int8 = int8_settings(onnx.load(str(onnx_path)), self.int8_kernels(), doing)
        core = ov.Core()
        try:
            model = core.read_model(str(onnx_path))
            ov.save_model(model, str(bundle_dir / ENGINE_FILE), compress_to_fp16=False)
            core.compile_model(str(bundle_dir / ENGINE_FILE), "CPU", self._config(hint, threads))
        except Exception as exc:  # openvino raises its own untyped errors
            raise ExportError(
                f"OpenVINO {ov.__version__} could not build an engine from {onnx_path.name}: "
                f"{_what_failed(exc)} — where it names an op or node, OpenVINO does not "
                "support it: replace that op in the model or choose another target."
            ) from exc
        log.info("OpenVINO %s built %s (%s, %d threads)", ov.__version__, onnx_path, hint, threads)
        return BuiltEngine(
            engine_file=ENGINE_FILE,
            backend_version=self.version(),
            device=self.device(),
            settings={
                "device": "CPU",
                "precision": precision,
                "inference_precision_hint": hint,
                "performance_hint": "LATENCY",
                "num_streams": 1,
                "inference_num_threads": threads,
                **int8,
            },
        )

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> EngineSession:
        check_int8_settings(settings, self.int8_kernels(), engine_path)
        threads = min(int(settings.get("inference_num_threads") or 0) or default_threads(),
                      default_threads())  # fmt: skip
        hint = str(settings.get("inference_precision_hint", "f32"))
        try:
            compiled = ov.Core().compile_model(str(engine_path), "CPU", self._config(hint, threads))
        except Exception as exc:  # openvino raises its own untyped errors
            raise BundleError(
                f"OpenVINO could not load the engine {engine_path}: {_what_failed(exc)} — "
                "recompile the bundle on this machine."
            ) from exc
        return OpenVinoSession(compiled)
