"""Portable precision ONNX (targets ``onnx-fp16``, ``onnx-int8``): the hand-off artefact.

TensorRT 10/11 take precision from the ONNX itself (a strongly typed float16 graph, explicit
Q/DQ for int8), so the precision ONNX is what a GPU machine builds its engine from. This
backend makes that ONNX the bundle's engine and checks it on this CPU, so the bundle is
validated (parity and PSNR drop) before it is handed on:

- ``fp16``: ONNX Runtime CPU has no float16 kernels on x86, so the graph runs as
  :func:`esr_deploy.precision.fp16_emulation.emulate_fp16` makes it: every op in float32, every
  float16 tensor rounded to float16 at every op boundary (overflow shows as inf).
- ``int8``: ONNX Runtime runs the Q/DQ graph as written (simulated quantisation: every
  quantised tensor is rounded to its int8 grid), without fusing it into int8 kernels.

Latency of these checks says nothing about a deployed engine and is not measured.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.backends.onnxruntime import OnnxRuntimeCPU, OrtSession, cpu_info, cpu_session
from esr_deploy.shapes import ShapeProfile

SUPPORTED_PRECISIONS = ("fp16", "int8")


class PortableOnnx(Backend):
    name = "onnx"
    measures_latency = False

    def availability(self, precision: str) -> Availability:
        if precision not in SUPPORTED_PRECISIONS:
            return Availability(
                False,
                f"onnx-{precision} is not a target: the fp32 ONNX is in every bundle "
                "(reference.onnx); use ort-fp32 for a CPU engine",
            )
        return OnnxRuntimeCPU().availability("fp32")

    def version(self) -> str:
        return f"onnx {onnx.__version__}; checked with onnxruntime {OnnxRuntimeCPU().version()}"

    def device(self) -> dict[str, Any]:
        return {"kind": "portable", "checked_on": cpu_info()}

    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        target = bundle_dir / onnx_path.name
        if onnx_path.resolve() != target.resolve():
            shutil.copyfile(onnx_path, target)
        check = (
            "float16 rounding emulated at every op boundary"
            if precision == "fp16"
            else ("Q/DQ run as written by ONNX Runtime CPU (simulated quantisation)")
        )
        return BuiltEngine(
            engine_file=onnx_path.name,
            backend_version=self.version(),
            device=self.device(),
            settings={"precision": precision, "checked_by": check},
        )

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> EngineSession:
        model = onnx.load(str(engine_path))
        if settings.get("precision") == "fp16":
            from esr_deploy.precision.fp16_emulation import emulate_fp16

            model = emulate_fp16(model)
        return OrtSession(cpu_session(model.SerializeToString(), optimize=False))
