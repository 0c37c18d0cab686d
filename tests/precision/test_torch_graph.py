"""fp16/bf16 on a torch.export graph (the AOTInductor targets' reduced precision).

The rules are the fp16 ONNX pass's: ranges measured on real LR images, unsafe ops and
near-overflow ops kept float32 with their reason, float32 in and out. Checked on the
official IMDN (whose contrast layers the ONNX pass keeps in float32), on a network whose
activations overflow float16 (a blind ``.half()`` gives inf there, the plan does not), and
on the division rule. The converted graphs run eagerly here (PyTorch CPU has float16 and
bfloat16 kernels), so every numerical claim is measured, not assumed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.export import Dim

from esr_deploy.data import load_validation_set
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.keys import load_weights
from esr_deploy.precision.fp16 import UNSAFE_OPS
from esr_deploy.precision.torch_graph import (
    apply_precision,
    low_precision_range,
    measure_ranges,
    plan_precision,
)
from esr_deploy.recipe import find_recipe
from esr_deploy.validate.parity import model_input

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the test models are imported from the repo root
    sys.path.insert(0, str(REPO))
from tests.user_models.loud_sr import LoudSR  # noqa: E402

torch.set_num_threads(1)


def _graph(model: nn.Module, hw: tuple[int, int] = (32, 32)) -> fx.GraphModule:
    dims = ({2: Dim("h", min=8, max=256), 3: Dim("w", min=8, max=256)},)
    with torch.no_grad():
        program = torch.export.export(model.eval(), (torch.rand(1, 3, *hw),), dynamic_shapes=dims)
    return program.module()


def _psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def imdn(weights_dir: Path, sr_data_dir: Path) -> tuple[nn.Module, list[torch.Tensor]]:
    recipe = find_recipe("imdn_x4")
    model = recipe.build_model()
    load_weights(model, load_checkpoint(weights_dir / "imdn_x4.pth"))
    set5 = load_validation_set(sr_data_dir / "Set5", recipe.scale)
    crops = [model_input(np.ascontiguousarray(p.lr[:24, :32]), recipe) for p in set5.pairs[:2]]
    return model.eval(), crops


def test_imdn_contrast_layers_stay_float32_and_the_rest_runs_in_fp16(
    imdn: tuple[nn.Module, list[torch.Tensor]],
) -> None:
    model, crops = imdn
    graph = _graph(model)
    plan = plan_precision(graph, measure_ranges(graph, crops), torch.float16)
    kept = {k.op_type for k in plan.kept_float32}
    # IMDN's contrast layer: mean, (x - mean)**2, its mean, **0.5 (the ONNX pass keeps the
    # same ReduceMean and Pow nodes)
    assert kept == {"aten.mean", "aten.pow"}
    assert all(UNSAFE_OPS["Pow"] in k.reason for k in plan.kept_float32 if k.op_type == "aten.pow")
    convs = [n.name for n in graph.graph.nodes if "conv2d" in str(n.target)]
    assert convs and set(convs) <= plan.low
    mixed, casts = apply_precision(graph, plan)
    assert casts > 0
    with torch.inference_mode():
        for x in crops:
            ref, got = model(x), mixed(x)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert _psnr(got.clamp(0, 1), ref.clamp(0, 1), 1.0) > 45.0
    lows = [n for n in mixed.graph.nodes if n.name in plan.low]
    half = [n for n in mixed.graph.nodes if n.kwargs.get("dtype") == torch.float16]
    assert lows and half  # the graph really computes in float16


def test_ops_that_overflow_fp16_stay_float32_where_a_blind_half_gives_inf() -> None:
    model = LoudSR().eval()
    x = torch.rand(1, 3, 24, 24) * 255
    graph = _graph(model)
    ranges = measure_ranges(graph, [x])
    plan = plan_precision(graph, ranges, torch.float16)
    kept = {k.node: k.reason for k in plan.kept_float32}
    assert ranges.absmax["conv2d_1"] > 65504
    assert "conv2d_1" in kept and "reaches |x|" in kept["conv2d_1"], kept
    assert "div" in kept  # reads the overflowing tensor
    assert {"conv2d", "conv2d_2"} <= plan.low
    with torch.inference_mode():
        blind = model.half()(x.half()).float()
        model.float()
        mixed, _ = apply_precision(graph, plan)
        got, ref = mixed(x), model(x)
    assert not torch.isfinite(blind).all()  # what a blind .half() does
    assert torch.isfinite(got).all() and _psnr(got, ref, 255.0) > 45.0
    # bfloat16 has float32's exponent: the same ranges decide nothing there
    assert {"conv2d_1", "div"} <= plan_precision(graph, ranges, torch.bfloat16).low


class _Divides(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 3.0 + x / (x.mean() + 1.0)


def test_division_by_a_number_is_a_multiplication_by_a_tensor_is_not() -> None:
    graph = _graph(_Divides())
    plan = plan_precision(graph, measure_ranges(graph, [torch.rand(1, 3, 16, 16)]), torch.float16)
    divs = [n.name for n in graph.graph.nodes if "div" in str(n.target)]
    kept = {k.node: k.op_type for k in plan.kept_float32}
    assert len(divs) == 2
    assert divs[0] in plan.low  # x / 3.0
    assert kept.get(divs[1]) == "aten.div" and kept.get("mean") == "aten.mean"


def test_a_value_beyond_the_calibration_range_is_reported() -> None:
    model = LoudSR().eval()
    graph = _graph(model)
    calm = [torch.rand(1, 3, 16, 16) * 1e-3]  # the loud conv stays below the limit here
    plan = plan_precision(graph, measure_ranges(graph, calm), torch.float16)
    assert "conv2d_1" in plan.low
    worst, where = low_precision_range(graph, plan, [torch.rand(1, 3, 16, 16) * 255])
    assert where == "conv2d_1" and worst > 65504


def test_a_tensor_read_by_several_float32_ops_is_cast_once() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.mean(dim=1, keepdim=True) + y.pow(2).mean(dim=1, keepdim=True) + y

    graph = _graph(Shared())
    plan = plan_precision(graph, measure_ranges(graph, [torch.rand(1, 3, 16, 16)]), torch.float16)
    mixed, _ = apply_precision(graph, plan)
    conv = next(n for n in mixed.graph.nodes if "conv2d" in str(n.target))
    to32 = [u for u in conv.users if u.kwargs.get("dtype") == torch.float32]
    assert len(to32) == 1  # mean and pow read the same float32 copy of the fp16 conv output
