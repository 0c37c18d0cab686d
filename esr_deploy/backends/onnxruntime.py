"""ONNX Runtime CPU backend (targets ``ort-*``).

Build = let ONNX Runtime apply all of its graph optimisations (constant folding, Conv+Add and
Conv+activation fusion, NCHWc layout transforms for this CPU) once, and save the optimised
graph as the engine. The optimised graph may contain layout-specific contrib ops, so the
manifest records the CPU it was built on; loading it runs no further optimisation.

Precisions:

- ``fp32``: the exported graph.
- ``int8``: the explicit Q/DQ graph of :mod:`esr_deploy.precision.int8`, *lowered* for x86
  first (:func:`lower_int8_activations`): ONNX Runtime fuses ``DQ → Conv → Q`` into
  ``QLinearConv`` on x86 only for uint8 activations (its u8×s8 kernels), so every activation
  Q/DQ pair with int8 zero point 0 is rewritten to uint8 with zero point 128. This is exact:
  ``clip(round(x/s) + 128, 0, 255) = clip(round(x/s), -128, 127) + 128`` and the DQ subtracts
  the 128 back. Weights stay int8, in the range the u8×s8 kernels compute exactly on this CPU
  (:meth:`OnnxRuntimeCPU.int8_kernels`: ±127 with VNNI/AMX, ±63 where 16-bit pair sums
  saturate); an engine whose weights exceed that range is refused at build and at load.
- ``fp16``: available only where ONNX Runtime has native float16 Conv kernels for this CPU
  (:func:`native_fp16`); on x86 it wraps float16 Convs in Casts to float32, which is slower
  than fp32 and not a float16 engine, so the target is refused with that reason.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.cpu import cpu_info, default_threads
from esr_deploy.errors import BundleError, ExportError
from esr_deploy.precision.int8_kernels import (
    Int8Kernels,
    graph_weight_max,
    measure,
    weights_problem,
)
from esr_deploy.shapes import ShapeProfile

log = logging.getLogger(__name__)

try:  # the only place onnxruntime is imported
    import onnxruntime as ort
except ImportError:  # pragma: no cover - onnxruntime is a core dependency
    ort = None

ENGINE_FILE = "engine.onnx"
SUPPORTED_PRECISIONS = ("fp32", "int8", "fp16")


def lower_int8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with int8/zero-point-0 activation Q/DQ pairs as uint8/zero-point-128
    (see the module docstring); weight DequantizeLinear nodes (int8 initializers) are kept."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    quantized = set()
    lowered: dict[str, str] = {}

    def lower(node: onnx.NodeProto) -> None:
        if len(node.input) < 3 or node.input[2] not in inits:
            return
        zp = numpy_helper.to_array(inits[node.input[2]])
        if zp.dtype != np.int8 or zp.size != 1 or int(zp.reshape(-1)[0]) != 0:
            return
        name = node.input[2]
        if name not in lowered:
            lowered[name] = f"{name}_uint8"
            graph.initializer.append(
                numpy_helper.from_array(np.array(128, dtype=np.uint8), lowered[name])
            )
        node.input[2] = lowered[name]

    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            lower(node)
            quantized.add(node.output[0])
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized:
            lower(node)
    del graph.value_info[:]
    return out


def native_fp16() -> Availability:
    """Whether ONNX Runtime runs a float16 Conv natively on this CPU (no Casts inserted)."""
    global _NATIVE_FP16
    if _NATIVE_FP16 is not None:
        return _NATIVE_FP16
    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), dtype=np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "fp16_probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [1, 4, 8, 8])],
        [w],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    if "Cast" in ops:
        _NATIVE_FP16 = Availability(
            False,
            f"ONNX Runtime {ort.__version__} has no float16 Conv kernel for this CPU (it wraps "
            "float16 Convs in Casts to float32: slower than fp32 and not a float16 engine); "
            "--target onnx-fp16 makes and checks the float16 ONNX here (for TensorRT), "
            "ort-int8 is the fast reduced-precision CPU target",
        )
    else:
        _NATIVE_FP16 = Availability(True)
    return _NATIVE_FP16


_NATIVE_FP16: Availability | None = None


def first_line(exc: BaseException) -> str:
    """The first line of a runtime's exception message (they run to many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cpu_session(model: Path | bytes, threads: int | None = None, optimize: bool = True) -> Any:
    """A plain ONNX Runtime CPU session on ``model`` (a path or serialized ONNX), for the
    compiler's own checks (export verification, calibration, precision searches): basic
    graph optimisations only, so the graph that runs is the graph that was given."""
    if ort is None:  # pragma: no cover - onnxruntime is a core dependency
        raise ExportError("onnxruntime is not installed — pip install onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


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
        if precision == "fp16":
            return native_fp16()
        if precision == "int8" and self.int8_kernels().weight_max is None:
            return Availability(False, self.int8_kernels().reason)
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

    def int8_kernels(self) -> Int8Kernels:
        return _int8_kernels()

    def build(
        self,
        onnx_path: Path,
        bundle_dir: Path,
        precision: str,
        profile: ShapeProfile | None = None,
    ) -> BuiltEngine:
        threads = default_threads()
        opts = self._options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        opts.optimized_model_filepath = str(bundle_dir / ENGINE_FILE)
        source: str | bytes = str(onnx_path)
        int8: dict[str, Any] = {}
        if precision == "int8":
            model = onnx.load(str(onnx_path))
            int8 = int8_settings(model, self.int8_kernels(), f"building {onnx_path.name}")
            source = lower_int8_activations(model).SerializeToString()
        try:
            ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ExportError(
                f"ONNX Runtime {ort.__version__} could not build an engine from "
                f"{onnx_path.name}: {first_line(exc)} — where it names an op or node, ONNX "
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
                "precision": precision,
                "int8_activations": "uint8 (lowered from int8, exact)"
                if precision == "int8"
                else None,
                "graph_optimization_level": "ORT_ENABLE_ALL",
                "intra_op_num_threads": threads,
                "inter_op_num_threads": 1,
                "execution_mode": "sequential",
                **int8,
            },
        )

    def load(self, engine_path: Path, settings: Mapping[str, Any]) -> EngineSession:
        check_int8_settings(settings, self.int8_kernels(), engine_path)
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


def int8_settings(model: onnx.ModelProto, kernels: Int8Kernels, doing: str) -> dict[str, Any]:
    """The manifest settings of an int8 engine built from ``model`` on these kernels, or an
    :class:`ExportError` where its weights exceed the range the kernels compute exactly."""
    seen = graph_weight_max(model)
    problem = weights_problem(kernels, seen)
    if problem:
        raise ExportError(
            f"Cannot build an int8 engine here ({doing}) — {problem} — compile the target "
            "with esr-deploy, which quantises the weights to the range this CPU computes "
            "exactly, or choose an fp32 target."
        )
    return {"int8_weight_max": seen, "int8_kernels": kernels.to_dict()}


def check_int8_settings(
    settings: Mapping[str, Any], kernels: Int8Kernels | None, engine: Path
) -> None:
    """Refuse an int8 engine whose weights this CPU's kernels would saturate on."""
    seen = settings.get("int8_weight_max")
    if seen is None or kernels is None:
        return
    problem = weights_problem(kernels, int(seen))
    if problem:
        raise BundleError(
            f"The int8 engine {engine} would compute wrong values on this CPU — {problem}; "
            f"it was built where they are exact ({settings.get('int8_kernels', {}).get('why')})"
            " — recompile the bundle on this machine, which chooses the weight range that is "
            "exact here."
        )


def _run_lowered(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    lowered = lower_int8_activations(model).SerializeToString()
    session = ort.InferenceSession(lowered, opts, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@functools.cache
def _int8_kernels() -> Int8Kernels:
    return measure(f"ONNX Runtime {ort.__version__}", _run_lowered)
