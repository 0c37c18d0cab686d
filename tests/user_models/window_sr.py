"""Window-based user networks whose forward depends on the input size (issue 18, class 4).

``WindowGateSR`` pads its features to a multiple of the window only when they are not one
(``if pad_h or pad_w``), as window-attention code does: a graph traced at a multiple of the
window loses the padding and fails at other sizes. ``AdaptivePoolSR`` pools to a size
computed from the input, which no ONNX export can express at a dynamic size: only a
fixed-size export would hold. Input and output in 0..1, x4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Tail(nn.Module):
    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(f))


class WindowGateSR(nn.Module):
    def __init__(self, channels: int = 8, window: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.window = window
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.tail = _Tail(channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ws = self.window
        f = self.head(x)
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_h or pad_w:
            f = F.pad(f, (0, pad_w, 0, pad_h), mode="replicate")
        b, c, hp, wp = f.shape
        windows = f.view(b, c, hp // ws, ws, wp // ws, ws)
        gate = torch.sigmoid(windows.mean(dim=(3, 5), keepdim=True))
        f = (windows * gate).view(b, c, hp, wp)[..., :h, :w]
        return self.tail(self.proj(f) + f)


class AdaptivePoolSR(nn.Module):
    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.tail = _Tail(channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        h, w = f.shape[-2:]
        ctx = F.adaptive_avg_pool2d(f, (max(h // 4, 1), max(w // 4, 1)))
        f = f * torch.sigmoid(F.interpolate(ctx, size=(h, w), mode="nearest"))
        return self.tail(f)
