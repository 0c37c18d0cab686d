"""User networks trained with weight normalisation (issue 18, class 1).

Three spellings that reach esr-deploy from real repositories: the old
``torch.nn.utils.weight_norm`` hook (a non-leaf ``weight`` attribute that ``copy.deepcopy``
refuses once the model has run), ``torch.nn.utils.parametrizations.weight_norm``, and a
module that keeps a tensor computed from its parameters in ``__init__`` (another non-leaf
attribute). Input and output in 0..1, x4.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class _Body(nn.Module):
    def __init__(self, wrap, channels: int, scale: int) -> None:
        super().__init__()
        self.head = wrap(_conv(3, channels, 3))
        self.branch3 = wrap(_conv(channels, channels, 3))
        self.branch1 = wrap(_conv(channels, channels, 1))
        self.act = nn.ReLU()
        self.tail = wrap(_conv(channels, 3 * scale * scale, 3))
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        f = self.act(self.branch3(f) + self.branch1(f)) + f
        return self.shuffle(self.tail(f))


class HookWeightNormSR(_Body):
    """``torch.nn.utils.weight_norm`` (the deprecated forward-pre-hook form)."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__(nn.utils.weight_norm, channels, scale)
        with torch.no_grad():
            self(torch.zeros(1, 3, 4, 4))  # as after training: weight is now a non-leaf


class ParametrizedWeightNormSR(_Body):
    """``torch.nn.utils.parametrizations.weight_norm``."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__(parametrizations.weight_norm, channels, scale)


class NonLeafAttributeSR(_Body):
    """Keeps ``gain`` (computed from a parameter in ``__init__``) as a plain attribute."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__(lambda m: m, channels, scale)
        self.log_gain = nn.Parameter(torch.zeros(1))
        self.gain = self.log_gain.exp()  # non-leaf: copy.deepcopy refuses it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain.detach()
