"""RFDN: Residual Feature Distillation Network (Liu et al., ECCV Workshops 2020).

AIM 2020 efficient-SR winner and the NTIRE 2023 ESR baseline. Loads the official
``team00_rfdn.pth`` of the NTIRE 2023 ESR repository. Input and output in 0..255.

Layout (same trunk as IMDN)::

    fea = fea_conv(x)                                   # 3x3, 3 -> nf
    b_1 = B1(fea); ...; b_k = Bk(b_{k-1})
    lr  = LR_conv(lrelu(c(cat(b_1..b_k)))) + fea        # c: 1x1, k*nf -> nf
    out = PixelShuffle(upsampler conv3x3(lr))

An RFDB (residual feature distillation block) runs three shallow residual blocks
``r <- lrelu(conv3x3(r) + r)``; before each, a 1x1 conv distils ``distilled_channels`` from the
current features; a last 3x3 conv distils from the third residual output; the four distilled
parts are concatenated, fused by a 1x1 conv and reweighted by ESA (RFDN variant). There is no
residual connection around the block. LeakyReLU slope 0.05 throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from esr_deploy.zoo.blocks import ESA, DistillationTrunk, conv_layer

__all__ = ["RFDB", "RFDN"]

_NEG_SLOPE = 0.05


class RFDB(nn.Module):
    """Residual feature distillation block (``c{1,2,3}_d`` 1x1 distil, ``c{1,2,3}_r`` SRBs)."""

    def __init__(self, channels: int, distilled_channels: int, esa_channels: int) -> None:
        super().__init__()
        dc = distilled_channels
        self.c1_d = conv_layer(channels, dc, 1)
        self.c1_r = conv_layer(channels, channels, 3)
        self.c2_d = conv_layer(channels, dc, 1)
        self.c2_r = conv_layer(channels, channels, 3)
        self.c3_d = conv_layer(channels, dc, 1)
        self.c3_r = conv_layer(channels, channels, 3)
        self.c4 = conv_layer(channels, dc, 3)
        self.act = nn.LeakyReLU(_NEG_SLOPE)
        self.c5 = conv_layer(dc * 4, channels, 1)
        self.esa = ESA(channels, esa_channels, with_conv_max=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Distil through three shallow residual blocks, fuse, attend."""
        d1 = self.act(self.c1_d(x))
        r1 = self.act(self.c1_r(x) + x)
        d2 = self.act(self.c2_d(r1))
        r2 = self.act(self.c2_r(r1) + r1)
        d3 = self.act(self.c3_d(r2))
        r3 = self.act(self.c3_r(r2) + r2)
        d4 = self.act(self.c4(r3))
        out = torch.cat([d1, d2, d3, d4], dim=1)
        return self.esa(self.c5(out))


class RFDN(DistillationTrunk):
    """RFDN for ``upscale``-times SR; official x4: 50 features, 4 RFDBs, 433 k params.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width of the feature maps (``nf``).
        num_blocks: number of RFDBs (``B1`` .. ``Bk``).
        distilled_channels: channels of each 1x1 distillation conv (``nf // 2``).
        esa_channels: inner width of ESA (``nf // 4``).
        upscale: SR factor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 50,
        num_blocks: int = 4,
        distilled_channels: int = 25,
        esa_channels: int = 12,
        upscale: int = 4,
    ) -> None:
        nf = feature_channels
        super().__init__(
            blocks=[RFDB(nf, distilled_channels, esa_channels) for _ in range(num_blocks)],
            block_prefix="B",
            in_channels=in_channels,
            out_channels=out_channels,
            feature_channels=nf,
            upscale=upscale,
            negative_slope=_NEG_SLOPE,
        )
        self.num_blocks = num_blocks
