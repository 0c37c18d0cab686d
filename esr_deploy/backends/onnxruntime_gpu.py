"""ONNX Runtime on an NVIDIA GPU (targets ``ort-cuda-fp32``, ``ort-cuda-fp16``, ``ort-trt-fp16``).

Two execution providers of the ``onnxruntime-gpu`` package:

- ``cuda`` (``CUDAExecutionProvider``): ONNX Runtime's own CUDA/cuDNN kernels, convolution
  algorithms chosen by exhaustive cuDNN search at the first run of each shape.
- ``tensorrt`` (``TensorrtExecutionProvider``): ONNX Runtime hands the graph to TensorRT,
  which builds an engine at the first run of each new input shape range. Its engines and
  timing cache are kept per GPU model and ONNX Runtime version under the esr-deploy cache
  folder (not in the bundle, which stays read-only and checksummed), so a later session
  reuses them.

Build = the engine *is* the given ONNX, copied as ``engine.onnx``: the fp32 export, or the
float16 ONNX of :mod:`esr_deploy.precision.fp16` for fp16 (its IO stays float32). Precision
comes from that ONNX, never from a provider option (``trt_fp16_enable`` stays off), exactly
as for the native TensorRT backend;
:func:`esr_deploy.backends.tensorrt_compat.check_onnx_precision` refuses an ONNX of the wrong
precision.

Loading checks that ONNX Runtime really placed the session on the GPU provider: when CUDA or
TensorRT libraries are missing ONNX Runtime silently falls back to the CPU.

``onnxruntime`` is imported by :mod:`esr_deploy.backends.onnxruntime` only; the GPU is
described by :func:`esr_deploy.gpu.gpu_info`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.backends.onnxruntime import OrtSession, first_line, ort
from esr_deploy.backends.tensorrt_compat import check_onnx_precision
from esr_deploy.errors import BundleError, EsrDeployError, ExportError, TargetUnavailable
from esr_deploy.gpu import cuda_availability, gpu_info, gpu_slug
from esr_deploy.paths import cache_root
from esr_deploy.shapes import ShapeProfile

log = logging.getLogger(__name__)

ENGINE_FILE = "engine.onnx"
#: provider argument → ONNX Runtime execution provider
PROVIDERS: Mapping[str, str] = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
#: precisions each provider builds here (int8 Q/DQ graphs are for the TensorRT targets)
SUPPORTED_PRECISIONS: Mapping[str, tuple[str, ...]] = {
    "cuda": ("fp32", "fp16"),
    "tensorrt": ("fp32", "fp16"),
}


class OnnxRuntimeGPU(Backend):
    """ONNX Runtime with the CUDA or the TensorRT execution provider (``provider``)."""

    name = "onnxruntime-gpu"

    def __init__(self, provider: str = "cuda") -> None:
        if provider not in PROVIDERS:
            raise EsrDeployError(
                f"Unknown ONNX Runtime GPU provider '{provider}' — use one of "
                f"{', '.join(PROVIDERS)}."
            )
        self.provider = provider
        self.execution_provider = PROVIDERS[provider]

    def availability(self, precision: str) -> Availability:
        supported = SUPPORTED_PRECISIONS[self.provider]
        if precision not in supported:
            return Availability(
                False,
                f"{precision} is not built with ONNX Runtime's {self.execution_provider} here "
                f"(it builds {', '.join(supported)}); the TensorRT targets build int8",
            )
        if ort is None:
            return Availability(
                False,
                "onnxruntime is not installed — pip install onnxruntime-gpu on a CUDA machine",
            )
        present = list(ort.get_available_providers())
        if self.execution_provider not in present:
            return Availability(
                False,
                f"onnxruntime-gpu is not installed: this onnxruntime {ort.__version__} has "
                f"providers {', '.join(present)} and no {self.execution_provider} — pip "
                "install onnxruntime-gpu on a CUDA machine (in place of onnxruntime)",
            )
        return cuda_availability(precision)

    def version(self) -> str:
        return str(ort.__version__) if ort is not None else "missing"

    def device(self) -> dict[str, Any]:
        info = gpu_info()
        info["provider"] = self.execution_provider
        return info

    def cache_dir(self) -> Path:
        """Where the TensorRT provider keeps engines and its timing cache for this GPU."""
        info = gpu_info()
        if info["name"] is None:
            raise TargetUnavailable("no CUDA GPU is visible to PyTorch on this machine.")
        key = gpu_slug(str(info["name"]), str(info["compute_capability"]))
        return cache_root() / "onnxruntime-trt" / f"{key}-ort{self.version()}"

    def provider_options(self, device_id: int = 0) -> dict[str, Any]:
        """The options the session's GPU provider gets (precision is never among them)."""
        if self.provider == "cuda":
            return {"device_id": device_id, "cudnn_conv_algo_search": "EXHAUSTIVE"}
        cache = self.cache_dir()
        return {
            "device_id": device_id,
            "trt_fp16_enable": False,  # precision comes from the ONNX
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
        }

    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        status = self.availability(precision)
        if not status.ok:
            raise TargetUnavailable(
                f"ONNX Runtime {self.execution_provider} {precision} cannot run here — "
                f"{status.reason}."
            )
        check_onnx_precision(onnx_path, precision)
        target = bundle_dir / ENGINE_FILE
        if onnx_path.resolve() != target.resolve():
            try:
                shutil.copyfile(onnx_path, target)
            except OSError as exc:
                raise ExportError(
                    f"Cannot copy {onnx_path} into the bundle: {exc.strerror} — check the "
                    "output folder."
                ) from exc
        options = {k: v for k, v in self.provider_options().items() if not k.endswith("_path")}
        log.info("ONNX Runtime %s engine: %s (%s)", self.execution_provider, target, precision)
        return BuiltEngine(
            engine_file=ENGINE_FILE,
            backend_version=self.version(),
            device=self.device(),
            settings={
                "provider": self.execution_provider,
                "precision": precision,
                "provider_options": options,
                "engine_cache": str(self.cache_dir()) if self.provider == "tensorrt" else None,
            },
        )

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> EngineSession:
        precision = str(settings.get("precision", "fp32"))
        status = self.availability(precision)
        if not status.ok:
            raise BundleError(
                f"Cannot load the ONNX Runtime {self.execution_provider} engine {engine_path} "
                f"— {status.reason}."
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.provider == "tensorrt":
            self.cache_dir().mkdir(parents=True, exist_ok=True)
        providers = [(self.execution_provider, self.provider_options()), "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(engine_path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(
                f"ONNX Runtime {self.version()} could not load {engine_path} with "
                f"{self.execution_provider}: {first_line(exc)} — check that the CUDA, cuDNN "
                "(and TensorRT) libraries onnxruntime-gpu needs are installed, or recompile."
            ) from exc
        used = list(session.get_providers())
        if self.execution_provider not in used:
            raise BundleError(
                f"ONNX Runtime did not place {engine_path.name} on {self.execution_provider}: "
                f"the session runs on {', '.join(used)} — the provider's libraries (CUDA, "
                "cuDNN, TensorRT) failed to load; see ONNX Runtime's log and install the "
                "versions this onnxruntime-gpu was built for."
            )
        return OrtSession(session)
