"""fp16 precision pass: numerical equivalence (ORT and float16-storage emulation against float32),
the expected structural change (float16 weights, Casts at the boundaries, float32 IO, scales and
shape arithmetic untouched), and graphs where it must keep float32 or do nothing."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from esr_deploy.errors import ExportError
from esr_deploy.precision.fp16 import FP16_MAX, RANGE_MARGIN, UNSAFE_OPS, Fp16Result, convert_fp16
from esr_deploy.precision.fp16_emulation import emulate_fp16, fp16_tensors

torch.set_num_threads(1)

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64


# -- helpers ---------------------------------------------------------------------------------


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run_all(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _run_all(model, x)[model.graph.output[0].name]


def _export(module: nn.Module, hw: tuple[int, int] = (16, 16)) -> onnx.ModelProto:
    """torch.onnx.export (TorchScript exporter, opset 18, dynamic N×H×W) + onnxsim."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            (torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)) * 255,),
            buf,  # type: ignore[arg-type]  # file objects are accepted at run time
            dynamo=False,
            opset_version=18,
            input_names=["lr"],
            output_names=["sr"],
            dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "sh", 3: "sw"}},
        )
    model, ok = onnxsim.simplify(onnx.load_from_string(buf.getvalue()))
    assert ok
    return model


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.input, *graph.value_info, *graph.output]
    }
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _measure_absmax(model: onnx.ModelProto, x: np.ndarray) -> dict[str, float]:
    """What the caller does: |x| max of the input and every float node output, with ORT."""
    types = _types(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in known and types.get(name) == FLOAT:
                probe.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
                known.add(name)
    absmax = {name: float(np.abs(v).max()) for name, v in _run_all(probe, x).items()}
    absmax[model.graph.input[0].name] = float(np.abs(x).max())
    return absmax


def _lr(seed: int = 0, hw: tuple[int, int] = (20, 24)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((1, 3, *hw)) * 255).astype(np.float32)


def _psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    a = np.clip(a / data_range, 0, 1).astype(np.float64)
    b = np.clip(b / data_range, 0, 1).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _hand_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _lr_info(name: str = "lr") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, ["n", 3, "h", "w"])


def _sr_info(name: str = "sr") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, ["n", 3, "h", "w"])


def _nodes_by_op(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _kept(result: Fp16Result) -> dict[str, str]:
    return {k.op_type + ":" + k.node: k.reason for k in result.kept_float32}


# -- models ----------------------------------------------------------------------------------


class TinySR(nn.Module):
    """0..255 in and out: LeakyReLU convs, a residual Add, a sigmoid gate, nearest Resize and
    a pixel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.leaky_relu(self.head(x / 255.0), 0.05)
        f = f + self.body(f)
        f = f * torch.sigmoid(self.gate(f))
        f = F.interpolate(f, scale_factor=2, mode="nearest")
        return F.pixel_shuffle(self.tail(f), 2) * 255.0 + 127.5


class Amplifier(nn.Module):
    """A conv averaging the 0..255 input (≈127), ×1000 (≈1.3e5: beyond float16), ReLU,
    ×0.001, ReLU, a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.tail = nn.Conv2d(4, 3, 1, bias=False)
        with torch.no_grad():
            self.head.weight.fill_(1.0 / 27)
            self.tail.weight.fill_(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.head(x)) * 1000.0  # ReLUs keep onnxsim from folding the Muls
        return self.tail(torch.relu(torch.relu(f) * 0.001))


class ContrastSR(nn.Module):
    """IMDN's contrast-aware channel attention: mean + std over H, W gate a conv's features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x / 255.0)
        mean = f.mean(dim=(2, 3), keepdim=True)
        std = (f - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return self.tail(f * torch.sigmoid(self.squeeze(std + mean))) * 255.0


class SizedUpsample(nn.Module):
    """Resize to sizes computed from the input's shape: an int64 shape subgraph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        return F.interpolate(self.conv(x), size=(h * 2, w * 2), mode="nearest")


@pytest.fixture(scope="module")
def tiny() -> tuple[onnx.ModelProto, Fp16Result, np.ndarray]:
    model = _export(TinySR())
    x = _lr()
    return model, convert_fp16(model, _measure_absmax(model, x)), x


# -- 1. structure and ORT parity of the converted model --------------------------------------


def test_converted_model_checks_keeps_float32_io_and_float16_weights(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    model, result, _ = tiny
    fp16 = result.model
    onnx.checker.check_model(fp16, full_check=True)
    assert [i.name for i in fp16.graph.input] == ["lr"]
    assert [o.name for o in fp16.graph.output] == ["sr"]
    assert fp16.graph.input[0].type.tensor_type.elem_type == FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == FLOAT
    assert fp16.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in fp16.opset_import] == [
        (o.domain, o.version) for o in model.opset_import
    ]
    inits = {t.name: t for t in fp16.graph.initializer}
    for conv in _nodes_by_op(fp16, "Conv"):
        for name in conv.input[1:]:
            assert inits[name].data_type == FLOAT16, name
    # nothing overflows in this model: every node computes in float16, Casts only at the IO
    assert result.kept_float32 == ()
    assert result.casts_inserted == 2
    first, last = fp16.graph.node[0], fp16.graph.node[-1]
    assert first.op_type == "Cast" and list(first.input) == ["lr"]
    assert last.op_type == "Cast" and list(last.output) == ["sr"]
    types = _types(fp16)
    assert types[first.output[0]] == FLOAT16 and types[last.input[0]] == FLOAT16
    assert result.fp16_nodes == len([n for n in model.graph.node if n.op_type != "Constant"])
    # the Div by the constant 255 is a Mul by 1/255: converted despite Div being in UNSAFE_OPS
    assert types[_nodes_by_op(fp16, "Div")[0].output[0]] == FLOAT16
    # no value_info claims float32 for a float16 tensor
    for info in fp16.graph.value_info:
        assert info.type.tensor_type.elem_type == types[info.name]


def test_converted_model_runs_in_ort_close_to_fp32(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    model, result, x = tiny
    for sample in (x, _lr(seed=3, hw=(13, 17))):  # dynamic H×W survives
        ref = _run(model, sample)
        out = _run(result.model, sample)
        assert out.dtype == np.float32 and out.shape == ref.shape
        span = float(ref.max() - ref.min())
        assert float(np.abs(out - ref).max()) < 1e-2 * span


def test_conversion_is_deterministic_and_leaves_its_input_alone(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    model, result, x = tiny
    before = model.SerializeToString()
    again = convert_fp16(model, _measure_absmax(model, x))
    assert model.SerializeToString() == before
    assert again.model.SerializeToString() == result.model.SerializeToString()
    manifest = json.loads(json.dumps(result.to_dict()))
    assert manifest["fp16_nodes"] == result.fp16_nodes
    assert manifest["casts_inserted"] == 2
    assert manifest["kept_float32"] == []
    assert manifest["range_margin"] == RANGE_MARGIN


def test_unnamed_nodes_get_deterministic_unique_names() -> None:
    nodes = [
        helper.make_node("Relu", ["lr"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"], name="dup"),
        helper.make_node("Neg", ["b"], ["sr"], name="dup"),
    ]
    model = _hand_model(nodes, [_lr_info()], [_sr_info()])
    out = convert_fp16(model, {}).model
    names = [n.name for n in out.graph.node if n.op_type != "Cast"]
    assert names == ["Relu_0", "dup", "dup_1"]


# -- 2. float16-storage emulation ------------------------------------------------------------


def test_emulated_fp16_psnr_above_50db(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    model, result, x = tiny
    emulated = emulate_fp16(result.model)
    onnx.checker.check_model(emulated, full_check=True)
    assert FLOAT16 not in {t.data_type for t in emulated.graph.initializer}
    ref = _run(model, x)
    out = _run(emulated, x)
    assert not np.array_equal(out, ref)  # rounding happened
    assert _psnr(out, ref) > 50.0


def test_emulation_rounds_exactly_like_numpy_float16() -> None:
    # lr -> Conv 1x1 (2->2, integer weights and bias) -> Add 0.1 -> sr. With lr in [16, 2000)
    # every float16-rounded input has its last bit at 2**-6 or above, so the conv's sums are
    # exact in float32 in any order; Add is correctly rounded in both ORT and numpy: the
    # emulated result must match numpy bit for bit.
    rng = np.random.default_rng(7)
    w = rng.integers(-3, 4, size=(2, 2, 1, 1)).astype(np.float32)
    b = np.array([5.0, -11.0], np.float32)
    c = np.array(0.1, np.float32)
    nodes = [
        helper.make_node("Conv", ["lr", "w", "b"], ["y"]),
        helper.make_node("Add", ["y", "c"], ["sr"]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    inits.append(numpy_helper.from_array(c, "c"))
    model = _hand_model(
        nodes,
        [helper.make_tensor_value_info("lr", FLOAT, [1, 2, "h", "w"])],
        [helper.make_tensor_value_info("sr", FLOAT, [1, 2, "h", "w"])],
        inits,
    )
    x = rng.uniform(16, 2000, size=(1, 2, 5, 7)).astype(np.float32)
    result = convert_fp16(model, _measure_absmax(model, x))
    assert result.kept_float32 == ()
    emulated = emulate_fp16(result.model)

    def h(a: np.ndarray) -> np.ndarray:  # float16 storage
        return a.astype(np.float16).astype(np.float32)

    xh = h(x)
    conv = np.einsum("oi,nihw->nohw", w[:, :, 0, 0].astype(np.float64), xh.astype(np.float64))
    yh = h((conv + b[None, :, None, None]).astype(np.float32))
    expected = h(yh + h(c))
    assert not np.array_equal(expected, model_out := _run(model, x))  # rounding is visible
    assert not np.array_equal(xh, x)
    np.testing.assert_array_equal(_run(emulated, x), expected)
    assert model_out.dtype == np.float32


# -- 3. ranges: a node beyond the margin stays float32 ---------------------------------------


def test_node_beyond_range_margin_is_kept_float32_with_casts() -> None:
    model = _export(Amplifier())
    x = _lr()
    absmax = _measure_absmax(model, x)
    result = convert_fp16(model, absmax)
    kept = result.kept_float32
    assert [k.op_type for k in kept] == ["Mul", "Relu", "Mul"]
    big = next(n for n in model.graph.node if n.op_type == "Mul").output[0]
    assert absmax[big] > 1e5
    assert f"output '{big}' reaches |x| = " in kept[0].reason
    assert f"{absmax[big]:.3g}" in kept[0].reason and "65504" in kept[0].reason
    assert f"input '{big}'" in kept[1].reason  # the ReLU reads the 1.3e5 tensor
    # lr -> fp16; ReLU -> fp32 (Mul); Mul -> fp16 (tail conv); fp16 -> sr
    assert result.casts_inserted == 4
    types = _types(result.model)
    for k in kept:
        node = next(n for n in result.model.graph.node if n.name == k.node)
        assert all(types[name] == FLOAT for name in [*node.input, *node.output])
    conv_types = [types[n.output[0]] for n in _nodes_by_op(result.model, "Conv")]
    assert conv_types == [FLOAT16, FLOAT16]
    emulated = _run(emulate_fp16(result.model), x)
    assert np.all(np.isfinite(emulated))
    ref = _run(model, x)
    assert float(np.abs(emulated - ref).max()) < 1e-2 * float(np.abs(ref).max())


def test_constant_beyond_float16_is_not_rounded_to_inf() -> None:
    nodes = [helper.make_node("Mul", ["lr", "k"], ["sr"], name="scale")]
    k = numpy_helper.from_array(np.array([1e5], np.float32), "k")
    model = _hand_model(nodes, [_lr_info()], [_sr_info()], [k])
    x = _lr() * 1e-4  # the product stays small: only the constant is out of range
    result = convert_fp16(model, _measure_absmax(model, x))
    assert [(k.node, k.op_type) for k in result.kept_float32] == [("scale", "Mul")]
    assert "initializer 'k' holds |x| = 1e+05" in result.kept_float32[0].reason
    assert result.casts_inserted == 0
    assert result.model.graph.initializer[0].data_type == FLOAT
    np.testing.assert_array_equal(_run(result.model, x), _run(model, x))


def test_margin_outside_unit_interval_is_rejected() -> None:
    model = _export(Amplifier())
    with pytest.raises(ExportError, match="margin"):
        convert_fp16(model, {}, margin=0.0)
    with pytest.raises(ExportError, match="margin"):
        convert_fp16(model, {}, margin=2.0)


# -- 4. unsafe ops ---------------------------------------------------------------------------


def test_contrast_layer_reductions_and_pow_stay_float32() -> None:
    model = _export(ContrastSR())
    x = _lr()
    result = convert_fp16(model, _measure_absmax(model, x))
    by_op: dict[str, set[str]] = {}
    for k in result.kept_float32:
        by_op.setdefault(k.op_type, set()).add(k.reason)
    assert set(by_op) == {"ReduceMean", "Pow", "Sqrt"}
    for op, reasons in by_op.items():
        assert reasons == {UNSAFE_OPS[op]}
    assert "reduction" in UNSAFE_OPS["ReduceMean"]
    types = _types(result.model)
    for node in result.model.graph.node:
        if node.op_type in ("ReduceMean", "Pow", "Sqrt"):
            assert types[node.input[0]] == FLOAT and types[node.output[0]] == FLOAT
        if node.op_type in ("Conv", "Sigmoid"):
            assert types[node.output[0]] == FLOAT16
    pow_node = _nodes_by_op(result.model, "Pow")[0]
    assert types[pow_node.input[1]] == FLOAT
    emulated = emulate_fp16(result.model)
    ref = _run(model, x)
    assert _psnr(_run(emulated, x), ref) > 50.0
    assert _psnr(_run(result.model, x), ref) > 50.0


def test_div_by_computed_divisor_stays_float32_but_div_by_constant_converts() -> None:
    nodes = [
        helper.make_node("Add", ["lr", "one"], ["denominator"], name="plus_one"),
        helper.make_node("Div", ["lr", "denominator"], ["ratio"], name="ratio"),
        helper.make_node("Div", ["ratio", "four"], ["sr"], name="quarter"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
        numpy_helper.from_array(np.array([4.0], np.float32), "four"),
    ]
    model = _hand_model(nodes, [_lr_info()], [_sr_info()], inits)
    result = convert_fp16(model, {})
    assert [(k.node, k.reason) for k in result.kept_float32] == [("ratio", UNSAFE_OPS["Div"])]
    types = _types(result.model)
    assert types["ratio"] == FLOAT and types["denominator"] == FLOAT16
    quarter = next(n for n in result.model.graph.node if n.name == "quarter")
    assert types[quarter.output[0]] == FLOAT16
    x = _lr()
    np.testing.assert_allclose(_run(result.model, x), x / (x + 1) / 4, rtol=2e-3)


# -- 5. Resize: X in float16, scales and roi stay float32 ------------------------------------


def test_resize_runs_fp16_on_x_and_keeps_scales_float32(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    model, result, _ = tiny
    types = _types(result.model)
    resize = _nodes_by_op(result.model, "Resize")[0]
    x_in, _roi, scales = resize.input[:3]
    assert types[x_in] == FLOAT16 and types[resize.output[0]] == FLOAT16
    assert types[scales] == FLOAT
    original = _nodes_by_op(model, "Resize")[0]
    assert scales == original.input[2]  # the scales are read as they were, no Cast


def test_shape_subgraph_is_left_int64() -> None:
    model = _export(SizedUpsample())
    x = _lr()
    result = convert_fp16(model, _measure_absmax(model, x))
    assert result.kept_float32 == ()
    before, after = _types(model), _types(result.model)
    int_nodes = [n for n in model.graph.node if before.get(n.output[0]) == INT64]
    assert int_nodes, "the export should compute the Resize sizes from Shape"
    converted = {n.name: n for n in result.model.graph.node}
    for node in int_nodes:
        assert list(converted[node.name].input) == list(node.input)
        assert after[node.output[0]] == INT64
    for sample in (x, _lr(seed=1, hw=(9, 11))):
        ref = _run(model, sample)
        out = _run(result.model, sample)
        assert out.shape == ref.shape
        assert float(np.abs(out - ref).max()) < 1e-2 * float(np.abs(ref).max())


def test_int_to_float_cast_feeding_float16_becomes_float16_cast() -> None:
    nodes = [
        helper.make_node("Cast", ["two"], ["two_f"], name="cast", to=FLOAT),
        helper.make_node("Mul", ["lr", "two_f"], ["sr"], name="double"),
    ]
    two = numpy_helper.from_array(np.array([2], np.int64), "two")
    model = _hand_model(nodes, [_lr_info()], [_sr_info()], [two])
    result = convert_fp16(model, {})
    cast = next(n for n in result.model.graph.node if n.name == "cast")
    assert cast.attribute[0].i == FLOAT16
    assert result.casts_inserted == 2  # lr and sr only
    x = _lr()
    np.testing.assert_allclose(_run(result.model, x), 2 * x, rtol=1e-3)


# -- 6. raw tensors: the check that nothing leaves the float16 range -------------------------


def test_expose_raw_stays_in_range_for_a_safe_model(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    _, result, x = tiny
    names = fp16_tensors(result.model)
    assert names[0] == result.model.graph.node[0].output[0]  # the input Cast
    emulated = emulate_fp16(result.model, expose_raw=True)
    outputs = _run_all(emulated, x)
    assert set(outputs) == {"sr"} | {f"{n}__raw" for n in names}
    assert float(np.abs(outputs[f"{names[0]}__raw"]).max()) == pytest.approx(x.max())
    for name in names:
        assert float(np.abs(outputs[f"{name}__raw"]).max()) < FP16_MAX
    assert np.all(np.isfinite(outputs["sr"]))


def test_expose_raw_shows_an_overflow_when_ranges_are_unknown() -> None:
    model = _export(Amplifier())
    x = _lr()
    result = convert_fp16(model, {})  # unknown ranges: everything float16
    assert result.kept_float32 == ()
    big = next(n for n in result.model.graph.node if n.op_type == "Mul").output[0]
    assert big in fp16_tensors(result.model)
    emulated = emulate_fp16(result.model, expose_raw=True)
    probe = onnx.ModelProto()
    probe.CopyFrom(emulated)
    probe.graph.output.append(helper.make_tensor_value_info(big, FLOAT, None))
    outputs = _run_all(probe, x)
    assert float(np.abs(outputs[f"{big}__raw"]).max()) > FP16_MAX
    assert np.isinf(outputs[big]).any()


# -- 7. nothing to do ------------------------------------------------------------------------


def test_graph_without_float_math_is_unchanged() -> None:
    nodes = [
        helper.make_node("Shape", ["lr"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "two"], ["h"], name="height", axis=0),
    ]
    two = numpy_helper.from_array(np.array(2, np.int64), "two")
    model = _hand_model(nodes, [_lr_info()], [helper.make_tensor_value_info("h", INT64, [])], [two])
    result = convert_fp16(model, {})
    assert (result.fp16_nodes, result.casts_inserted, result.kept_float32) == (0, 0, ())
    assert [(n.op_type, list(n.input)) for n in result.model.graph.node] == [
        (n.op_type, list(n.input)) for n in model.graph.node
    ]
    assert fp16_tensors(result.model) == []
    onnx.checker.check_model(result.model, full_check=True)
    assert int(_run(result.model, _lr(hw=(5, 9)))) == 5


def test_model_with_every_node_out_of_range_stays_float32(
    tiny: tuple[onnx.ModelProto, Fp16Result, np.ndarray],
) -> None:
    model, _, x = tiny
    absmax = {name: 1e6 for name in _measure_absmax(model, x)}
    result = convert_fp16(model, absmax)
    compute = [n for n in model.graph.node if n.op_type != "Constant"]
    assert len(result.kept_float32) == len(compute)
    assert (result.fp16_nodes, result.casts_inserted) == (0, 0)
    assert FLOAT16 not in set(_types(result.model).values())
    assert fp16_tensors(result.model) == []
    ref = _run(model, x)
    np.testing.assert_array_equal(_run(result.model, x), ref)
    np.testing.assert_array_equal(_run(emulate_fp16(result.model), x), ref)


# -- 8. shared constants ---------------------------------------------------------------------


def test_initializer_shared_by_fp16_and_fp32_nodes_is_duplicated() -> None:
    nodes = [
        helper.make_node("Add", ["lr", "c"], ["sr"], name="shift"),
        helper.make_node("Mul", ["lr", "c"], ["scaled"], name="scale"),
    ]
    c = numpy_helper.from_array(np.array([0.3], np.float32), "c")
    outputs = [_sr_info(), _sr_info("scaled")]
    model = _hand_model(nodes, [_lr_info()], outputs, [c])
    result = convert_fp16(model, {"scaled": 1e6})  # as if measured: the Mul stays float32
    assert [k.node for k in result.kept_float32] == ["scale"]
    assert "output 'scaled' reaches |x| = 1e+06" in result.kept_float32[0].reason
    inits = {t.name: t for t in result.model.graph.initializer}
    assert inits["c"].data_type == FLOAT and inits["c_fp16"].data_type == FLOAT16
    nodes_by_name = {n.name: n for n in result.model.graph.node}
    assert nodes_by_name["shift"].input[1] == "c_fp16"
    assert list(nodes_by_name["scale"].input) == ["lr", "c"]  # float32 as before
    assert result.casts_inserted == 2  # lr -> float16 for the Add, its result -> sr
    x = _lr()
    for run in (result.model, emulate_fp16(result.model)):
        outs = _run_all(run, x)
        np.testing.assert_allclose(outs["sr"], x + 0.3, rtol=1e-3)
        np.testing.assert_array_equal(outs["scaled"], x * np.float32(0.3))
