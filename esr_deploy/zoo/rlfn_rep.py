"""RLFN with re-parameterizable convs, as DIPNet trains it (Yu et al., "DIPNet: Efficiency
Distillation and Iterative Pruning for Image Super-Resolution", CVPR Workshops 2023).

DIPNet's released code has no training script; its re-parameterized RLFB is documented by
the ``reparam`` method of ``RLFB_Rep_Prune`` in ``xiumu00/DIPNet``
``models/team34_EDIPV1.py`` (same team, NTIRE 2023): each of the three 3x3 convs of the RLFB
(``c1_r``, ``c2_r``, ``c3_r``) is trained as

    3x3 conv (in -> 256) -> 1x1 conv (256 -> out)  +  1x1 conv (in -> out)  +  identity

(the identity maps output channel ``i`` to input channel ``i % in``), all without bias, and
merged into one 3x3 conv for the pruned deploy model. The rest is RLFN's (``c5``, ESA,
LeakyReLU 0.05, long skip, pixel-shuffle upsampler), reused from :mod:`esr_deploy.zoo.rlfn` /
:mod:`esr_deploy.zoo.dipnet`. See :class:`esr_deploy.zoo.reparam_blocks.ExpandSqueezeRepConv`.

The recipe uses the widths and bias flags of the released DIPNet (``recipes/dipnet_x4.toml``),
so the folded model is the DIPNet deploy architecture (243,252 parameters). Input and
output in 0..1.
"""

from __future__ import annotations

from typing import Any

from esr_deploy.zoo.dipnet import DIPNet
from esr_deploy.zoo.reparam_blocks import ExpandSqueezeRepConv
from esr_deploy.zoo.rlfn import RLFB

__all__ = ["RLFNRep", "RepRLFB"]


class RepRLFB(RLFB):
    """RLFB whose ``c1_r``, ``c2_r``, ``c3_r`` are :class:`ExpandSqueezeRepConv` blocks.

    Same forward as :class:`esr_deploy.zoo.rlfn.RLFB`: ``esa(c5(lrelu(c3(lrelu(c2(lrelu(c1(x))))))
    + x))``; only the three 3x3 convs are multi-branch. ``conv_bias`` gives the bias flags of
    ``c1_r, c2_r, c3_r, c5``; a re-param conv with the flag set has biases on all three of its
    convs.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: list[int],
        out_channels: int,
        esa_channels: int,
        rep_channels: int,
        conv_bias: list[bool] | None = None,
        esa_bias: bool = True,
    ) -> None:
        super().__init__(in_channels, mid_channels, out_channels, esa_channels, conv_bias, esa_bias)
        m1, m2 = mid_channels
        b1, b2, b3, _ = conv_bias if conv_bias is not None else [True] * 4
        # replace RLFB's plain convs (same names, so RLFB.forward is reused unchanged)
        self.add_module("c1_r", ExpandSqueezeRepConv(in_channels, m1, rep_channels, bias=b1))
        self.add_module("c2_r", ExpandSqueezeRepConv(m1, m2, rep_channels, bias=b2))
        self.add_module("c3_r", ExpandSqueezeRepConv(m2, in_channels, rep_channels, bias=b3))


class RLFNRep(DIPNet):
    """RLFN/DIPNet trunk with :class:`RepRLFB` blocks (training form of DIPNet).

    Arguments as :class:`esr_deploy.zoo.dipnet.DIPNet` (every width and bias flag of the
    deploy model), plus ``rep_channels``, the width of each re-param conv's 3x3 expansion
    (256 in DIPNet's code). The head conv, ``conv_2`` and the upsampler are plain convs, as
    in DIPNet.
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
        rep_channels: int = 256,
        upscale: int = 4,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            feature_channels=feature_channels,
            mid_channels=mid_channels,
            esa_channels=esa_channels,
            head_bias=head_bias,
            block_conv_bias=block_conv_bias,
            esa_bias=esa_bias,
            lr_conv_bias=lr_conv_bias,
            upsampler_bias=upsampler_bias,
            upscale=upscale,
        )
        mids = [list(m) for m in (mid_channels or [[38, 38]] * 4)]
        esas = list(esa_channels) if esa_channels is not None else [16] * len(mids)
        flags = list(block_conv_bias) if block_conv_bias is not None else [False] * 4
        self.arch_args: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "feature_channels": feature_channels,
            "mid_channels": mids,
            "esa_channels": esas,
            "head_bias": head_bias,
            "block_conv_bias": flags,
            "esa_bias": esa_bias,
            "lr_conv_bias": lr_conv_bias,
            "upsampler_bias": upsampler_bias,
            "rep_channels": rep_channels,
            "upscale": upscale,
        }
        # DIPNet built plain RLFBs; replace them (same names block_1..block_k) by RepRLFBs.
        for i, (m, esa) in enumerate(zip(mids, esas, strict=True)):
            block = RepRLFB(
                feature_channels, m, feature_channels, esa, rep_channels, flags, esa_bias
            )
            self.add_module(f"block_{i + 1}", block)
