"""The two precision passes, with their contracts (:mod:`.base` enforces them).

- :class:`ConvertFp16`: the strongly typed float16 rewrite of :func:`.fp16.convert_fp16`,
  calibrated ``absmax`` per tensor; guarantees float32 IO, a valid graph, and that no float16
  tensor leaves the float16 range on the check images (float16 rounding emulated at every op
  boundary, :func:`.apply.fp16_range`).
- :class:`QuantizeInt8`: explicit symmetric Q/DQ (:func:`.int8.quantize_int8`) with weights in
  ``±weight_max``, optionally through the sensitivity search (:mod:`.sensitivity`), which keeps
  layers in float until the compile's gate accepts the engine; guarantees float32 IO, a valid
  graph, symmetric Q/DQ (zero points 0, as TensorRT requires) and int8 weights within the range
  the target computes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import onnx

from esr_deploy.precision.base import PrecisionOutcome, PrecisionPass
from esr_deploy.precision.fp16 import convert_fp16
from esr_deploy.precision.int8 import INT8_MAX, Int8Result, Quantizer
from esr_deploy.precision.sensitivity import Quantize, SensitivityResult

#: runs the sensitivity search: (fp32 model, quantize(exclude, check)) → the search's result
Search = Callable[[onnx.ModelProto, Quantize], SensitivityResult]


class ConvertFp16(PrecisionPass):
    name = "fp16"
    requires = frozenset({"full-precision", "float32-io", "unique-node-names", "valid"})
    guarantees = frozenset({"float32-io", "fp16-in-range", "valid"})

    def __init__(self, absmax: Mapping[str, float]) -> None:
        self.absmax = absmax

    def run(self, model: onnx.ModelProto) -> PrecisionOutcome:
        result = convert_fp16(model, self.absmax)
        return PrecisionOutcome(result.model, {"fp16": result.to_dict()})


class QuantizeInt8(PrecisionPass):
    name = "int8"
    requires = frozenset({"full-precision", "float32-io", "unique-node-names", "opset>=13"})
    guarantees = frozenset({"float32-io", "int8-weights-in-range", "symmetric-qdq", "valid"})

    def __init__(
        self,
        amax: Callable[[str], float],
        keep_float: Sequence[str] = (),
        weight_max: int = INT8_MAX,
        search: Search | None = None,
    ) -> None:
        self.amax = amax
        self.keep_float = tuple(keep_float)
        self.weight_max = weight_max
        self.search = search

    def run(self, model: onnx.ModelProto) -> PrecisionOutcome:
        quantizer = Quantizer(model, self.amax, self.weight_max)

        def quantize(exclude: Sequence[str], check: bool = True) -> Int8Result:
            return quantizer((*self.keep_float, *exclude), check)

        info: dict[str, object] = {}
        if self.search is not None:
            found = self.search(model, quantize)
            result = found.result
            info["search"] = found.to_dict()
        else:
            result = quantize(())
        info["int8"] = result.to_dict()
        return PrecisionOutcome(result.model, info)
