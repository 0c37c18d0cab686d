"""A 0..255 network whose middle activation overflows float16 (not part of the zoo).

``LoudSR``: conv, ReLU, a 1×1 conv whose weights are scaled by 4000 (its output reaches
about 1e6 on 0..255 images, beyond float16's 65504), a division by 4000, and a conv +
PixelShuffle(2) tail; no biases. A blind ``.half()`` gives inf; a precision pass that
measures ranges must keep the loud conv (and the division reading it) in float32.
"""

from __future__ import annotations

import torch
from torch import nn

LOUD_GAIN = 4000.0


class LoudSR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.loud = nn.Conv2d(8, 8, 1, bias=False)
        self.tail = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.shuffle = nn.PixelShuffle(2)
        with torch.no_grad():
            for conv in (self.head, self.loud, self.tail):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
            self.loud.weight.mul_(LOUD_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.loud(torch.relu(self.head(x)))
        return self.shuffle(self.tail(y / LOUD_GAIN))
