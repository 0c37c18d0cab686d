"""Export: the derived input range, dynamic H×W, onnx checks and parity with PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models.plain_sr import PlainSR

from esr_deploy.errors import ExportError
from esr_deploy.export import INPUT_NAME, OUTPUT_NAME, derive_input_range, export_onnx


class TinyESA(nn.Module):
    """3x3 stride-2 conv without padding, then a 7x7 stride-3 max-pool: needs n >= 15."""

    def __init__(self, c: int = 8, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2)
        self.mix = nn.Conv2d(c, c, 3, padding=1)
        self.tail = nn.Conv2d(c, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        a = F.max_pool2d(self.down(f), kernel_size=7, stride=3)
        a = F.interpolate(self.mix(a), size=f.shape[2:], mode="bilinear", align_corners=False)
        return self.shuffle(self.tail(f * torch.sigmoid(a)))


class WrongScale(PlainSR):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_min_input_of_strided_pool_block_is_15() -> None:
    # floor((n - 3) / 2) + 1 >= 7  <=>  n >= 15, on both axes
    rng = derive_input_range(TinyESA().eval(), scale=2)
    assert rng.min_hw == (15, 15)
    assert rng.failing_above_min == ()


class HoleAt40(PlainSR):
    """Runs on every square from 1 except 40×40: the quick probe cannot see the hole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 40:
            raise RuntimeError("no 40")
        return super().forward(x)


def test_the_quick_probe_finds_the_same_minimum_without_the_sweep() -> None:
    model = TinyESA().eval()
    assert derive_input_range(model, scale=2, sweep=False).min_hw == (15, 15)
    holed = HoleAt40(scale=2).eval()
    assert ("h", 40) in derive_input_range(holed, scale=2).failing_above_min
    quick = derive_input_range(holed, scale=2, sweep=False)
    assert quick.min_hw == (1, 1) and quick.failing_above_min == ()


def test_min_input_of_plain_net_is_1() -> None:
    assert derive_input_range(PlainSR(scale=3).eval(), scale=3).min_hw == (1, 1)


def test_wrong_scale_is_reported() -> None:
    with pytest.raises(ExportError, match="2×"):
        derive_input_range(WrongScale().eval(), scale=2)


def test_export_is_dynamic_checked_and_matches_torch(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyESA().eval()
    result = export_onnx(model, tmp_path / "m.onnx", scale=2, data_range=1.0)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[2].dim_param and dims[3].dim_param, "H and W must be symbolic"
    assert result.input_range.min_hw == (15, 15)
    assert result.stats.convs == 4
    assert result.max_abs_error < 1e-5
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for h, w in [(15, 15), (40, 71), (96, 33)]:
        x = torch.rand(1, 3, h, w)
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (1, 3, 2 * h, 2 * w)
        np.testing.assert_allclose(got, ref, atol=1e-5)
