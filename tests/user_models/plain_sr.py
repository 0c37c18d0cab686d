"""The plainest SR network: ``conv3x3(3 → c) → ReLU → conv3x3(c → 3·s²) → pixel shuffle ×s``.

Shared by the tests that need a tiny, fully convolutional SR model with nothing to fold and
hand-countable metrics (parameters ``3·c·9 + c + c·3s²·9 + 3s²``): any input size from 1×1
up works, the output is ``s×`` the input.
"""

from __future__ import annotations

import torch
from torch import nn


class PlainSR(nn.Module):
    def __init__(self, channels: int = 8, scale: int = 3) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.tail(self.act(self.head(x))))
