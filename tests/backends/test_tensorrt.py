"""TensorRT and ONNX Runtime GPU backends.

On any machine: the timing-cache location, the ONNX precision check, and the availability
probes (which on a machine without TensorRT or a GPU must say so); the optimisation profiles
and the manifest compatibility check are in ``test_tensorrt_profiles.py`` and
``test_tensorrt_compat.py``. On a GPU machine with TensorRT (``pytest -m gpu``): real engine
builds of a tiny super-resolution ONNX in fp32, fp16 and int8, checked against ONNX Runtime
CPU; CUDA-graph replay; the timing cache reused; parser errors naming the node; a manifest
from another GPU refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from esr_deploy.backends.onnxruntime import cpu_session
from esr_deploy.backends.onnxruntime_gpu import OnnxRuntimeGPU
from esr_deploy.backends.tensorrt import ENGINE_FILE, TensorRT, TensorRTOptions, timing_cache_path
from esr_deploy.backends.tensorrt_compat import check_gpu_engine, check_onnx_precision
from esr_deploy.errors import (
    BundleError,
    EsrDeployError,
    ExportError,
    TargetUnavailable,
)
from esr_deploy.paths import cache_root
from esr_deploy.recipe import ShapeProfile

# ------------------------------------------------------------------------ timing cache


def test_timing_cache_path_depends_on_gpu_cc_and_version(tmp_path: Path) -> None:
    base = timing_cache_path("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35", root=tmp_path)
    assert base == tmp_path / "tensorrt" / "nvidia-h100-80gb-hbm3-sm90-trt10.13.0.35.cache"
    others = {
        timing_cache_path("NVIDIA A100-SXM4-80GB", "8.0", "10.13.0.35", root=tmp_path),
        timing_cache_path("NVIDIA H100 80GB HBM3", "8.9", "10.13.0.35", root=tmp_path),
        timing_cache_path("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43", root=tmp_path),
        timing_cache_path("NVIDIA H100 80GB HBM3", (9, 0), "11.0.0", root=tmp_path),
    }
    assert base not in others and len(others) == 4


def test_cache_root_honours_esr_deploy_cache_then_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ESR_DEPLOY_CACHE", raising=False)
    assert cache_root() == tmp_path / "xdg" / "esr-deploy"
    monkeypatch.setenv("ESR_DEPLOY_CACHE", str(tmp_path / "mine"))
    path = timing_cache_path("RTX 4090", "8.9", "10.13.0.35")
    assert path == tmp_path / "mine" / "tensorrt" / "rtx-4090-sm89-trt10.13.0.35.cache"
    monkeypatch.delenv("ESR_DEPLOY_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "esr-deploy"


# ---------------------------------------------------------------- tiny SR graphs (ONNX)


def _sr_onnx(path: Path, precision: str = "fp32", seed: int = 0) -> Path:
    """conv3x3(3→8) → ReLU → conv3x3(8→12) → DepthToSpace(2): a ×2 SR net with dynamic H×W,
    float32 IO. fp16: Casts at the IO, float16 weights inside. int8: the input and the
    first conv's weights quantised (symmetric, zero point 0, weights per channel)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 8).astype(np.float32)
    w2 = rng.normal(0, 0.3, (12, 8, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 12).astype(np.float32)
    nodes, inits = [], []
    x = "lr"
    wdt = np.float16 if precision == "fp16" else np.float32
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["lr"], ["lr16"], to=TensorProto.FLOAT16))
        x = "lr16"
    w1_name = "w1"
    if precision == "int8":
        w_scale = (np.abs(w1).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
        w_q = np.clip(np.round(w1 / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(w_q, "w1_q"),
            numpy_helper.from_array(w_scale, "w1_scale"),
            numpy_helper.from_array(np.zeros(8, np.int8), "w1_zp"),
            numpy_helper.from_array(np.array(1 / 127, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["lr", "x_scale", "x_zp"], ["lr_q"]),
            helper.make_node("DequantizeLinear", ["lr_q", "x_scale", "x_zp"], ["lr_dq"]),
            helper.make_node("DequantizeLinear", ["w1_q", "w1_scale", "w1_zp"], ["w1"], axis=0),
        ]
        x, w1_name = "lr_dq", "w1"
    else:
        inits.append(numpy_helper.from_array(w1.astype(wdt), "w1"))
    inits += [
        numpy_helper.from_array(b1.astype(wdt), "b1"),
        numpy_helper.from_array(w2.astype(wdt), "w2"),
        numpy_helper.from_array(b2.astype(wdt), "b2"),
    ]
    nodes += [
        helper.make_node("Conv", [x, w1_name, "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("DepthToSpace", ["c2"], ["sr_raw"], blocksize=2, mode="CRD"),
    ]
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["sr_raw"], ["sr"], to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("Identity", ["sr_raw"], ["sr"]))
    graph = helper.make_graph(
        nodes,
        f"tiny_sr_{precision}",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "h2", "w2"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _lr(h: int, w: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, h, w), dtype=np.float32)


def _ort_cpu(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(cpu_session(path, threads=1).run(None, {"lr": x})[0])


def test_tiny_sr_onnx_runs_on_ort_cpu_in_every_precision(tmp_path: Path) -> None:
    x = _lr(9, 13)
    ref = _ort_cpu(_sr_onnx(tmp_path / "fp32.onnx"), x)
    assert ref.shape == (1, 3, 18, 26)
    for precision, tol in (("fp16", 2e-2), ("int8", 0.2)):
        out = _ort_cpu(_sr_onnx(tmp_path / f"{precision}.onnx", precision), x)
        assert np.abs(out - ref).max() < tol, precision


def test_onnx_precision_check_refuses_a_float32_graph_for_fp16(tmp_path: Path) -> None:
    fp32 = _sr_onnx(tmp_path / "fp32.onnx")
    fp16 = _sr_onnx(tmp_path / "fp16.onnx", "fp16")
    int8 = _sr_onnx(tmp_path / "int8.onnx", "int8")
    check_onnx_precision(fp32, "fp32")
    check_onnx_precision(fp16, "fp16")
    check_onnx_precision(int8, "int8")
    with pytest.raises(ExportError, match="no float16 tensor") as info:
        check_onnx_precision(fp32, "fp16")
    assert "fp32.onnx" in str(info.value) and "strongly typed" in str(info.value)
    with pytest.raises(ExportError, match="no QuantizeLinear"):
        check_onnx_precision(fp16, "int8")
    with pytest.raises(ExportError, match="float16 tensors"):
        check_onnx_precision(fp16, "fp32")


# ------------------------------------------------------------------ availability here


def test_options_are_validated() -> None:
    assert TensorRTOptions().optimization_level == 3
    with pytest.raises(EsrDeployError, match="optimization level 7"):
        TensorRTOptions(optimization_level=7)
    with pytest.raises(EsrDeployError, match="workspace"):
        TensorRTOptions(workspace_mib=0)


def _no_tensorrt_here() -> bool:
    return not TensorRT().availability("fp32").ok


@pytest.mark.skipif(not _no_tensorrt_here(), reason="TensorRT and a GPU are available here")
def test_tensorrt_unavailable_here_says_why(tmp_path: Path) -> None:
    backend = TensorRT()
    for precision in ("fp32", "fp16", "int8"):
        status = backend.availability(precision)
        assert not status.ok
        assert (
            "only its type stubs are installed" in status.reason
            or "it is not installed" in status.reason
            or "no CUDA GPU is visible" in status.reason
        ), status.reason
    reason = backend.availability("fp16").reason
    assert "esr-deploy[tensorrt]" in reason or "no CUDA GPU" in reason, reason
    assert not backend.availability("bf16").ok
    with pytest.raises(TargetUnavailable, match="cannot run here"):
        backend.build(_sr_onnx(tmp_path / "m.onnx"), tmp_path, "fp32")
    assert not (tmp_path / ENGINE_FILE).exists()
    with pytest.raises(BundleError, match="Cannot load"):
        backend.load(tmp_path / ENGINE_FILE, {"precision": "fp32"})


@pytest.mark.skipif(not _no_tensorrt_here(), reason="TensorRT and a GPU are available here")
def test_device_without_gpu_records_none_and_the_tensorrt_state() -> None:
    device = TensorRT(TensorRTOptions(hardware_compatible=True)).device()
    assert device["kind"] == "gpu" and device["hardware_compatibility"] == "ampere+"
    if not torch.cuda.is_available():
        assert device["name"] is None and device["compute_capability"] is None


def test_onnxruntime_gpu_unavailable_names_the_providers_present() -> None:
    import onnxruntime as ort

    present = ort.get_available_providers()
    status = OnnxRuntimeGPU("cuda").availability("fp32")
    if "CUDAExecutionProvider" in present and torch.cuda.is_available():
        assert status.ok
        return
    assert not status.ok
    if "CUDAExecutionProvider" not in present:
        assert "onnxruntime-gpu is not installed" in status.reason
        assert all(p in status.reason for p in present)
        assert "pip install onnxruntime-gpu" in status.reason
    trt_ep = OnnxRuntimeGPU("tensorrt").availability("fp16")
    assert not trt_ep.ok or "TensorrtExecutionProvider" in present


def test_onnxruntime_gpu_rejects_unknown_provider_and_int8() -> None:
    with pytest.raises(EsrDeployError, match="cuda, tensorrt"):
        OnnxRuntimeGPU("rocm")
    status = OnnxRuntimeGPU("tensorrt").availability("int8")
    assert not status.ok and "int8" in status.reason


# ------------------------------------------------------------------------ GPU: TensorRT


def _require(backend: TensorRT | OnnxRuntimeGPU, precision: str) -> None:
    status = backend.availability(precision)
    if not status.ok:
        pytest.skip(status.reason)


@pytest.fixture()
def trt_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESR_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2), ("int8", 2e-2)])
def test_trt_engine_matches_onnxruntime_cpu(
    tmp_path: Path, trt_cache: Path, precision: str, atol: float
) -> None:
    backend = TensorRT()
    _require(backend, precision)
    src = _sr_onnx(tmp_path / f"{precision}.onnx", precision)
    profile = ShapeProfile(opt=(32, 32), max=(64, 96), min=(4, 4))
    built = backend.build(src, tmp_path, precision, profile)
    assert built.engine_file == ENGINE_FILE and (tmp_path / ENGINE_FILE).stat().st_size > 0
    settings = built.settings
    assert settings["strongly_typed"] is True and settings["precision"] == precision
    assert [p["max"] for p in settings["profiles"]] == [[1, 3, 64, 96], [1, 3, 96, 64]]
    assert built.device["compute_capability"] and built.backend_version == backend.version()
    session = backend.load(tmp_path / ENGINE_FILE, settings)
    for h, w in ((32, 32), (17, 45), (90, 30), (4, 4)):  # opt, odd, portrait, min
        x = _lr(h, w)
        out = session.run(x)
        ref = _ort_cpu(src, x)
        assert out.shape == ref.shape == (1, 3, 2 * h, 2 * w)
        np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    with pytest.raises(EsrDeployError, match="1x3x128x128"):
        session.run(_lr(128, 128))


@pytest.mark.gpu
def test_trt_cuda_graph_replay_equals_plain_run(tmp_path: Path, trt_cache: Path) -> None:
    plain_backend = TensorRT()
    _require(plain_backend, "fp32")
    src = _sr_onnx(tmp_path / "m.onnx")
    built = TensorRT(TensorRTOptions(cuda_graph=True)).build(
        src, tmp_path, "fp32", ShapeProfile(opt=(32, 32), max=(64, 64), min=(4, 4))
    )
    assert built.settings["cuda_graph"] is True
    graphed = plain_backend.load(tmp_path / ENGINE_FILE, built.settings)
    plain = plain_backend.load(tmp_path / ENGINE_FILE, {**built.settings, "cuda_graph": False})
    assert graphed.cuda_graph and not plain.cuda_graph
    for seed, (h, w) in enumerate([(32, 32), (32, 32), (32, 32), (20, 48), (20, 48), (32, 32)]):
        x = torch.from_numpy(_lr(h, w, seed)).cuda()
        first = graphed.run_torch(x)
        second = graphed.run_torch(x)  # a replay must not change the previous result
        expected = plain.run_torch(x)
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(second, expected, rtol=0, atol=1e-6)
    assert graphed.cuda_graph, "the CUDA graph capture fell back to plain runs"
    times = graphed.latency_ms(_lr(32, 32), warmup=2, runs=5)
    assert len(times) == 5 and all(t > 0 for t in times)


@pytest.mark.gpu
def test_trt_timing_cache_is_saved_and_reused(tmp_path: Path, trt_cache: Path) -> None:
    backend = TensorRT(TensorRTOptions(optimization_level=1))
    _require(backend, "fp32")
    src = _sr_onnx(tmp_path / "m.onnx")
    profile = ShapeProfile(opt=(16, 16), max=(32, 32), min=(4, 4))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = backend.build(src, tmp_path / "a", "fp32", profile)
    cache = Path(first.settings["timing_cache"])
    assert cache.is_file() and cache.is_relative_to(trt_cache) and cache.stat().st_size > 0
    assert first.settings["timing_cache_hit"] is False
    second = backend.build(src, tmp_path / "b", "fp32", profile)
    assert second.settings["timing_cache_hit"] is True


@pytest.mark.gpu
def test_trt_parser_error_names_the_node(tmp_path: Path, trt_cache: Path) -> None:
    backend = TensorRT()
    _require(backend, "fp32")
    node = helper.make_node("MagicUpsample", ["lr"], ["sr"], name="my_upsampler", domain="x.y")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("x.y", 1)],
        ir_version=10,
    )
    src = tmp_path / "bad.onnx"
    onnx.save(model, str(src))
    with pytest.raises(ExportError, match="my_upsampler|MagicUpsample") as info:
        backend.build(src, tmp_path, "fp32")
    assert "could not parse bad.onnx" in str(info.value)
    assert not (tmp_path / ENGINE_FILE).exists()


@pytest.mark.gpu
def test_trt_engine_refuses_a_manifest_from_another_gpu(tmp_path: Path, trt_cache: Path) -> None:
    backend = TensorRT()
    _require(backend, "fp32")
    built = backend.build(
        _sr_onnx(tmp_path / "m.onnx"), tmp_path, "fp32", ShapeProfile(max=(32, 32), opt=(16, 16))
    )
    entry = {
        "file": built.engine_file,
        "backend_version": built.backend_version,
        "device": dict(built.device),
        "settings": dict(built.settings),
    }
    check_gpu_engine(entry, backend.device(), backend.version())
    other = {**entry, "device": {**built.device, "name": "Other GPU", "compute_capability": "1.0"}}
    with pytest.raises(BundleError, match="compute capability 1.0"):
        check_gpu_engine(other, backend.device(), backend.version())
    with pytest.raises(BundleError, match="9.9.9"):
        check_gpu_engine(entry, backend.device(), "9.9.9")


# ------------------------------------------------------------------- GPU: ONNX Runtime


@pytest.mark.gpu
@pytest.mark.parametrize(("provider", "precision"), [("cuda", "fp32"), ("cuda", "fp16")])
def test_onnxruntime_gpu_matches_cpu(tmp_path: Path, provider: str, precision: str) -> None:
    backend = OnnxRuntimeGPU(provider)
    _require(backend, precision)
    src = _sr_onnx(tmp_path / f"{precision}.onnx", precision)
    (tmp_path / "bundle").mkdir()
    built = backend.build(src, tmp_path / "bundle", precision)
    assert built.settings["provider"] == "CUDAExecutionProvider"
    session = backend.load(tmp_path / "bundle" / built.engine_file, built.settings)
    x = _lr(21, 34)
    atol = 1e-4 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(session.run(x), _ort_cpu(src, x), atol=atol, rtol=0)
