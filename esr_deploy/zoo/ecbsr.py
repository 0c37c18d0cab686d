"""ECBSR, training form (Zhang, Zeng and Zhang, "Edge-oriented Convolution Block for Real-time
Super Resolution on Mobile Devices", ACM MM 2021).

Layout checked against ``xindongzhang/ECBSR`` (``models/ecbsr.py``, ``models/ecb.py``,
``configs/ecbsr_x4_m4c16_prelu.yml``, ``train.py``)::

    y   = backbone(x)            # ECB(colors -> C, act) , m x ECB(C -> C, act),
                                 # ECB(C -> colors * s^2, linear)
    y   = y + repeat(x)          # the input, each colour channel repeated s^2 times
    out = PixelShuffle(s)(y)     # so the long skip is nearest-neighbour upsampling of x

Every ECB has ``depth_multiplier = 2`` (its 1x1 -> 3x3 branch is 2*out wide) and is, after
folding, one 3x3 conv (see :class:`esr_deploy.zoo.reparam_blocks.ECB`); the deploy model is
ECBSR's ``PlainSR``: ``m + 2`` 3x3 convs with PReLU between them and the same long skip.

The original is trained on the Y channel (``colors = 1``), where ``backbone(x) + x``
broadcasts the single input channel over the ``s^2`` output channels. For RGB
(``colors = 3``) broadcasting no longer applies; the equivalent is to add input channel ``c``
to channels ``c*s^2 .. c*s^2 + s^2 - 1`` (the channels pixel shuffle turns into colour ``c``),
i.e. ``x.repeat_interleave(s^2, dim=1)``, which is what this module does. Input and output
in 0..255 (ECBSR's data loaders do not normalise; its validation clamps to 0..255).
``with_idt`` defaults to ``False`` as in the published configs (``idt_ecbsr: 0``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esr_deploy.errors import RecipeError
from esr_deploy.zoo.reparam_blocks import ECB

__all__ = ["ECBSR"]


class ECBSR(nn.Module):
    """ECBSR (training form) for ``upscale``-times SR; M4C16: 4 body ECBs, 16 channels.

    Args:
        colors: input and output colour channels (ECBSR's ``colors``).
        num_modules: ECBs between the head and the tail ECB (``m``, ``module_nums``).
        channels: feature width (``C``, ``channel_nums``).
        depth_multiplier: width factor of each ECB's 1x1 -> 3x3 branch.
        with_idt: add the identity branch in the ECBs whose input and output widths match.
        act_type: ``"prelu"`` (published), ``"relu"`` or ``"linear"``; the tail is linear.
        upscale: SR factor ``s``.
    """

    def __init__(
        self,
        colors: int = 3,
        num_modules: int = 4,
        channels: int = 16,
        depth_multiplier: float = 2.0,
        with_idt: bool = False,
        act_type: str = "prelu",
        upscale: int = 4,
    ) -> None:
        super().__init__()
        if act_type not in ("prelu", "relu", "linear"):
            raise RecipeError(
                f"ECBSR arch_args are inconsistent — act_type must be prelu, relu or linear, "
                f"got {act_type!r} — fix the recipe's [arch_args]"
            )
        self.arch_args: dict[str, Any] = {
            "colors": colors,
            "num_modules": num_modules,
            "channels": channels,
            "depth_multiplier": depth_multiplier,
            "with_idt": with_idt,
            "act_type": act_type,
            "upscale": upscale,
        }
        self.upscale = upscale
        blocks = [ECB(colors, channels, depth_multiplier, act_type, with_idt)]
        blocks += [
            ECB(channels, channels, depth_multiplier, act_type, with_idt)
            for _ in range(num_modules)
        ]
        blocks.append(ECB(channels, colors * upscale**2, depth_multiplier, "linear", with_idt))
        self.backbone = nn.Sequential(*blocks)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x colors x H x W in 0..255 -> N x colors x sH x sW (not clamped)."""
        y = self.backbone(x) + x.repeat_interleave(self.upscale * self.upscale, dim=1)
        return self.upsampler(y)
