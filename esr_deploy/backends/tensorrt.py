"""TensorRT backend (targets ``trt-fp32``, ``trt-fp16``, ``trt-int8``), TensorRT 10 and 11 API.

Build = parse the ONNX into a **strongly typed** network and let TensorRT pick, for this GPU,
the fastest kernels (tactics) for every layer at the optimisation profiles' shapes; the
serialized plan is the engine (``engine.plan``).

Precision is the ONNX's (the fp32 export, the float16 ONNX of :mod:`esr_deploy.precision.fp16`
or the explicit Q/DQ ONNX of :mod:`esr_deploy.precision.int8`), checked before a build by
:func:`~esr_deploy.backends.tensorrt_compat.check_onnx_precision`; which machine a plan runs
on is checked by :func:`~esr_deploy.backends.tensorrt_compat.check_gpu_engine`. The
optimisation profiles (the input shapes an engine accepts) are computed in
:mod:`esr_deploy.backends.tensorrt_profiles`; the GPU is probed by :mod:`esr_deploy.gpu`.

Builds are slow (tactic timing), so the timing cache is kept per GPU model, compute capability
and TensorRT version under the esr-deploy cache folder (:func:`timing_cache_path`) and reused.

Runtime: I/O through PyTorch CUDA tensors (``set_tensor_address`` + ``execute_async_v3`` on
the current PyTorch stream); optionally replayed as a CUDA graph for a fixed shape.

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
import torch

from esr_deploy.backends.base import Availability, Backend, BuiltEngine, EngineSession
from esr_deploy.backends.tensorrt_compat import (
    AMPERE,
    SUPPORTED_TRT_MAJORS,
    check_gpu_engine,
    check_onnx_precision,
    version_tuple,
)
from esr_deploy.backends.tensorrt_profiles import (
    MAX_BATCH,
    ProfileShapes,
    fmt_shape,
    nchw,
    optimization_profiles,
    select_profile,
)
from esr_deploy.errors import BundleError, EsrDeployError, ExportError, TargetUnavailable
from esr_deploy.gpu import cuda_availability, gpu_info, gpu_slug
from esr_deploy.paths import cache_root
from esr_deploy.shapes import ShapeProfile

log = logging.getLogger(__name__)

try:  # the only place tensorrt is imported
    import tensorrt as trt
except ImportError:
    trt = None  # type: ignore[assignment]

ENGINE_FILE = "engine.plan"
SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8")


# --------------------------------------------------------------------------- build options


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


# ------------------------------------------------------------------------- device and probe


def tensorrt_version() -> str:
    """The installed TensorRT's version; ``"missing"`` or ``"stubs only"`` otherwise."""
    if trt is None:
        return "missing"
    if not hasattr(trt, "Builder"):
        return "stubs only"
    return str(trt.__version__)


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


def _parse_image_network(
    parser: trt.OnnxParser, network: trt.INetworkDefinition, onnx_path: Path, recorder: _LogRecorder
) -> trt.ITensor:
    """Parse ``onnx_path`` into ``network``; its one NCHW image input (else ExportError)."""
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
    if len(_dims(inp.shape)) != 4:
        raise ExportError(
            f"The input '{inp.name}' of {onnx_path.name} has shape {_dims(inp.shape)}; "
            "esr-deploy engines take NCHW images — export the model with a 4-D input."
        )
    return inp


def _add_profiles(
    builder: trt.Builder, config: trt.IBuilderConfig, inp: trt.ITensor, shape: ShapeProfile
) -> list[ProfileShapes]:
    """The optimisation profiles of a graph with dynamic H×W, added to ``config``
    (:func:`optimization_profiles`); a static graph's one shape, which needs none."""
    in_shape = _dims(inp.shape)
    if all(d >= 0 for d in in_shape[2:]):  # a static graph: the one shape it was exported with
        fixed = nchw(in_shape)
        return [ProfileShapes(fixed, fixed, fixed)]
    batch = in_shape[0] if in_shape[0] > 0 else 1
    channels = in_shape[1] if in_shape[1] > 0 else 3
    max_batch = MAX_BATCH if in_shape[0] < 0 else 1
    profiles = optimization_profiles(shape, batch, channels, max_batch)
    for shapes in profiles:
        p = builder.create_optimization_profile()
        p.set_shape(
            inp.name,
            trt.Dims(list(shapes.min)),
            trt.Dims(list(shapes.opt)),
            trt.Dims(list(shapes.max)),
        )
        config.add_optimization_profile(p)
    return profiles


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
            fixed = nchw(static)
            return [ProfileShapes(fixed, fixed, fixed)]
        profiles = []
        for index in range(self._engine.num_optimization_profiles):
            lo, opt, hi = self._engine.get_tensor_profile_shape(self.input_name, index)
            profiles.append(ProfileShapes(nchw(_dims(lo)), nchw(_dims(opt)), nchw(_dims(hi))))
        return profiles

    def _prepare(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """Set profile, shape and addresses for ``x``; the output tensor they point at."""
        shape = tuple(x.shape)
        index = select_profile(self.profiles, shape)
        if index != self._active_profile:
            if not self._context.set_optimization_profile_async(index, stream):
                raise EsrDeployError(
                    f"TensorRT could not switch to optimisation profile {index} for an input "
                    f"of shape {fmt_shape(shape)} — recompile the bundle."
                )
            self._active_profile = index
            self._input_shape = None
        if shape != self._input_shape:
            if not self._context.set_input_shape(self.input_name, shape):
                raise EsrDeployError(
                    f"TensorRT refused the input shape {fmt_shape(shape)} — the engine "
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
        version = version_tuple(trt.__version__)
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
        parser = trt.OnnxParser(network, logger)  # owns the weights: alive until the build
        inp = _parse_image_network(parser, network, onnx_path, recorder)
        config = builder.create_builder_config()
        profiles = _add_profiles(builder, config, inp, profile or ShapeProfile())
        self._configure(config)
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

    def _configure(self, config: trt.IBuilderConfig) -> None:
        """The build options on ``config`` (see :class:`TensorRTOptions`)."""
        opts = self.options
        config.builder_optimization_level = opts.optimization_level
        if opts.workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
        if opts.hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        if opts.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if not opts.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)

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
