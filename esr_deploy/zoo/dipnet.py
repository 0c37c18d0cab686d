"""DIPNet, deploy form (Yu et al., CVPR Workshops 2023).

NTIRE 2023 ESR fastest entry. An RLFN-like network trained with re-parameterizable blocks and
then channel-pruned: the released ``DIPNet.pth`` is the re-parameterized, pruned result, with
irregular widths per layer and the trunk convs without bias. Every width and bias flag is a
constructor argument (written out in ``recipes/dipnet_x4.toml``), so other pruned variants
are described by a recipe alone. Input and output in 0..1.

Layout (RLFN's, see :mod:`esr_deploy.zoo.rlfn`)::

    fea = conv_1(x)                                     # 3x3, 3 -> nf
    h   = block_k(... block_1(fea))                     # RLFBs with per-block widths
    lr  = conv_2(h) + fea                               # 3x3
    out = PixelShuffle(upsampler conv3x3(lr))
"""

from __future__ import annotations

import torch
from torch import nn

from esr_deploy.errors import RecipeError
from esr_deploy.zoo.blocks import conv_layer, pixelshuffle_block
from esr_deploy.zoo.rlfn import RLFB

__all__ = ["DIPNet"]


class DIPNet(nn.Module):
    """DIPNet (deploy form) for ``upscale``-times SR; NTIRE 2023 x4: 243 k params.

    The number of blocks is ``len(mid_channels)``.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width of the trunk (``conv_1`` output, every block's input, residual
            and output).
        mid_channels: per block, the output widths of ``c1_r`` and ``c2_r``, e.g.
            ``[[38, 38], [38, 38], [38, 38], [38, 38]]``.
        esa_channels: per block, the inner width of its ESA.
        head_bias: whether ``conv_1`` has a bias.
        block_conv_bias: bias flags of ``c1_r``, ``c2_r``, ``c3_r``, ``c5`` (every block).
        esa_bias: whether the ESA convs have a bias.
        lr_conv_bias: whether ``conv_2`` has a bias.
        upsampler_bias: whether the upsampler's conv has a bias.
        upscale: SR factor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 44,
        mid_channels: list[list[int]] | None = None,
        esa_channels: list[int] | None = None,
        head_bias: bool = False,
        block_conv_bias: list[bool] | None = None,
        esa_bias: bool = True,
        lr_conv_bias: bool = False,
        upsampler_bias: bool = False,
        upscale: int = 4,
    ) -> None:
        super().__init__()
        if mid_channels is None:
            mid_channels = [[38, 38]] * 4
        if esa_channels is None:
            esa_channels = [16] * len(mid_channels)
        if block_conv_bias is None:
            block_conv_bias = [False] * 4
        if len(esa_channels) != len(mid_channels) or any(len(m) != 2 for m in mid_channels):
            raise RecipeError(
                "DIPNet arch_args are inconsistent — mid_channels must hold one [c1_r, c2_r] "
                f"pair per block and esa_channels one width per block, got mid_channels="
                f"{mid_channels}, esa_channels={esa_channels} — fix the recipe's [arch_args]"
            )
        if len(block_conv_bias) != 4:
            raise RecipeError(
                "DIPNet arch_args are inconsistent — block_conv_bias must hold 4 flags "
                f"(c1_r, c2_r, c3_r, c5), got {block_conv_bias} — fix the recipe's [arch_args]"
            )
        nf = feature_channels
        self.num_blocks = len(mid_channels)
        self.conv_1 = conv_layer(in_channels, nf, 3, bias=head_bias)
        for i, (mids, esa) in enumerate(zip(mid_channels, esa_channels, strict=True)):
            block = RLFB(
                nf, list(mids), nf, esa, conv_bias=list(block_conv_bias), esa_bias=esa_bias
            )
            self.add_module(f"block_{i + 1}", block)
        self.conv_2 = conv_layer(nf, nf, 3, bias=lr_conv_bias)
        self.upsampler = pixelshuffle_block(nf, out_channels, upscale, bias=upsampler_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in 0..1 -> N x C x sH x sW in 0..1 (not clamped)."""
        fea = self.conv_1(x)
        h = fea
        for i in range(self.num_blocks):
            h = getattr(self, f"block_{i + 1}")(h)
        return self.upsampler(self.conv_2(h) + fea)
