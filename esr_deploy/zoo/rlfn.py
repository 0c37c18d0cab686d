"""RLFN: Residual Local Feature Network (Kong et al., CVPR Workshops 2022).

NTIRE 2022 efficient-SR runtime winner (ByteESR). Loads the official ``rlfn_x4.pth`` of
bytedance/RLFN. Input and output in 0..255.

Layout::

    fea = conv_1(x)                                     # 3x3, 3 -> nf
    h   = block_k(... block_1(fea))
    lr  = conv_2(h) + fea                               # 3x3
    out = PixelShuffle(upsampler conv3x3(lr))

An RLFB (residual local feature block) is three 3x3 convs with LeakyReLU(0.05) after each, a
residual add of the block's input, a 1x1 conv ``c5`` and ESA (RLFN variant).
"""

from __future__ import annotations

import torch
from torch import nn

from esr_deploy.zoo.blocks import ESA, conv_layer, pixelshuffle_block

__all__ = ["RLFB", "RLFN"]

_NEG_SLOPE = 0.05


class RLFB(nn.Module):
    """Residual local feature block: ``esa(c5(lrelu(c3(lrelu(c2(lrelu(c1(x)))))) + x))``.

    Args:
        in_channels: block input width (also the residual's width).
        mid_channels: outputs of ``c1_r`` and ``c2_r``, e.g. ``[52, 52]``.
        out_channels: output width of ``c5`` and ESA.
        esa_channels: inner width of ESA.
        conv_bias: bias flags of ``c1_r``, ``c2_r``, ``c3_r``, ``c5``.
        esa_bias: whether ESA's convs have a bias.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: list[int],
        out_channels: int,
        esa_channels: int,
        conv_bias: list[bool] | None = None,
        esa_bias: bool = True,
    ) -> None:
        super().__init__()
        m1, m2 = mid_channels
        b1, b2, b3, b5 = conv_bias if conv_bias is not None else [True] * 4
        self.c1_r = conv_layer(in_channels, m1, 3, bias=b1)
        self.c2_r = conv_layer(m1, m2, 3, bias=b2)
        self.c3_r = conv_layer(m2, in_channels, 3, bias=b3)
        self.c5 = conv_layer(in_channels, out_channels, 1, bias=b5)
        self.esa = ESA(out_channels, esa_channels, with_conv_max=False, bias=esa_bias)
        self.act = nn.LeakyReLU(_NEG_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Three convs, residual add, 1x1, spatial attention."""
        out = self.act(self.c1_r(x))
        out = self.act(self.c2_r(out))
        out = self.act(self.c3_r(out))
        return self.esa(self.c5(out + x))


class RLFN(nn.Module):
    """RLFN for ``upscale``-times SR; official x4: 52 features, 6 RLFBs, ESA 16, 544 k params.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width of the feature maps.
        mid_channels: width inside each RLFB (``c1_r`` and ``c2_r`` outputs).
        num_blocks: number of RLFBs (``block_1`` .. ``block_k``).
        esa_channels: inner width of ESA.
        upscale: SR factor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 52,
        mid_channels: int = 52,
        num_blocks: int = 6,
        esa_channels: int = 16,
        upscale: int = 4,
    ) -> None:
        super().__init__()
        nf = feature_channels
        self.num_blocks = num_blocks
        self.conv_1 = conv_layer(in_channels, nf, 3)
        for i in range(num_blocks):
            block = RLFB(nf, [mid_channels, mid_channels], nf, esa_channels)
            self.add_module(f"block_{i + 1}", block)
        self.conv_2 = conv_layer(nf, nf, 3)
        self.upsampler = pixelshuffle_block(nf, out_channels, upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in 0..255 -> N x C x sH x sW in 0..255 (not clamped)."""
        fea = self.conv_1(x)
        h = fea
        for i in range(self.num_blocks):
            h = getattr(self, f"block_{i + 1}")(h)
        return self.upsampler(self.conv_2(h) + fea)
