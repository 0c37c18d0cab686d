"""Tests of esr_deploy.validate.metrics against hand-computed NTIRE-style counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models.plain_sr import PlainSR

from esr_deploy.validate.metrics import ModelMetrics, model_metrics


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
