"""Tests of esr_deploy.validate.metrics against hand-computed NTIRE-style counts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models.plain_sr import PlainSR

from esr_deploy.validate.metrics import ModelMetrics, _conv_shaped_zeros, model_metrics


def test_tiny_two_conv_net_by_hand() -> None:
    h, w = 16, 20
    m = model_metrics(PlainSR(channels=8, scale=4), input_hw=(h, w))
    hw = h * w
    assert m.params == (3 * 8 * 9 + 8) + (8 * 48 * 9 + 48)
    # MACs of both convs (no bias) + one per ReLU output element; pixel shuffle is free.
    assert m.flops == 3 * 8 * 9 * hw + 8 * hw + 8 * 48 * 9 * hw
    assert m.activations == 8 * hw + 48 * hw
    assert m.convs == 2 and m.functional_convs == 0
    assert m.input_hw == (h, w)
    assert m.to_dict()["input_hw"] == [h, w]


def test_default_input_is_256() -> None:
    m = model_metrics(PlainSR(channels=8, scale=4))
    hw = 256 * 256
    assert m.activations == 56 * hw
    assert isinstance(m, ModelMetrics)


class Shared(nn.Module):
    """One conv module called twice, a grouped strided conv, BN, PReLU and a transpose conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.g = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.pr = nn.PReLU(8)
        self.t = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(self.c(x))
        return self.t(self.pr(self.bn(self.g(x))))


def test_shared_grouped_bn_prelu_transpose() -> None:
    h, w = 8, 12
    m = model_metrics(Shared(), input_hw=(h, w), in_channels=4)
    hw, hw2 = h * w, (h // 2) * (w // 2)
    c_flops = 4 * 4 * 9 * hw
    g_flops = 9 * 4 * (8 // 2) * hw2  # k² · C_in · C_out/groups · H_out W_out
    bn_flops = 2 * 8 * hw2
    pr_flops = 8 * hw2
    t_flops = 8 * 2 * 4 * hw  # weight.numel() · output positions (the utility's formula)
    assert m.flops == 2 * c_flops + g_flops + bn_flops + pr_flops + t_flops
    assert m.convs == 4
    assert m.activations == 2 * 4 * hw + 8 * hw2 + 2 * hw


class WithFunctional(nn.Module):
    """A fixed Sobel filter applied with F.conv2d on a buffer, plus a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        self.sobel: torch.Tensor
        self.register_buffer("sobel", sobel.expand(3, 1, 3, 3).clone())
        self.conv = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) + F.conv2d(x, self.sobel, padding=1, groups=3)
        return self.fc(y.mean(dim=(2, 3)))


def test_functional_conv_and_linear_counted() -> None:
    h, w = 6, 7
    model = WithFunctional()
    model.train()
    m = model_metrics(model, input_hw=(h, w))
    hw = h * w
    assert m.convs == 2 and m.functional_convs == 1
    assert m.flops == 3 * 3 * hw + 3 * 9 * hw + 3 * 5
    assert m.activations == 3 * hw + 3 * hw
    assert m.params == 3 * 3 + 3 + 3 * 5 + 5  # buffers are not parameters
    # state restored: training flag kept, no hooks left behind
    assert model.training
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks


def test_rfdn_matches_ntire2023_report() -> None:
    """NTIRE 2023 ESR baseline RFDN: 0.433 M params, 27.10 G FLOPs, 112.03 M activations
    (the challenge's published figures, 256×256 input); 64 convs."""
    rfdn = pytest.importorskip("esr_deploy.zoo.rfdn")
    m = model_metrics(rfdn.RFDN())
    assert m.params == 433_448
    assert round(m.flops / 1e9, 2) == 27.10
    assert round(m.activations / 1e6, 2) == 112.03
    assert m.convs == 64


@pytest.mark.parametrize(
    ("func", "x_shape", "w_shape", "kwargs"),
    [
        (F.conv2d, (1, 3, 17, 23), (8, 3, 3, 3), {"padding": 1}),
        (F.conv2d, (2, 4, 17, 23), (6, 2, 5, 3),
         {"stride": (2, 3), "padding": (2, 0), "groups": 2}),
        (F.conv2d, (1, 4, 19, 20), (4, 1, 3, 3), {"dilation": 2, "padding": "same", "groups": 4}),
        (F.conv2d, (1, 3, 19, 20), (5, 3, 4, 2), {"padding": "valid", "stride": 3}),
        (torch.conv2d, (3, 16, 16), (2, 3, 1, 1), {}),  # unbatched
        (F.conv_transpose2d, (1, 8, 9, 11), (8, 3, 4, 4), {"stride": 2, "padding": 1}),
        (F.conv_transpose2d, (1, 4, 9, 11), (4, 2, 3, 5),
         {"stride": (3, 2), "padding": (1, 2), "output_padding": (2, 1), "groups": 2,
          "dilation": (1, 2)}),
    ],
)  # fmt: skip
def test_convs_stand_in_with_their_real_output_shape(
    func: Any, x_shape: tuple[int, ...], w_shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    x, w = torch.rand(x_shape), torch.rand(w_shape)
    real = func(x, w, **kwargs)
    stand_in = _conv_shaped_zeros(func, (x, w), kwargs)
    assert stand_in.shape == real.shape and not stand_in.any()
    order = ("stride", "padding", "output_padding", "groups", "dilation") if "transpose" in \
        func.__name__ else ("stride", "padding", "dilation", "groups")  # fmt: skip
    defaults = {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    positional = _conv_shaped_zeros(
        func, (x, w, None, *({**defaults, **kwargs}[k] for k in order)), {}
    )
    assert positional.shape == real.shape


def test_padding_modes_and_counts_match_a_real_run() -> None:
    """A reflect-padded conv (the module pads, then convs) and a transposed conv: the counts
    with stand-in convs equal those of hooks on a real forward."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=2, padding_mode="reflect", dilation=2),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),
        nn.Conv2d(4, 3, 3, stride=2),
    ).eval()
    shapes: list[torch.Size] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: shapes.append(o.shape))
             for m in model if not isinstance(m, nn.ReLU)]  # fmt: skip
    with torch.no_grad():
        model(torch.zeros(1, 3, 40, 36))
    for h in hooks:
        h.remove()
    m = model_metrics(model, (40, 36))
    convs = [c for c in model if not isinstance(c, nn.ReLU)]
    expected = sum(c.weight.numel() * s.numel() // s[1] for c, s in zip(convs, shapes, strict=True))
    assert m.flops == expected + shapes[0].numel()  # + the ReLU's outputs
    assert m.activations == sum(s.numel() for s in shapes) and m.convs == 3
