"""Whether a runtime's int8 convolutions on this CPU saturate, measured; and the weight range
that makes them exact.

**Why they can.** x86 int8 convolution kernels multiply unsigned 8-bit activations by signed
8-bit weights. Without VNNI or AMX they do it with ``vpmaddubsw``, which adds each pair of
adjacent products into a *saturating* int16::

    p = sat16(a₀·w₀ + a₁·w₁),   a ∈ [0, 255],   sat16(v) = clip(v, −32768, 32767)

(ONNX Runtime's kernels read activations as uint8, zero point 128, see
:func:`esr_deploy.backends.onnxruntime.lower_int8_activations`; oneDNN, under OpenVINO, shifts
int8 activations by 128 the same way.) With full-range weights ``|w| ≤ 127`` a pair reaches
2·255·127 = 64770 and is clipped to 32767: the convolution no longer computes what the Q/DQ
graph says. VNNI (``vpdpbusd``) and AMX add the products straight into int32: no saturation.

**The fix.** Weights in ``±63`` (7 bits): ``|a₀·w₀ + a₁·w₁| ≤ 2·255·63 = 32130 < 32767``, so
no pair saturates on any CPU. It costs one bit of weight resolution (the per-channel weight
step doubles), which the compile's PSNR gate measures like any other quantisation error.
The ONNX handed to TensorRT (``onnx-int8``, ``trt-int8``) keeps ±127: its kernels accumulate
in int32.

**The measurement** (:func:`measure`). Flags say which instructions exist, not which kernel
a runtime picks, so the backend runs a one-convolution Q/DQ graph built to saturate wherever it
can: activations at the int8 maximum, 3×3 weights at +W in half the output channels and −W in
the other half, so every pair has one sign. Its interior output is known exactly; a kernel
that saturates misses it by orders of magnitude (W = 127, 32 channels: exact 4,640,000 after
requantisation, about 37,000 when pairs saturate). ``weight_max`` is 127 when the full range
is exact, 63 when only the reduced range is, and ``None`` (no int8 on this CPU) when neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from esr_deploy import cpu

log = logging.getLogger(__name__)

FULL_WEIGHT_MAX = 127
REDUCED_WEIGHT_MAX = 63
_CHANNELS = 32
_SIZE = 6  # the probe image is _SIZE × _SIZE; the interior is every pixel but the border

#: runs an ONNX model (float32 input → float32 output) the way a backend's engine would
RunModel = Callable[[onnx.ModelProto, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Int8Kernels:
    """What :func:`measure` found for one runtime on this CPU."""

    runtime: str
    #: pairs saturate at full-range weights
    saturating: bool
    #: the largest |int8 weight| whose convolutions are exact here (None: int8 is not)
    weight_max: int | None
    full_range_error: float  # relative error of the probe's interior at ±127
    reduced_range_error: float  # the same at ±63

    @property
    def reason(self) -> str:
        """Why the weights have the range they have (for the manifest and messages)."""
        if not self.saturating:
            return (
                f"{self.runtime}'s int8 convolutions on {cpu.describe()} accumulate in int32 "
                "(measured: a convolution built to saturate 16-bit pair sums came out exact), "
                f"so weights use the full ±{FULL_WEIGHT_MAX}"
            )
        if self.weight_max is None:
            return (
                f"{self.runtime}'s int8 convolutions on {cpu.describe()} are not exact even with "
                f"7-bit weights (relative error {self.reduced_range_error:.3g} at "
                f"±{REDUCED_WEIGHT_MAX}) — int8 is not offered on this CPU for {self.runtime}"
            )
        return (
            f"{self.runtime}'s int8 convolutions on {cpu.describe()} saturate 16-bit pair sums "
            f"(measured relative error {self.full_range_error:.3g} at ±{FULL_WEIGHT_MAX}, as "
            "kernels without VNNI/AMX do), so weights are quantised to "
            f"±{REDUCED_WEIGHT_MAX}, where "
            "no pair can saturate (2·255·63 < 32767)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "saturating": self.saturating,
            "weight_max": self.weight_max,
            "full_range_relative_error": self.full_range_error,
            "reduced_range_relative_error": self.reduced_range_error,
            "int32_dot_product_flags": cpu.has_int32_dot_products(),
            "why": self.reason,
        }


def probe_model(weight_max: int) -> tuple[onnx.ModelProto, np.ndarray, float]:
    """The probe graph at weights ±``weight_max``, its input, and its exact interior value.

    Q/DQ as :mod:`esr_deploy.precision.int8` writes it (symmetric, zero point 0): input
    scale 1, weights scale 1, output requantised at a scale that holds the exact sum.
    """
    c, k = _CHANNELS, 3
    w = np.full((c, c, k, k), weight_max, dtype=np.int8)
    w[c // 2 :] = -weight_max
    exact = float(c * k * k * 127 * weight_max)  # activations at 127 everywhere
    out_scale = np.float32(exact / 100.0)  # the exact value lands on q = 100
    zero = np.array(0, dtype=np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s1", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["y", "ys", "z"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "s1"),
        numpy_helper.from_array(zero, "z"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.ones(c, dtype=np.float32), "ws"),
        numpy_helper.from_array(np.zeros(c, dtype=np.int8), "wz"),
        numpy_helper.from_array(np.array(out_scale, dtype=np.float32), "ys"),
    ]
    shape = [1, c, _SIZE, _SIZE]
    graph = helper.make_graph(
        nodes,
        "int8_saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.full(shape, 127.0, dtype=np.float32)
    requantised = float(np.round(np.float32(exact) / out_scale)) * float(out_scale)
    return model, x, requantised


def _interior_error(run: RunModel, weight_max: int) -> float:
    model, x, exact = probe_model(weight_max)
    out = np.asarray(run(model, x), dtype=np.float64)
    interior = out[0, :, 1:-1, 1:-1]
    sign = np.where(np.arange(_CHANNELS) < _CHANNELS // 2, 1.0, -1.0).reshape(-1, 1, 1)
    return float(np.max(np.abs(interior - sign * exact)) / exact)


def measure(runtime: str, run: RunModel) -> Int8Kernels:
    """Run the probe through ``run`` at ±127 and ±63 and say which weight range is exact.

    Exact means within one requantisation step (1 % of the value), which a saturated
    result misses by far (it lands near 1 % of the exact value)."""
    full = _interior_error(run, FULL_WEIGHT_MAX)
    reduced = _interior_error(run, REDUCED_WEIGHT_MAX)
    tolerance = 0.011
    if full <= tolerance:
        weight_max: int | None = FULL_WEIGHT_MAX
    elif reduced <= tolerance:
        weight_max = REDUCED_WEIGHT_MAX
    else:
        weight_max = None
    found = Int8Kernels(runtime, full > tolerance, weight_max, full, reduced)
    log.info("int8 kernels: %s", found.reason)
    return found


def graph_weight_max(model: onnx.ModelProto) -> int:
    """The largest |value| of the int8 weights that feed a DequantizeLinear (0 if none)."""
    inits = {i.name: i for i in model.graph.initializer}
    largest = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        init = inits[node.input[0]]
        if init.data_type != TensorProto.INT8:
            continue
        q = numpy_helper.to_array(init).astype(np.int16)
        if q.size:
            largest = max(largest, int(np.abs(q).max()))
    return largest


def weights_problem(kernels: Int8Kernels, seen: int) -> str:
    """Empty when int8 weights reaching ±``seen`` are exact on these kernels; else why not."""
    if kernels.weight_max is not None and seen <= kernels.weight_max:
        return ""
    return f"the engine's int8 weights reach ±{seen}, and {kernels.reason}" + (
        "" if kernels.weight_max is None else f" (at most ±{kernels.weight_max} here)"
    )
