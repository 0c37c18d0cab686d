"""OpenVINO CPU backend on real graphs: fp32 equals ONNX Runtime, bf16 is close where the CPU
has bf16, the explicit Q/DQ int8 ONNX runs with int8 kernels and matches the simulated
quantisation, and an op OpenVINO cannot read is named in the error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_precision_int8 import TinySR, _images

from esr_deploy.backends.onnxruntime import cpu_session
from esr_deploy.backends.openvino import ENGINE_FILE, OpenVinoCPU, capabilities
from esr_deploy.cpu import bf16_unavailable_reason
from esr_deploy.errors import ExportError, TargetUnavailable
from esr_deploy.export import export_onnx
from esr_deploy.precision.calibration import collect_stats
from esr_deploy.precision.int8 import name_nodes, quantize_int8
from esr_deploy.targets import require_available


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ov") / "tiny.onnx"
    export_onnx(TinySR().eval(), path, scale=2, data_range=255.0)
    return path


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    session = cpu_session(path, threads=1, optimize=False)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 255) / 255.0 - np.clip(b, 0, 255) / 255.0) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-20))


def _build(src: Path, folder: Path, precision: str) -> np.ndarray:
    backend = OpenVinoCPU()
    built = backend.build(src, folder, precision)
    assert (folder / ENGINE_FILE).is_file() and (folder / "engine.bin").is_file()
    assert built.settings["precision"] == precision
    x = _images(1, hw=(20, 28), seed=4).inputs[0]
    return backend.load(folder / ENGINE_FILE, built.settings).run(x), x  # type: ignore[return-value]


def test_fp32_matches_onnx_runtime(fp32_path: Path, tmp_path: Path) -> None:
    out, x = _build(fp32_path, tmp_path, "fp32")
    ref = _reference(fp32_path, x)
    assert out.shape == ref.shape == (1, 3, 40, 56)
    np.testing.assert_allclose(out, ref, atol=1e-3 * 255)


def test_bf16_is_close_where_the_cpu_has_bf16(fp32_path: Path, tmp_path: Path) -> None:
    """Where bf16 is native and OpenVINO reports it: an engine close to fp32; elsewhere the
    target is refused with the reason (what is right for the CPU the suite runs on)."""
    status = OpenVinoCPU().availability("bf16")
    if bf16_unavailable_reason() or "BF16" not in capabilities():
        assert not status.ok and "bf16" in status.reason
        with pytest.raises(TargetUnavailable, match="bf16"):
            require_available("ov-bf16")
        return
    assert status.ok
    out, x = _build(fp32_path, tmp_path, "bf16")
    p = _psnr(out, _reference(fp32_path, x))
    assert 35.0 < p < 120.0, p  # bf16 rounding: close, not identical


def test_int8_qdq_onnx_runs_and_matches_simulated_quantisation(
    fp32_path: Path, tmp_path: Path
) -> None:
    model = name_nodes(onnx.load(str(fp32_path)))
    stats = collect_stats(model, _images(), cache_dir=tmp_path / "cache")
    # the weight range whose int8 convolutions this CPU computes exactly (±63 where its
    # kernels saturate 16-bit pair sums: AVX2 or AVX-512 without VNNI)
    weight_max = OpenVinoCPU().int8_kernels().weight_max
    assert weight_max is not None
    q = quantize_int8(model, lambda t: stats.amax(t, "mse"), weight_max=weight_max).model
    qpath = tmp_path / "model.onnx"
    onnx.save(q, str(qpath))
    out, x = _build(qpath, tmp_path, "int8")
    simulated = _reference(qpath, x)
    fp32 = _reference(fp32_path, x)
    assert _psnr(out, simulated) > 40.0  # the same quantised model
    assert _psnr(out, fp32) < 90.0  # and really quantised


def test_op_openvino_cannot_read_is_named(tmp_path: Path) -> None:
    node = helper.make_node("MagicUpsample", ["lr"], ["sr"], name="my_upsampler",
                            domain="com.example")  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)],
        ir_version=10,
    )
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    with pytest.raises(ExportError, match="MagicUpsample|my_upsampler"):
        OpenVinoCPU().build(src, tmp_path, "fp32")
