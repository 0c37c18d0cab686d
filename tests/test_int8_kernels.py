"""int8 kernels that saturate: the probe's arithmetic, what ONNX Runtime and OpenVINO do on
*this* CPU, and on an emulated AVX2-only CPU (AMD Zen 3 under qemu-user), where their u8×s8
convolutions saturate 16-bit pair sums at full-range weights and are exact at ±63."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from esr_deploy.backends.onnxruntime import (
    OnnxRuntimeCPU,
    check_int8_settings,
    cpu_session,
)
from esr_deploy.backends.openvino import OpenVinoCPU
from esr_deploy.errors import BundleError, ExportError
from esr_deploy.precision.int8_kernels import (
    FULL_WEIGHT_MAX,
    REDUCED_WEIGHT_MAX,
    Int8Kernels,
    graph_weight_max,
    measure,
    probe_model,
    weights_problem,
)

REPO = Path(__file__).resolve().parent.parent
ZEN3_CPUINFO = Path(__file__).parent / "data" / "cpuinfo_zen3.txt"


def _float_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The Q/DQ graph as float arithmetic (no fusion): what the graph promises."""
    session = cpu_session(model.SerializeToString(), optimize=False)
    return np.asarray(session.run(None, {"x": x})[0])


def _saturating_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """What a vpmaddubsw kernel computes: u8 activations (zero point 128) times s8 weights,
    adjacent products summed into a saturating int16, then int32."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w = inits["w"].astype(np.int64)
    u8 = np.clip(np.round(x) + 128, 0, 255).astype(np.int64)
    c = w.shape[0]
    a = np.pad(u8[0], ((0, 0), (1, 1), (1, 1)), constant_values=128)
    out = np.zeros(x.shape[1:], dtype=np.float64)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            patch = a[:, i : i + 3, j : j + 3].reshape(-1)
            prod = patch[None, :] * w.reshape(c, -1)
            pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767).sum(axis=1)
            out[:, i, j] = pairs - 128 * w.reshape(c, -1).sum(axis=1)
    scale = float(inits["ys"])
    return (np.clip(np.round(out / scale), -128, 127) * scale)[None].astype(np.float32)


def test_the_probe_is_exact_as_a_graph_and_saturates_as_vpmaddubsw_does() -> None:
    exact = measure("float Q/DQ", _float_run)
    assert not exact.saturating and exact.weight_max == FULL_WEIGHT_MAX
    assert exact.full_range_error < 1e-6 and exact.reduced_range_error < 1e-6
    emulated = measure("vpmaddubsw", _saturating_run)
    assert emulated.saturating and emulated.weight_max == REDUCED_WEIGHT_MAX
    assert emulated.full_range_error > 0.5 and emulated.reduced_range_error < 1e-6
    assert "saturate" in emulated.reason and "±63" in emulated.reason


def test_graph_weight_max_reads_the_int8_weights() -> None:
    for m in (FULL_WEIGHT_MAX, REDUCED_WEIGHT_MAX):
        assert graph_weight_max(probe_model(m)[0]) == m


@pytest.mark.parametrize("backend", [OnnxRuntimeCPU(), OpenVinoCPU()], ids=["ort", "ov"])
def test_this_cpu_builds_only_weights_its_kernels_compute_exactly(
    backend: OnnxRuntimeCPU | OpenVinoCPU, tmp_path: Path
) -> None:
    kernels = backend.int8_kernels()
    assert kernels.weight_max in (FULL_WEIGHT_MAX, REDUCED_WEIGHT_MAX), kernels.reason
    model, x, exact = probe_model(FULL_WEIGHT_MAX)
    path = tmp_path / "probe.onnx"
    onnx.save(model, str(path))
    if kernels.saturating:
        with pytest.raises(ExportError, match="±127.*saturate"):
            backend.build(path, tmp_path, "int8")
        model, x, exact = probe_model(REDUCED_WEIGHT_MAX)
        onnx.save(model, str(path))
    built = backend.build(path, tmp_path, "int8")
    assert built.settings["int8_weight_max"] == kernels.weight_max
    assert built.settings["int8_kernels"]["saturating"] is kernels.saturating
    out = backend.load(tmp_path / built.engine_file, built.settings).run(x)
    np.testing.assert_allclose(np.abs(out[0, :, 1:-1, 1:-1]), exact, rtol=1e-5)


def test_an_engine_built_with_full_range_weights_is_refused_where_kernels_saturate() -> None:
    saturating = Int8Kernels("r", True, REDUCED_WEIGHT_MAX, 0.99, 0.0)
    settings = {"int8_weight_max": 127, "int8_kernels": {"why": "built on a VNNI CPU"}}
    with pytest.raises(BundleError, match="wrong values on this CPU.*±127.*recompile"):
        check_int8_settings(settings, saturating, Path("engine.onnx"))
    check_int8_settings({**settings, "int8_weight_max": 63}, saturating, Path("engine.onnx"))
    check_int8_settings({}, saturating, Path("engine.onnx"))  # fp32 engines: nothing to check
    none = Int8Kernels("r", True, None, 0.99, 0.5)
    assert "not offered" in weights_problem(none, 63)


def _qemu() -> str:
    found = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64" or found is None:
        msg = "qemu-x86_64 (Debian's qemu-user) is needed to emulate an AVX2-only CPU"
        if os.environ.get("CI"):
            pytest.fail(msg + "; .ci/run installs it")
        pytest.skip(msg)
    return found


_EMULATED = """
import json
from esr_deploy.backends.onnxruntime import OnnxRuntimeCPU
from esr_deploy.backends.openvino import OpenVinoCPU
print(json.dumps([b.int8_kernels().to_dict() for b in (OnnxRuntimeCPU(), OpenVinoCPU())]))
"""


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_on_an_emulated_avx2_cpu_full_range_saturates_and_7_bit_weights_are_exact() -> None:
    """AMD EPYC-Milan (Zen 3: AVX2/FMA, no AVX-512, no VNNI) emulated by qemu-user: the real
    ONNX Runtime and OpenVINO kernels for that CPU, measured by the same probe."""
    env = {**os.environ, "ESR_CPUINFO": str(ZEN3_CPUINFO), "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [_qemu(), "-cpu", "EPYC-Milan", sys.executable, "-c", _EMULATED],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    for kernels in found:
        assert kernels["saturating"] is True, kernels
        assert kernels["weight_max"] == REDUCED_WEIGHT_MAX, kernels
        assert kernels["full_range_relative_error"] > 0.5
        assert kernels["reduced_range_relative_error"] < 1e-6
        assert kernels["int32_dot_product_flags"] is False
        assert "EPYC-Milan" in kernels["why"] and "±63" in kernels["why"]
