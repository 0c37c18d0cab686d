"""IMDN: Information Multi-Distillation Network (Hui et al., ACM MM 2019).

AIM 2019 constrained-SR winner and the NTIRE efficient-SR baseline. Loads the official
``IMDN_x4.pth`` (after its ``module.`` prefix is stripped). Input and output in 0..1.

Layout::

    fea = fea_conv(x)                                   # 3x3, 3 -> nf
    b_1 = IMDB1(fea); ...; b_k = IMDBk(b_{k-1})
    lr  = LR_conv(lrelu(c(cat(b_1..b_k)))) + fea        # c: 1x1, k*nf -> nf
    out = PixelShuffle(upsampler conv3x3(lr))

An IMDB (information multi-distillation block) splits off ``distilled_channels`` after each
of three 3x3 convs (LeakyReLU 0.05), a fourth conv produces the last ``distilled_channels``,
the four distilled parts are concatenated, reweighted by contrast-aware channel attention
(CCA) and fused by a 1x1 conv, plus the block's input.
"""

from __future__ import annotations

import torch
from torch import nn

from esr_deploy.zoo.blocks import DistillationTrunk, conv_layer

__all__ = ["CCALayer", "IMDB", "IMDN"]

_NEG_SLOPE = 0.05


class CCALayer(nn.Module):
    """Contrast-aware channel attention.

    ``y = x * sigmoid(W2 relu(W1 (std_hw(x) + mean_hw(x))))`` where ``std_hw`` is the
    (biased) per-channel standard deviation over H and W and ``W1``, ``W2`` are 1x1 convs
    ``channels -> channels // reduction -> channels`` (``conv_du.0`` and ``conv_du.2``).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, padding=0, bias=True),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1, padding=0, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reweight the channels of ``x``."""
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).pow(0.5)
        return x * self.conv_du(std + mean)


class IMDB(nn.Module):
    """Information multi-distillation block (the paper's IMDB, ``IMDModule`` upstream)."""

    def __init__(self, channels: int, distilled_channels: int, cca_reduction: int) -> None:
        super().__init__()
        self.distilled = distilled_channels
        self.remaining = channels - distilled_channels
        self.c1 = conv_layer(channels, channels, 3)
        self.c2 = conv_layer(self.remaining, channels, 3)
        self.c3 = conv_layer(self.remaining, channels, 3)
        self.c4 = conv_layer(self.remaining, distilled_channels, 3)
        self.act = nn.LeakyReLU(_NEG_SLOPE)
        self.c5 = conv_layer(distilled_channels * 4, channels, 1)
        self.cca = CCALayer(distilled_channels * 4, cca_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Distil, attend, fuse, add the input."""
        split = [self.distilled, self.remaining]
        d1, r1 = torch.split(self.act(self.c1(x)), split, dim=1)
        d2, r2 = torch.split(self.act(self.c2(r1)), split, dim=1)
        d3, r3 = torch.split(self.act(self.c3(r2)), split, dim=1)
        d4 = self.c4(r3)
        out = torch.cat([d1, d2, d3, d4], dim=1)
        return self.c5(self.cca(out)) + x


class IMDN(DistillationTrunk):
    """IMDN for ``upscale``-times SR; official x4: 64 features, 6 IMDBs, 16 distilled, 715 k params.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width of the feature maps (``nf``).
        num_blocks: number of IMDBs.
        distilled_channels: channels split off at each distillation step (``nf // 4``).
        cca_reduction: channel reduction inside CCA.
        upscale: SR factor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 64,
        num_blocks: int = 6,
        distilled_channels: int = 16,
        cca_reduction: int = 16,
        upscale: int = 4,
    ) -> None:
        nf = feature_channels
        super().__init__(
            blocks=[IMDB(nf, distilled_channels, cca_reduction) for _ in range(num_blocks)],
            block_prefix="IMDB",
            in_channels=in_channels,
            out_channels=out_channels,
            feature_channels=nf,
            upscale=upscale,
            negative_slope=_NEG_SLOPE,
        )
        self.num_blocks = num_blocks
