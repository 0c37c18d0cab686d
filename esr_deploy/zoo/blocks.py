"""Building blocks shared by the zoo's architectures.

* :func:`conv_layer`: a stride-1 ``nn.Conv2d`` with "same" zero padding.
* :func:`pixelshuffle_block`: the usual ESPCN-style upsampler, ``conv3x3 -> PixelShuffle``,
  as an ``nn.Sequential`` so that the conv's parameters are named ``0.weight`` / ``0.bias``
  like in the official checkpoints.
* :class:`ESA`: the Enhanced Spatial Attention of RFANet, in the two variants used by the
  efficient-SR winners: the RFDN one (with ``conv_max`` and ``conv3_`` and ReLUs) and the
  lighter RLFN one (used by RLFN and DIPNet).

Every forward here is export-friendly: no Python ``int()`` of tensor shapes and no
data-dependent control flow, so ``torch.onnx.export`` keeps H and W dynamic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ESA", "conv_layer", "pixelshuffle_block"]


def conv_layer(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    bias: bool = True,
    stride: int = 1,
    padding: int | None = None,
) -> nn.Conv2d:
    """A 2-D convolution with zero padding ``(kernel_size - 1) // 2`` unless ``padding`` is given.

    With ``stride=1`` and an odd kernel the spatial size is preserved.
    """
    if padding is None:
        padding = (kernel_size - 1) // 2
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
    )


def pixelshuffle_block(
    in_channels: int,
    out_channels: int,
    upscale: int,
    *,
    kernel_size: int = 3,
    bias: bool = True,
) -> nn.Sequential:
    """``conv(in -> out * upscale**2) -> PixelShuffle(upscale)``, as ``nn.Sequential``.

    The conv is element ``0`` (parameters ``0.weight``, ``0.bias``), matching the official
    IMDN / RFDN / RLFN / FMEN / DIPNet checkpoints.
    """
    conv = conv_layer(in_channels, out_channels * upscale**2, kernel_size, bias=bias)
    return nn.Sequential(conv, nn.PixelShuffle(upscale))


class ESA(nn.Module):
    """Enhanced Spatial Attention (Liu et al., RFANet, CVPR 2020) as used in RFDN, RLFN, DIPNet.

    With ``f = esa_channels`` and ``n = n_feats``::

        c1_ = conv1(x)                          # 1x1, n -> f
        c1  = conv2(c1_)                        # 3x3, stride 2, no padding
        v   = max_pool2d(c1, kernel 7, stride 3)
        RFDN variant (with_conv_max=True):
            v  = relu(conv_max(v)); v = relu(conv3(v)); c3 = conv3_(v)
        RLFN variant (with_conv_max=False):
            c3 = conv3(v)
        c3  = bilinear upsample of c3 to x's H x W (align_corners=False)
        m   = sigmoid(conv4(c3 + conv_f(c1_)))  # conv_f 1x1 f -> f, conv4 1x1 f -> n
        return x * m

    The stride-2 conv and the 7x7/3 pooling need ``H, W >= 15`` at the block's input.
    """

    def __init__(
        self,
        n_feats: int,
        esa_channels: int,
        *,
        with_conv_max: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        f = esa_channels
        self.with_conv_max = with_conv_max
        self.conv1 = conv_layer(n_feats, f, 1, bias=bias)
        self.conv_f = conv_layer(f, f, 1, bias=bias)
        if with_conv_max:
            self.conv_max = conv_layer(f, f, 3, bias=bias)
        self.conv2 = conv_layer(f, f, 3, bias=bias, stride=2, padding=0)
        self.conv3 = conv_layer(f, f, 3, bias=bias)
        if with_conv_max:
            self.conv3_ = conv_layer(f, f, 3, bias=bias)
        self.conv4 = conv_layer(f, n_feats, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` scaled by a spatial attention mask in (0, 1)."""
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        if self.with_conv_max:
            v_range = F.relu(self.conv_max(v_max))
            c3 = F.relu(self.conv3(v_range))
            c3 = self.conv3_(c3)
        else:
            c3 = self.conv3(v_max)
        c3 = F.interpolate(c3, size=x.shape[2:], mode="bilinear", align_corners=False)
        cf = self.conv_f(c1_)
        c4 = self.conv4(c3 + cf)
        return x * torch.sigmoid(c4)


class DistillationTrunk(nn.Module):
    """The IMDN/RFDN trunk: head conv, ``k`` numbered blocks, concat-fuse, long skip, upsampler.

    ``out = up(LR_conv(lrelu(c(cat(b_1, .., b_k)))) + fea)`` with ``fea = fea_conv(x)`` and
    ``b_i = block_i(b_{i-1})``, ``b_0 = fea``. Parameter names (``fea_conv``,
    ``<prefix><i>``, ``c.0``, ``LR_conv``, ``upsampler.0``) are those of the official
    checkpoints; subclasses choose the block and its name prefix.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        block_prefix: str,
        in_channels: int,
        out_channels: int,
        feature_channels: int,
        upscale: int,
        negative_slope: float,
    ) -> None:
        super().__init__()
        nf = feature_channels
        self.block_names = [f"{block_prefix}{i + 1}" for i in range(len(blocks))]
        self.fea_conv = conv_layer(in_channels, nf, 3)
        for name, block in zip(self.block_names, blocks, strict=True):
            self.add_module(name, block)
        self.c = nn.Sequential(conv_layer(nf * len(blocks), nf, 1), nn.LeakyReLU(negative_slope))
        self.LR_conv = conv_layer(nf, nf, 3)
        self.upsampler = pixelshuffle_block(nf, out_channels, upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.fea_conv(x)
        outs = []
        h = fea
        for name in self.block_names:
            h = getattr(self, name)(h)
            outs.append(h)
        return self.upsampler(self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea)
