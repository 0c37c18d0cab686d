"""A small user SR network that esr-deploy has never seen (not part of the zoo).

Compiled end to end by ``tests/test_compile.py`` through ``--arch
tests.user_models.tiny_sr:TinyGatedSR``: a 3x3 conv head, residual units (conv, LeakyReLU,
conv, skip), a 1x1 sigmoid attention gate, and a conv + PixelShuffle tail. Input and output in
0..1. Class and attribute names are its own, so nothing in esr-deploy can special-case it.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(negative_slope)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_b(self.act(self.conv_a(x)))


class PixelGate(nn.Module):
    """``x * sigmoid(conv1x1(x))``: per-pixel, per-channel attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.proj(x))


class TinyGatedSR(nn.Module):
    def __init__(
        self,
        channels: int = 16,
        num_units: int = 2,
        upscale: int = 3,
        negative_slope: float = 0.05,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.units = nn.Sequential(
            *(ResidualUnit(channels, negative_slope) for _ in range(num_units))
        )
        self.gate = PixelGate(channels)
        self.to_pixels = nn.Conv2d(channels, 3 * upscale * upscale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.stem(x)
        feat = self.gate(self.units(feat)) + feat
        return self.shuffle(self.to_pixels(feat))
