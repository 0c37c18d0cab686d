"""Precision passes run under the manager that enforces their declared contracts: each
requirement is checked on the input and each guarantee on the output, on a small SR network
exported by the real exporter; a violated one names the pass and the passes before it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_precision_int8 import _images, fp32_model, stats  # noqa: F401 (fixtures)

from esr_deploy.errors import ExportError, ValidationError
from esr_deploy.precision.base import (
    PROPERTIES,
    PrecisionContext,
    PrecisionOutcome,
    PrecisionPass,
    PrecisionPassManager,
)
from esr_deploy.precision.int8 import name_nodes
from esr_deploy.precision.passes import ConvertFp16, QuantizeInt8


def test_every_declared_property_is_a_registered_check() -> None:
    for p in (ConvertFp16, QuantizeInt8):
        assert p.requires | p.guarantees <= set(PROPERTIES), p.name


def test_int8_pass_guarantees_hold_and_are_recorded(
    fp32_model: onnx.ModelProto,  # noqa: F811
    stats,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    model = name_nodes(fp32_model)
    manager = PrecisionPassManager(
        [QuantizeInt8(lambda t: stats.amax(t, "mse"), weight_max=63)],
        PrecisionContext(weight_max=63),
    )
    out, (record,) = manager.run(model)
    assert record.name == "int8" and record.facts["int8_weight_max"] == 63
    assert record.info["int8"]["weight_range"] == [-63, 63]
    assert any(n.op_type == "QuantizeLinear" for n in out.graph.node)


def test_fp16_pass_measures_the_range_it_guarantees(
    fp32_model: onnx.ModelProto,  # noqa: F811
    stats,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    x = _images(1, seed=5).inputs[0]
    manager = PrecisionPassManager(
        [ConvertFp16(stats.absmax())], PrecisionContext(check_inputs=[x])
    )
    out, (record,) = manager.run(name_nodes(fp32_model))
    assert 0 < record.facts["fp16_max_abs_on_validation"] < 65504
    assert any(i.data_type == TensorProto.FLOAT16 for i in out.graph.initializer)
    # the same pass on inputs scaled past the float16 range breaks its guarantee: exit 3
    huge = PrecisionPassManager(
        [ConvertFp16(stats.absmax())], PrecisionContext(check_inputs=[x * 1e4])
    )
    with pytest.raises(ValidationError, match="'fp16'.*fp16-in-range.*overflows") as err:
        huge.run(name_nodes(fp32_model))
    assert err.value.details and "fp16_max_abs_tensor" in err.value.details["precision"]


def test_a_pass_on_an_already_quantised_graph_is_stopped_before_it_runs(
    fp32_model: onnx.ModelProto,  # noqa: F811
    stats,  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    int8 = QuantizeInt8(lambda t: stats.amax(t, "mse"))
    manager = PrecisionPassManager([int8, ConvertFp16(stats.absmax())], PrecisionContext())
    with pytest.raises(ExportError, match="'fp16' cannot run.*before it: int8.*full-precision"):
        manager.run(name_nodes(fp32_model))


class _BreaksItsPromise(PrecisionPass):
    """Claims symmetric Q/DQ and writes a zero point of 3."""

    name = "broken"
    requires = frozenset({"valid"})
    guarantees = frozenset({"symmetric-qdq"})

    def run(self, model: onnx.ModelProto) -> PrecisionOutcome:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        zp = numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")
        s = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "s")
        out.graph.initializer.extend([zp, s])
        first = out.graph.node[0].input[0]
        out.graph.node.insert(0, helper.make_node("QuantizeLinear", [first, "s", "zp"], ["q"]))
        return PrecisionOutcome(out)


def test_a_broken_guarantee_names_the_pass_and_the_property(
    fp32_model: onnx.ModelProto,  # noqa: F811
) -> None:
    manager = PrecisionPassManager([_BreaksItsPromise()], PrecisionContext())
    with pytest.raises(ExportError, match="'broken'.*symmetric-qdq.*zero point"):
        manager.run(fp32_model)
