"""ONNX Runtime CPU backend (targets ``ort-*``).

Build = let ONNX Runtime apply all of its graph optimisations (constant folding, Conv+Add and
Conv+activation fusion, NCHWc layout transforms for this CPU) once, and save the optimised
graph as the engine. The optimised graph may contain layout-specific contrib ops, so the
manifest records the CPU it was built on; loading it runs no further optimisation.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.errors import BundleError, ExportError

log = logging.getLogger(__name__)

try:  # the only place onnxruntime is imported
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a core dependency
    ort = None

ENGINE_FILE = "engine.onnx"
SUPPORTED_PRECISIONS = ("fp32",)


def default_threads() -> int:
    """Intra-op threads: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def cpu_info() -> dict[str, Any]:
    """CPU model and the ISA flags that matter for ONNX Runtime's kernels."""
    info: dict[str, Any] = {
        "kind": "cpu",
        "machine": platform.machine(),
        "cores": default_threads(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and "model" not in info:
            info["model"] = value.strip()
        elif key == "flags" and "flags" not in info:
            wanted = (
                "avx2",
                "avx512f",
                "avx512_vnni",
                "avx512_bf16",
                "amx_bf16",
                "amx_int8",
                "amx_tile",
                "fma",
            )
            flags = set(value.split())
            info["flags"] = [f for f in wanted if f in flags]
    return info


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OrtSession(EngineSession):
    def __init__(self, session: Any) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name

    def run(self, lr: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: np.ascontiguousarray(lr, dtype=np.float32)})
        return np.asarray(out[0])


class OnnxRuntimeCPU(Backend):
    name = "onnxruntime"

    def availability(self, precision: str) -> Availability:
        if ort is None:
            return Availability(False, "onnxruntime is not installed (pip install onnxruntime)")
        if precision not in SUPPORTED_PRECISIONS:
            return Availability(
                False, f"{precision} is not implemented for ONNX Runtime CPU in this version"
            )
        return Availability(True)

    def version(self) -> str:
        return str(ort.__version__) if ort is not None else "missing"

    def device(self) -> dict[str, Any]:
        return cpu_info()

    def _options(self, threads: int, level: Any) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        return opts

    def build(self, onnx_path: Path, bundle_dir: Path, precision: str) -> BuiltEngine:
        threads = default_threads()
        opts = self._options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.optimized_model_filepath = str(bundle_dir / ENGINE_FILE)
        try:
            ort.InferenceSession(
                str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ExportError(
                f"ONNX Runtime {ort.__version__} could not build an engine from "
                f"{onnx_path.name}: {_first_line(exc)} — where it names an op or node, ONNX "
                "Runtime CPU does not implement it: replace that op in the model or choose "
                "another target; where it names an IR or opset version, upgrade onnxruntime."
            ) from exc
        log.info(
            "ONNX Runtime %s optimised %s with %d threads", ort.__version__, onnx_path, threads
        )
        return BuiltEngine(
            engine_file=ENGINE_FILE,
            backend_version=self.version(),
            device=self.device(),
            settings={
                "provider": "CPUExecutionProvider",
                "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op_num_threads": threads,
                "inter_op_num_threads": 1,
                "execution_mode": "sequential",
            },
        )

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> EngineSession:
        threads = int(settings.get("intra_op_num_threads") or default_threads())
        threads = min(threads, default_threads())
        opts = self._options(threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:
            session = ort.InferenceSession(
                str(engine_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(
                f"ONNX Runtime could not load the engine {engine_path}: {exc} — the engine was "
                "optimised for the CPU recorded in its manifest; recompile it on this machine."
            ) from exc
        return OrtSession(session)
