"""ONNX Runtime CPU backend: engine build, settings, and an unsupported op named in the error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from esr_deploy.backends.onnxruntime import ENGINE_FILE, OnnxRuntimeCPU, cpu_info, native_fp16
from esr_deploy.errors import ExportError


def _model(op_type: str, domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op_type, ["lr"], ["sr"], name="my_upsampler", domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    # IR version 10: what ONNX Runtime >= 1.18 reads (onnx 1.23 would write 14)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_build_saves_optimised_engine_and_records_settings(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model("Relu"), str(src))
    backend = OnnxRuntimeCPU()
    built = backend.build(src, tmp_path, "fp32")
    assert built.engine_file == ENGINE_FILE and (tmp_path / ENGINE_FILE).is_file()
    assert built.settings["intra_op_num_threads"] >= 1
    assert built.device["kind"] == "cpu" and built.backend_version == backend.version()
    x = np.linspace(-1, 1, 3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5)
    out = backend.load(tmp_path / ENGINE_FILE, built.settings).run(x)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def test_unsupported_op_names_the_node(tmp_path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_model("MagicUpsample", domain="com.example"), str(src))
    with pytest.raises(ExportError, match="my_upsampler|MagicUpsample") as info:
        OnnxRuntimeCPU().build(src, tmp_path, "fp32")
    assert "does not implement it" in str(info.value)
    assert not (tmp_path / ENGINE_FILE).exists()


def test_precision_availability_int8_yes_bf16_no_fp16_only_with_native_kernels() -> None:
    backend = OnnxRuntimeCPU()
    assert backend.availability("int8").ok
    status = backend.availability("bf16")
    assert not status.ok and "bf16" in status.reason
    fp16 = backend.availability("fp16")
    assert fp16 == native_fp16()
    if not fp16.ok:  # x86: ONNX Runtime wraps float16 Convs in Casts to float32
        assert "no float16 Conv kernel" in fp16.reason and "onnx-fp16" in fp16.reason


def test_cpu_info_reports_model_and_flags() -> None:
    info = cpu_info()
    assert info["cores"] >= 1 and isinstance(info.get("flags", []), list)
