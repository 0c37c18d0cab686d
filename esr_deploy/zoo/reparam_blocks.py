"""Training-form (multi-branch, re-parameterizable) building blocks shared by the zoo.

Every block here is, in eval mode, an affine shift-invariant map of its input: a sum of
branches made of stride-1 convs, BatchNorm with running statistics, fixed depthwise filters,
stride-1 average pooling and identities. Such a block equals **one** plain ``k x k`` conv
with "same" zero padding -- *also at the image borders* -- provided every intermediate tensor
that is spatially padded is padded with the value that tensor takes where the block's input
is zero. That value is the bias of the layer that produced it (or, after a BatchNorm, the
BN's shift ``beta - mean * gamma / sqrt(var + eps)``). The blocks pad that way
(:func:`pad_with_bias`), exactly as ECBSR, FMEN's RRRB and DBB's ``BNAndPadLayer`` do;
zero padding of a biased intermediate would make the interior foldable but the border rows
and columns not.

The blocks never fold themselves (no ``rep_params`` / ``switch_to_deploy``): esr-deploy's
generic folding pass does that on the traced graph. All of them trace with
``torch.fx.symbolic_trace`` (bias padding becomes ``F.pad`` followed by ``operator.setitem``
on border slices; BatchNorm stays a ``BatchNorm2d`` call).

Blocks and where their layout comes from:

* :class:`ECB` (edge-oriented convolution block, ECBSR, Zhang et al., ACM MM 2021; checked
  against ``xindongzhang/ECBSR`` ``models/ecb.py``): 3x3 conv + (1x1 -> 3x3) + (1x1 -> Sobel-x)
  + (1x1 -> Sobel-y) + (1x1 -> Laplacian) [+ identity], then the activation.
* :class:`RRRB` (residual-in-residual re-parameterizable block, FMEN, Du et al., CVPRW 2022;
  checked against ``NJU-Jet/FMEN`` ``train_fmen.py``).
* :class:`RepVGGBlock` (Ding et al., CVPR 2021): (3x3 conv + BN) + (1x1 conv + BN)
  [+ BN of the input when in == out].
* :class:`DiverseBranchBlock` (Ding et al., CVPR 2021; checked against
  ``DingXiaoH/DiverseBranchBlock`` ``diversebranchblock.py``) with :class:`BNAndPad` and
  :class:`IdentityBasedConv1x1`.
* :class:`ExpandSqueezeRepConv` (DIPNet's re-parameterized RLFB conv, Yu et al., CVPRW 2023;
  checked against the ``reparam`` method of ``RLFB_Rep_Prune`` in ``xiumu00/DIPNet``
  ``models/team34_EDIPV1.py``): (3x3 expand -> 1x1 squeeze) + 1x1 + identity.

Parameter and buffer names follow the original training code so that training checkpoints of
the originals load strictly where the layouts coincide.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ECB",
    "BNAndPad",
    "Conv1x1Conv3x3",
    "Conv1x1FixedFilter",
    "DiverseBranchBlock",
    "ExpandSqueezeRepConv",
    "IdentityBasedConv1x1",
    "RRRB",
    "RepVGGBlock",
    "bn_shift",
    "conv_bn",
    "pad_with_bias",
]

FilterKind = Literal["sobelx", "sobely", "laplacian"]


def bn_shift(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel output of an eval-mode BatchNorm for a zero input.

    ``BN(0) = beta - running_mean * gamma / sqrt(running_var + eps)`` (``- mean / sqrt(var +
    eps)`` without affine parameters). This is the value to pad a BN output with so that
    "BN, then pad" equals "zero-pad, then BN".
    """
    assert bn.running_mean is not None and bn.running_var is not None
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        return bn.bias - bn.running_mean * bn.weight * inv_std
    return -bn.running_mean * inv_std


def pad_with_bias(t: torch.Tensor, value: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """Pad ``t`` (N x C x H x W) by ``pad`` pixels on every side with the per-channel ``value``.

    Written as ECBSR / FMEN / DBB write it: ``F.pad`` with zeros, then the border rows and
    columns overwritten with ``value`` (C,). If ``t = A(x)`` for an affine map ``A`` with
    ``A(0) = value`` (a 1x1 conv with bias, a BatchNorm, ...), the result equals ``A``
    applied to the zero-padded ``x``: a following valid conv then sees exactly what it
    would see in the single folded conv with zero padding, borders included.
    """
    t = F.pad(t, (pad, pad, pad, pad), "constant", 0.0)
    v = value.view(1, -1, 1, 1)
    t[:, :, 0:pad, :] = v
    t[:, :, -pad:, :] = v
    t[:, :, :, 0:pad] = v
    t[:, :, :, -pad:] = v
    return t


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, padding: int) -> nn.Sequential:
    """``conv (no bias) -> BatchNorm`` as ``nn.Sequential`` with children ``conv`` and ``bn``.

    The RepVGG / DBB building unit; after folding the BN it is a conv with bias.
    """
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


def _conv_weight_bias(
    in_channels: int, out_channels: int, kernel_size: int
) -> tuple[nn.Parameter, nn.Parameter]:
    """A weight and a bias initialised as ``nn.Conv2d`` initialises them."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size)
    assert conv.bias is not None
    return nn.Parameter(conv.weight.detach()), nn.Parameter(conv.bias.detach())


# --- ECB (ECBSR) -----------------------------------------------------------------------------


class Conv1x1Conv3x3(nn.Module):
    """ECB branch ``1x1 (in -> mid) -> 3x3 valid (mid -> out)`` with a bias-padded middle.

    ``y0 = conv1x1(x; k0, b0)`` is padded by one pixel with ``b0`` (what ``conv1x1`` outputs
    for a zero input), so ``conv3x3_valid(pad_b0(y0)) == conv3x3_valid(conv1x1(pad_0(x)))``:
    the branch is exactly the 3x3 conv ``k1 o k0`` with zero padding and bias
    ``b1 + sum(k1 * b0)``. Parameters ``k0, b0, k1, b1`` as in ECBSR's ``SeqConv3x3``.
    """

    def __init__(self, in_channels: int, out_channels: int, depth_multiplier: float) -> None:
        super().__init__()
        self.mid_channels = int(out_channels * depth_multiplier)
        self.k0, self.b0 = _conv_weight_bias(in_channels, self.mid_channels, 1)
        self.k1, self.b1 = _conv_weight_bias(self.mid_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv3x3_valid(pad_with_bias(conv1x1(x), b0))``."""
        y0 = F.conv2d(x, self.k0, self.b0)
        y0 = pad_with_bias(y0, self.b0)
        return F.conv2d(y0, self.k1, self.b1)


def _fixed_filter(kind: FilterKind) -> torch.Tensor:
    """The 3x3 Sobel-x, Sobel-y or Laplacian mask of ECBSR (as a 3 x 3 tensor)."""
    if kind == "sobelx":
        rows = [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]
    elif kind == "sobely":
        rows = [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]
    elif kind == "laplacian":
        rows = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]
    else:
        raise ValueError(f"unknown fixed filter {kind!r}")
    return torch.tensor(rows)


class Conv1x1FixedFilter(nn.Module):
    """ECB branch ``1x1 (in -> out) -> depthwise fixed 3x3 filter scaled per channel``.

    The depthwise kernel is ``scale * mask`` with ``mask`` a fixed Sobel-x / Sobel-y /
    Laplacian filter (a buffer, one copy per channel) and ``scale`` (out, 1, 1, 1) learnable,
    plus a learnable ``bias``. The 1x1 output is padded with its bias ``b0`` (see
    :class:`Conv1x1Conv3x3`), so the branch is exactly one 3x3 conv with zero padding.
    Names ``k0, b0, scale, bias, mask`` as in ECBSR's ``SeqConv3x3``.
    """

    mask: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, kind: FilterKind) -> None:
        super().__init__()
        self.kind = kind
        self.out_channels = out_channels
        self.k0, self.b0 = _conv_weight_bias(in_channels, out_channels, 1)
        self.scale = nn.Parameter(torch.randn(out_channels, 1, 1, 1) * 1e-3)
        self.bias = nn.Parameter(torch.randn(out_channels) * 1e-3)
        mask = _fixed_filter(kind).expand(out_channels, 1, 3, 3).clone()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``depthwise_conv3x3_valid(pad_with_bias(conv1x1(x), b0), scale * mask) + bias``."""
        y0 = F.conv2d(x, self.k0, self.b0)
        y0 = pad_with_bias(y0, self.b0)
        return F.conv2d(y0, self.scale * self.mask, self.bias, groups=self.out_channels)


class ECB(nn.Module):
    """Edge-oriented Convolution Block (ECBSR), training form.

    ``y = act(conv3x3(x) + conv1x1_3x3(x) + conv1x1_sbx(x) + conv1x1_sby(x) + conv1x1_lpl(x)
    [+ x])``:

    * ``conv3x3``: a plain 3x3 conv with zero padding;
    * ``conv1x1_3x3``: 1x1 expand to ``depth_multiplier * out`` channels, then a 3x3 conv
      (:class:`Conv1x1Conv3x3`);
    * ``conv1x1_sbx`` / ``conv1x1_sby`` / ``conv1x1_lpl``: 1x1 conv, then a scaled depthwise
      Sobel-x / Sobel-y / Laplacian filter (:class:`Conv1x1FixedFilter`);
    * the identity, only when ``with_idt`` and ``in_channels == out_channels`` (ECB's rule).

    Every branch is exactly a 3x3 "same" conv (the 1x1 outputs are bias-padded), so the sum
    is one 3x3 conv followed by the activation. ``act_type``: ``"prelu"`` (one slope per
    channel, parameters ``act.weight``), ``"relu"`` or ``"linear"`` (none).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth_multiplier: float = 2.0,
        act_type: str = "prelu",
        with_idt: bool = False,
    ) -> None:
        super().__init__()
        self.act_type = act_type
        self.with_idt = bool(with_idt) and in_channels == out_channels
        self.conv3x3 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv1x1_3x3 = Conv1x1Conv3x3(in_channels, out_channels, depth_multiplier)
        self.conv1x1_sbx = Conv1x1FixedFilter(in_channels, out_channels, "sobelx")
        self.conv1x1_sby = Conv1x1FixedFilter(in_channels, out_channels, "sobely")
        self.conv1x1_lpl = Conv1x1FixedFilter(in_channels, out_channels, "laplacian")
        if act_type == "prelu":
            self.act: nn.Module | None = nn.PReLU(num_parameters=out_channels)
        elif act_type == "relu":
            self.act = nn.ReLU()
        elif act_type == "linear":
            self.act = None
        else:
            raise ValueError(f"ECB act_type must be prelu, relu or linear, got {act_type!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the five (six with identity) 3x3-equivalent branches, then the activation."""
        y = (
            self.conv3x3(x)
            + self.conv1x1_3x3(x)
            + self.conv1x1_sbx(x)
            + self.conv1x1_sby(x)
            + self.conv1x1_lpl(x)
        )
        if self.with_idt:
            y = y + x
        if self.act is not None:
            y = self.act(y)
        return y


# --- RRRB (FMEN) -----------------------------------------------------------------------------


class RRRB(nn.Module):
    """Residual-in-residual re-parameterizable block (FMEN), training form.

    ``e = expand_conv(x)`` (1x1, C -> ratio*C, bias ``b0``);
    ``out = reduce_conv(fea_conv(pad_with_bias(e, b0)) + e) + x`` with ``fea_conv`` a *valid*
    3x3 conv (ratio*C -> ratio*C) and ``reduce_conv`` 1x1 (ratio*C -> C).

    Padding ``e`` with ``b0`` makes ``fea_conv`` see ``expand_conv`` of the zero-padded input,
    so the whole block is exactly one 3x3 conv C -> C with zero padding (the inner identity
    adds ``1`` at the kernel centre of the expanded space, the outer one at the centre of the
    result). Names ``expand_conv, fea_conv, reduce_conv`` as in FMEN's ``train_fmen.py``.
    """

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.expand_conv = nn.Conv2d(channels, ratio * channels, 1)
        self.fea_conv = nn.Conv2d(ratio * channels, ratio * channels, 3, padding=0)
        self.reduce_conv = nn.Conv2d(ratio * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand, bias-padded valid 3x3 plus identity, reduce, plus identity."""
        out = self.expand_conv(x)
        out_identity = out
        assert self.expand_conv.bias is not None
        out = pad_with_bias(out, self.expand_conv.bias)
        out = self.fea_conv(out) + out_identity
        return self.reduce_conv(out) + x


# --- RepVGG ----------------------------------------------------------------------------------


class RepVGGBlock(nn.Module):
    """RepVGG block (Ding et al., CVPR 2021), training form, without its nonlinearity.

    ``y = rbr_dense(x) + rbr_1x1(x) [+ rbr_identity(x)]`` with ``rbr_dense`` = 3x3 conv (no
    bias, zero padding 1) + BN, ``rbr_1x1`` = 1x1 conv (no bias) + BN, and ``rbr_identity``
    = BN of the input, present only when ``in_channels == out_channels``. No intermediate is
    padded after a bias (the BNs follow their convs and the 1x1 needs no padding), so zero
    padding is already exact: the block is one 3x3 conv with bias.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.rbr_dense = conv_bn(in_channels, out_channels, 3, padding=1)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, padding=0)
        self.rbr_identity: nn.BatchNorm2d | None = (
            nn.BatchNorm2d(in_channels) if in_channels == out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the 3x3+BN, 1x1+BN and (when in == out) BN-identity branches."""
        y = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            y = y + self.rbr_identity(x)
        return y


# --- DBB -------------------------------------------------------------------------------------


class BNAndPad(nn.Module):
    """BatchNorm, then pad by ``pad_pixels`` with the BN's shift (DBB's ``BNAndPadLayer``).

    The shift ``beta - mean * gamma / sqrt(var + eps)`` is what the BN outputs for a zero
    input, so "BN, then bias-pad" equals "zero-pad, then BN" and a following valid k x k op
    (conv or average pooling) folds into a zero-padded one. The BN is the child ``bn``
    (parameters ``bn.weight`` ... as in DBB).
    """

    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``pad_with_bias(bn(x), bn_shift(bn), pad_pixels)``."""
        out = self.bn(x)
        if self.pad_pixels > 0:
            out = pad_with_bias(out, bn_shift(self.bn), self.pad_pixels)
        return out


class IdentityBasedConv1x1(nn.Module):
    """DBB's 1x1 conv (no bias) whose effective kernel is ``weight + I``.

    ``I`` (buffer ``id_tensor``, not saved in the state_dict, as in DBB where it is a plain
    attribute) maps output channel ``i`` to input channel ``i % (channels // groups)``.
    The weight starts at zero, so the conv starts as the identity.
    """

    id_tensor: torch.Tensor

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__()
        assert channels % groups == 0
        input_dim = channels // groups
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, input_dim, 1, 1))
        id_value = torch.zeros(channels, input_dim, 1, 1)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1.0
        self.register_buffer("id_tensor", id_value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv1x1(x, weight + id_tensor)``."""
        return F.conv2d(x, self.weight + self.id_tensor, None, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    """Diverse Branch Block (Ding et al., CVPR 2021), training form, groups = 1, stride 1.

    ``y = dbb_origin(x) + dbb_1x1(x) + dbb_avg(x) + dbb_1x1_kxk(x)`` where, with
    ``p = k // 2``:

    * ``dbb_origin``: k x k conv (no bias, zero padding p) + BN;
    * ``dbb_1x1``: 1x1 conv (no bias) + BN;
    * ``dbb_avg``: 1x1 conv (no bias) -> :class:`BNAndPad` (p) -> k x k average pooling,
      stride 1, no padding -> BN (``avgbn``);
    * ``dbb_1x1_kxk``: 1x1 (an :class:`IdentityBasedConv1x1` ``idconv1`` when the internal
      width equals ``in_channels``, DBB's default, else a plain conv ``conv1``) ->
      :class:`BNAndPad` (p) -> k x k conv, no bias, no padding (``conv2``) -> BN (``bn2``).

    The two valid k x k ops read BN outputs padded with the BN's shift, i.e. the BN of a
    zero-padded tensor, and the 1x1 convs before them have no bias, so each branch is exactly
    a k x k "same" conv: the block folds into one k x k conv with bias, borders included.
    The nonlinearity is applied by the caller.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        internal_channels_1x1_kxk: int | None = None,
    ) -> None:
        super().__init__()
        k, p = kernel_size, kernel_size // 2
        self.dbb_origin = conv_bn(in_channels, out_channels, k, padding=p)
        self.dbb_1x1 = conv_bn(in_channels, out_channels, 1, padding=0)
        self.dbb_avg = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                bn=BNAndPad(p, out_channels),
                avg=nn.AvgPool2d(kernel_size=k, stride=1, padding=0),
                avgbn=nn.BatchNorm2d(out_channels),
            )
        )
        internal = in_channels if internal_channels_1x1_kxk is None else internal_channels_1x1_kxk
        first: nn.Module
        if internal == in_channels:
            first_name, first = "idconv1", IdentityBasedConv1x1(in_channels)
        else:
            first_name, first = "conv1", nn.Conv2d(in_channels, internal, 1, bias=False)
        self.dbb_1x1_kxk = nn.Sequential(
            OrderedDict(
                [
                    (first_name, first),
                    ("bn1", BNAndPad(p, internal)),
                    ("conv2", nn.Conv2d(internal, out_channels, k, padding=0, bias=False)),
                    ("bn2", nn.BatchNorm2d(out_channels)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the four k x k-equivalent branches."""
        return self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)


# --- DIPNet's re-parameterized conv ----------------------------------------------------------


class ExpandSqueezeRepConv(nn.Module):
    """DIPNet's re-parameterizable replacement of an RLFB 3x3 conv (in -> out).

    ``y = conv1x1_squeeze(conv3x3_expand(x)) + conv1x1(x) + identity(x)``:

    * ``conv3x3_expand``: 3x3 conv in -> ``rep_channels`` (zero padding 1);
    * ``conv1x1_squeeze``: 1x1 conv ``rep_channels`` -> out;
    * ``conv1x1``: a parallel 1x1 conv in -> out;
    * identity: output channel ``i`` gets input channel ``i % in`` (DIPNet adds 1 at
      ``kernel[i, i % in, 1, 1]``); for ``in == out`` it is ``+ x``, otherwise a fixed
      one-hot 1x1 conv (buffer ``identity_kernel``, not saved).

    The expand conv pads the block's *input* and the squeeze conv is 1x1, so no biased
    intermediate is ever padded: zero padding is exact and the block is one 3x3 conv. With
    ``bias=False`` (DIPNet's setting) no sub-conv has a bias and neither does the folded
    conv; with ``bias=True`` all three convs have one.
    """

    identity_kernel: torch.Tensor

    def __init__(
        self, in_channels: int, out_channels: int, rep_channels: int, bias: bool = False
    ) -> None:
        super().__init__()
        self.conv3x3_expand = nn.Conv2d(in_channels, rep_channels, 3, padding=1, bias=bias)
        self.conv1x1_squeeze = nn.Conv2d(rep_channels, out_channels, 1, bias=bias)
        self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.same_width = in_channels == out_channels
        kernel = torch.zeros(out_channels, in_channels, 1, 1)
        for i in range(out_channels):
            kernel[i, i % in_channels, 0, 0] = 1.0
        self.register_buffer("identity_kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand-squeeze branch + parallel 1x1 + (cyclic) identity."""
        y = self.conv1x1_squeeze(self.conv3x3_expand(x)) + self.conv1x1(x)
        if self.same_width:
            return y + x
        return y + F.conv2d(x, self.identity_kernel)


# --- plain chain of re-param blocks ------------------------------------------------------------


class BlockChainSR(nn.Module):
    """``PixelShuffle(s)(tail(relu(block_m(... relu(block_1(relu(head(x))))))))``.

    The plain VGG-style SR layout shared by :class:`esr_deploy.zoo.repvgg_sr.RepVGGSR` and
    :class:`esr_deploy.zoo.dbb_sr.DBBSR`; ``make_block(c_in, c_out)`` builds one block
    (``head``, ``body.i``, ``tail``, no activation after the tail).
    """

    def __init__(
        self,
        make_block: Callable[[int, int], nn.Module],
        in_channels: int,
        out_channels: int,
        feature_channels: int,
        num_blocks: int,
        upscale: int,
    ) -> None:
        super().__init__()
        c = feature_channels
        self.head = make_block(in_channels, c)
        self.body = nn.ModuleList([make_block(c, c) for _ in range(num_blocks)])
        self.tail = make_block(c, out_channels * upscale**2)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in 0..1 -> N x C x sH x sW (not clamped)."""
        h = F.relu(self.head(x))
        for block in self.body:
            h = F.relu(block(h))
        return self.upsampler(self.tail(h))
