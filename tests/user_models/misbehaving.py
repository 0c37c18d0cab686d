"""User code as it really is (issue 18, classes 2, 5 and 6): a constructor pinned to CUDA,
a factory function instead of a class, code that prints while it builds and runs, and code
that raises. Each builds the same small x4 network (input and output in 0..1)."""

from __future__ import annotations

import torch
from torch import nn


class PlainSR(nn.Module):
    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.tail(self.act(self.head(x))))


class CudaPinnedSR(PlainSR):
    """Calls ``.cuda()`` on its layers and a buffer while being built, as research code does."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__(channels, scale)
        self.head = self.head.cuda()
        mean = torch.tensor([0.45, 0.44, 0.40]).view(1, 3, 1, 1).cuda()
        self.register_buffer("mean", mean, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - self.mean) + 0.5


def make_model(channels: int = 8, scale: int = 4) -> nn.Module:
    """A factory, the way many codebases build their network."""
    return PlainSR(channels=channels, scale=scale)


def make_options(channels: int = 8) -> dict[str, int]:
    """A function that returns something that is not a network."""
    return {"channels": channels}


class ChattySR(PlainSR):
    """Prints while it is built and on every forward."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        print(f"building ChattySR with {channels} channels")
        super().__init__(channels, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("forward", tuple(x.shape))
        return super().forward(x)


class BrokenConstructorSR(PlainSR):
    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__(channels, scale)
        raise ValueError("this checkpoint needs config.yaml next to it")


class BrokenForwardSR(PlainSR):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.act(self.head(x))
        raise NotImplementedError(f"inference path not written yet ({feats.shape[1]} channels)")


class LookupForwardSR(PlainSR):
    """Raises an error esr-deploy does not expect from a forward (not a size error)."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__(channels, scale)
        self.branches: dict[str, nn.Module] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branches["x4"](x)
