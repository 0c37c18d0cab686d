"""FMEN: Fast and Memory-Efficient Network, deploy form (Du et al., CVPR Workshops 2022).

NTIRE 2022 ESR 2nd place (team NJU_Jet). Loads the official ``team03_fmen.pth`` of the
NTIRE 2022 ESR repository, which is already re-parameterized: each RRRB (1x1 expand, 3x3 with
bias padding, 1x1 reduce, identities, BN) is one 3x3 conv ``rep_conv``. Input and output in
0..255 (no mean shift).

Layout::

    x   = head(x)                                        # 3x3, 3 -> nf
    h   = warmup(x)                                      # conv3x3, then an HFAB
    for i in range(num_blocks): h = hfabs[i](basic_blocks[i](h))
    out = PixelShuffle(tail conv3x3(lr_conv(h) + x))

ERB (enhanced residual block, deploy form): ``conv2(lrelu(conv1(x)))``, each conv an RRRB
whose residuals have been folded into its single 3x3 ``rep_conv``.

HFAB (high-frequency attention block): ``x * sigmoid(excitate(lrelu(ERBs(lrelu(squeeze(x))))))``
with ``squeeze`` 3x3 nf -> mid, a chain of ERBs at width mid, ``excitate`` 3x3 mid -> nf.
LeakyReLU slope 0.1 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esr_deploy.errors import RecipeError
from esr_deploy.zoo.blocks import conv_layer, pixelshuffle_block

__all__ = ["ERB", "FMEN", "HFAB", "RRRB"]


class RRRB(nn.Module):
    """Residual-in-residual re-parameterizable block, deploy form: one 3x3 conv ``rep_conv``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.rep_conv = conv_layer(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the merged 3x3 conv."""
        return self.rep_conv(x)


class ERB(nn.Module):
    """Enhanced residual block, deploy form: ``conv2(lrelu(conv1(x)))``."""

    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.conv1 = RRRB(channels)
        self.conv2 = RRRB(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two merged RRRBs with a LeakyReLU between them."""
        return self.conv2(F.leaky_relu(self.conv1(x), self.negative_slope))


class HFAB(nn.Module):
    """High-frequency attention block: squeeze, ERBs, excitate, sigmoid, multiply."""

    def __init__(
        self, channels: int, num_erbs: int, mid_channels: int, negative_slope: float
    ) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.squeeze = conv_layer(channels, mid_channels, 3)
        self.convs = nn.Sequential(*[ERB(mid_channels, negative_slope) for _ in range(num_erbs)])
        self.excitate = conv_layer(mid_channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` times its high-frequency attention map."""
        out = F.leaky_relu(self.squeeze(x), self.negative_slope)
        out = F.leaky_relu(self.convs(out), self.negative_slope)
        return x * torch.sigmoid(self.excitate(out))


class FMEN(nn.Module):
    """FMEN (deploy form) for ``upscale``-times SR; NTIRE 2022 x4: 50 features, 341 k params.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width of the feature maps (``n_feats``).
        num_blocks: number of ERB + HFAB pairs (``down_blocks``).
        up_blocks: ERBs inside each HFAB: first the warm-up HFAB, then one per block
            (``len(up_blocks) == num_blocks + 1``).
        mid_channels: width inside the HFABs of the body.
        warmup_mid_channels: width inside the warm-up HFAB.
        negative_slope: LeakyReLU slope.
        upscale: SR factor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 50,
        num_blocks: int = 4,
        up_blocks: list[int] | None = None,
        mid_channels: int = 16,
        warmup_mid_channels: int = 12,
        negative_slope: float = 0.1,
        upscale: int = 4,
    ) -> None:
        super().__init__()
        nf = feature_channels
        if up_blocks is None:
            up_blocks = [2] + [1] * num_blocks
        if len(up_blocks) != num_blocks + 1:
            raise RecipeError(
                "FMEN arch_args are inconsistent — up_blocks must hold num_blocks + 1 = "
                f"{num_blocks + 1} ERB counts (warm-up HFAB first), got {list(up_blocks)} — "
                "fix the recipe's [arch_args]"
            )
        self.num_blocks = num_blocks
        self.head = conv_layer(in_channels, nf, 3)
        self.warmup = nn.Sequential(
            conv_layer(nf, nf, 3),
            HFAB(nf, up_blocks[0], warmup_mid_channels, negative_slope),
        )
        self.basic_blocks = nn.ModuleList([ERB(nf, negative_slope) for _ in range(num_blocks)])
        self.hfabs = nn.ModuleList(
            [HFAB(nf, up_blocks[i + 1], mid_channels, negative_slope) for i in range(num_blocks)]
        )
        self.lr_conv = conv_layer(nf, nf, 3)
        self.tail = pixelshuffle_block(nf, out_channels, upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in 0..255 -> N x C x sH x sW in 0..255 (not clamped)."""
        fea = self.head(x)
        h = self.warmup(fea)
        for erb, hfab in zip(self.basic_blocks, self.hfabs, strict=True):
            h = hfab(erb(h))
        return self.tail(self.lr_conv(h) + fea)
