"""FMEN, training form (Du et al., "Fast and Memory-Efficient Network Towards Efficient Image
Super-Resolution", CVPR Workshops 2022).

Layout checked against ``NJU-Jet/FMEN`` ``train_fmen.py`` (``TRAIN_FMEN``); module and
parameter names are the same, so a checkpoint of the official training code loads strictly.
The top-level layout is that of the deploy form in :mod:`esr_deploy.zoo.fmen`::

    fea = head(x)                                        # 3x3, 3 -> nf
    h   = warmup(fea)                                    # conv3x3, then an HFAB
    for i in range(num_blocks): h = HFABs[i](ERBs[i](h))
    out = PixelShuffle(tail conv3x3(lr_conv(h) + fea))

* RRRB (:class:`esr_deploy.zoo.reparam_blocks.RRRB`): 1x1 expand to ``ratio * C`` (bias-padded),
  valid 3x3 plus the expanded identity, 1x1 reduce, plus the input: one 3x3 conv after folding.
* ERB: ``RRRB -> LeakyReLU(0.1) -> RRRB``.
* HFAB (training form)::

      out = squeeze_valid(pad_with_bias(bn1(x), shift(bn1)))      # 3x3, nf -> mid
      out = lrelu(convs(lrelu(out)))                               # ERBs at width mid
      out = excitate_valid(pad_with_bias(bn2(out), shift(bn2)))   # 3x3, mid -> nf
      return x * sigmoid(bn3(out))

  ``bn1`` and ``bn2`` are padded with their shift, i.e. they act as BNs of zero-padded
  tensors, so ``bn1`` folds into ``squeeze`` and ``bn2``/``bn3`` into ``excitate`` exactly,
  borders included. After folding the HFAB is the deploy HFAB (``squeeze``, ERBs of single
  3x3 convs, ``excitate``): same conv count and parameter count as the official deploy
  checkpoint, which has no BN.

LeakyReLU slope 0.1 throughout; input and output in 0..255 (``rgb_range = 255``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esr_deploy.errors import RecipeError
from esr_deploy.zoo.reparam_blocks import RRRB, bn_shift, pad_with_bias

__all__ = ["ERB", "FMENTrain", "HFAB"]


class ERB(nn.Module):
    """Enhanced residual block, training form: ``conv2(lrelu(conv1(x)))``, both RRRBs."""

    def __init__(self, channels: int, ratio: int, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.conv1 = RRRB(channels, ratio)
        self.conv2 = RRRB(channels, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two RRRBs with a LeakyReLU between them."""
        return self.conv2(F.leaky_relu(self.conv1(x), self.negative_slope))


class HFAB(nn.Module):
    """High-frequency attention block, training form (with ``bn1``, ``bn2``, ``bn3``).

    See the module docstring for the forward. ``squeeze`` and ``excitate`` are *valid* 3x3
    convs that read BN outputs padded with the BN's shift (what the BN gives for a zero
    input), which is what makes each "BN -> pad -> conv" exactly one zero-padded 3x3 conv.
    """

    def __init__(
        self,
        channels: int,
        num_erbs: int,
        mid_channels: int,
        ratio: int,
        negative_slope: float,
    ) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.bn3 = nn.BatchNorm2d(channels)
        self.squeeze = nn.Conv2d(channels, mid_channels, 3, padding=0)
        self.convs = nn.Sequential(
            *[ERB(mid_channels, ratio, negative_slope) for _ in range(num_erbs)]
        )
        self.excitate = nn.Conv2d(mid_channels, channels, 3, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` times its high-frequency attention map."""
        out = pad_with_bias(self.bn1(x), bn_shift(self.bn1))
        out = F.leaky_relu(self.squeeze(out), self.negative_slope)
        out = F.leaky_relu(self.convs(out), self.negative_slope)
        out = pad_with_bias(self.bn2(out), bn_shift(self.bn2))
        out = self.excitate(out)
        return x * torch.sigmoid(self.bn3(out))


class FMENTrain(nn.Module):
    """FMEN (training form) for ``upscale``-times SR; NTIRE 2022 x4: 50 features.

    The arguments shared with :class:`esr_deploy.zoo.fmen.FMEN` mean the same; with equal
    values the folded model has exactly the deploy model's convs and parameters.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width of the trunk (``n_feats``).
        num_blocks: number of ERB + HFAB pairs (``down_blocks``).
        up_blocks: ERBs inside each HFAB: warm-up HFAB first, then one per block.
        mid_channels: width inside the body HFABs (``mid_feats``).
        warmup_mid_channels: width inside the warm-up HFAB (``mid_feats - 4``).
        negative_slope: LeakyReLU slope.
        backbone_expand_ratio: RRRB expansion of the trunk ERBs.
        attention_expand_ratio: RRRB expansion of the ERBs inside the HFABs.
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
        backbone_expand_ratio: int = 2,
        attention_expand_ratio: int = 2,
        upscale: int = 4,
    ) -> None:
        super().__init__()
        if up_blocks is None:
            up_blocks = [2] + [1] * num_blocks
        if len(up_blocks) != num_blocks + 1:
            raise RecipeError(
                "FMENTrain arch_args are inconsistent — up_blocks must hold num_blocks + 1 = "
                f"{num_blocks + 1} ERB counts (warm-up HFAB first), got {list(up_blocks)} — "
                "fix the recipe's [arch_args]"
            )
        self.arch_args: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "feature_channels": feature_channels,
            "num_blocks": num_blocks,
            "up_blocks": list(up_blocks),
            "mid_channels": mid_channels,
            "warmup_mid_channels": warmup_mid_channels,
            "negative_slope": negative_slope,
            "backbone_expand_ratio": backbone_expand_ratio,
            "attention_expand_ratio": attention_expand_ratio,
            "upscale": upscale,
        }
        nf = feature_channels
        self.num_blocks = num_blocks
        self.head = nn.Conv2d(in_channels, nf, 3, padding=1)
        self.warmup = nn.Sequential(
            nn.Conv2d(nf, nf, 3, padding=1),
            HFAB(nf, up_blocks[0], warmup_mid_channels, attention_expand_ratio, negative_slope),
        )
        self.ERBs = nn.ModuleList(
            [ERB(nf, backbone_expand_ratio, negative_slope) for _ in range(num_blocks)]
        )
        self.HFABs = nn.ModuleList(
            [
                HFAB(nf, up_blocks[i + 1], mid_channels, attention_expand_ratio, negative_slope)
                for i in range(num_blocks)
            ]
        )
        self.lr_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.tail = nn.Sequential(
            nn.Conv2d(nf, out_channels * upscale**2, 3, padding=1), nn.PixelShuffle(upscale)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in 0..255 -> N x C x sH x sW in 0..255 (not clamped)."""
        fea = self.head(x)
        h = self.warmup(fea)
        for erb, hfab in zip(self.ERBs, self.HFABs, strict=True):
            h = hfab(erb(h))
        return self.tail(self.lr_conv(h) + fea)
