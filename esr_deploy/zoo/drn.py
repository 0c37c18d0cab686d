"""DRN, primal network (Guo et al., "Closed-loop Matters: Dual Regression Networks for Single
Image Super-Resolution", CVPR 2020), with every per-layer width a constructor argument so the
channel-pruned models of Dual Regression Compression (DRC: Guo et al., "Towards Lightweight
Super-Resolution with Dual Regression Learning", 2022) are described by a recipe alone.

Layout checked against ``guoyongcs/DRN`` (``model/drn.py``, ``model/common.py``,
``trainer.py``) and against DRC's compressed ``SDRN`` (its per-layer channel
configuration); module and parameter names are those of the official code, so a DRN or
DRC checkpoint (``DRNS4x.pt``, ``DRNS_4x_Prune_30.pt``, ...) loads strictly once the recipe
states its widths. With ``L = log2(upscale)`` levels (``L = 2`` for x4)::

    x  = bicubic(x, scale_factor=upscale)          # LR -> HR size (align_corners=False)
    x  = head(sub_mean(x))                         # MeanShift 1x1, then 3x3 3 -> c_0
    for p in 0..L-1:                               # down path, at HR / 2**p
        skip[p] = x
        x = down[p](x)                             # 3x3 s2 (no bias) -> LReLU(0.2) -> 3x3 (no bias)
    for i in 0..L-1:                               # up path, at LR * 2**i
        x = up_blocks[i](x)                        # RCABs -> conv3x3 + PixelShuffle(2) -> 1x1
        x = cat(x, skip[L-1-i])
    return add_mean(tail[L](x))                    # 3x3 -> out, MeanShift 1x1

with ``RCAB(x) = x + CA(conv3x3(relu(conv3x3(x))))`` and channel attention
``CA(y) = y * sigmoid(conv1x1(relu(conv1x1(mean_hw(y)))))`` (RCAN's block).

What exists at inference
------------------------
* The *dual* (regression) models ``HR -> LR`` are separate networks, saved in a separate
  checkpoint (``dual_model_*.pt``) and used only in the training loss; they are not here.
* During training DRN returns ``L + 1`` images, one per level (``tail[0]`` at LR size,
  ``tail[p]`` at ``LR * 2**p``), for deep supervision; the official test loop keeps only
  the last one (``sr[-1]``). :meth:`DRN.forward` returns that HR image only. The low-level
  tails ``tail.0 .. tail.{L-1}`` are kept as (unused) parameters when
  ``intermediate_tails`` is set, because the official checkpoints contain them; the graph
  passes and the ONNX export drop them, since the output does not depend on them.
* MeanShift is a learnable-looking 1x1 conv in the official code (its ``requires_grad =
  False`` is set on the module, not on its parameters), so ``sub_mean`` / ``add_mean``
  are stored in the checkpoints and are loaded, not recomputed.

Accepted sizes
--------------
Every stride-2 conv (kernel 3, padding 1) maps a side ``n`` to ``ceil(n / 2)`` and every
pixel shuffle doubles it. The input is first resized to exactly ``upscale * h`` by
``upscale * w``, which is divisible by ``2**L = upscale``, so the down path reaches
exactly ``h x w`` and the up path returns to ``upscale * h`` with every concat matching:
**every LR size ``h, w >= 1`` is accepted** (DRN needs HR sides divisible by ``2**L``;
the bicubic pre-upsampling guarantees it). Input and output in 0..255 (``rgb_range``).

Widths
------
``c_0 = head_channels``; ``c_{p+1} = down_out_channels[p]``. The features entering up
level ``i`` have ``F_0 = c_L`` and ``F_i = up_out_channels[i-1] + c_{L-i}`` channels; the
final tail sees ``up_out_channels[L-1] + c_0``. Each RCAB of level ``i`` maps
``F_i -> rcab_channels[i][k] -> F_i`` (DRC prunes exactly this inner width), its channel
attention squeezes ``F_i -> ca_channels[i] -> F_i``; the upsampler conv maps
``F_i -> 4 * upsampler_channels[i]`` (pixel shuffle leaves ``upsampler_channels[i]``) and
a 1x1 conv maps that to ``up_out_channels[i]``. The defaults are DRN-S x4
(``n_feats = 16``, 30 RCABs per level: 4.8 M parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esr_deploy.errors import RecipeError

__all__ = ["DRN", "RCAB", "ChannelAttention", "DownBlock", "MeanShift"]

#: DIV2K RGB mean used by DRN (and EDSR/RCAN), in units of ``rgb_range``.
DIV2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)


def _conv(
    cin: int, cout: int, kernel_size: int, *, bias: bool = True, stride: int = 1
) -> nn.Conv2d:
    """A conv with "same" zero padding ``kernel_size // 2`` (DRN's ``default_conv``)."""
    return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


class MeanShift(nn.Conv2d):
    """DRN's MeanShift: a 1x1 conv ``3 -> 3`` with weight ``I`` and bias ``sign * range * mean``.

    ``sign = -1`` (``sub_mean``) subtracts the dataset mean, ``sign = +1`` (``add_mean``) adds
    it back. It is an ordinary conv with parameters, as in the official code (whose
    checkpoints store them); :meth:`reset_shift` restores the fixed values.
    """

    def __init__(self, rgb_range: float, rgb_mean: Sequence[float], sign: int) -> None:
        super().__init__(3, 3, kernel_size=1)
        self.rgb_range = float(rgb_range)
        self.rgb_mean = tuple(float(m) for m in rgb_mean)
        self.sign = sign
        self.reset_shift()

    def reset_shift(self) -> None:
        """Set weight to the identity and bias to ``sign * rgb_range * rgb_mean`` (std 1)."""
        assert self.bias is not None  # built with a bias
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(self.sign * self.rgb_range * torch.tensor(self.rgb_mean))


class DownBlock(nn.Module):
    """One 2x down step of DRN's primal down path (``common.DownBlock`` with scale 2).

    ``dual_module = [Sequential(conv3x3 stride 2, LeakyReLU), conv3x3]``, both without bias:
    ``in -> mid`` at half resolution, then ``mid -> out``. ``mid`` is the width DRC prunes.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, negative_slope: float
    ) -> None:
        super().__init__()
        self.dual_module = nn.Sequential(
            nn.Sequential(
                _conv(in_channels, mid_channels, 3, bias=False, stride=2),
                nn.LeakyReLU(negative_slope),
            ),
            _conv(mid_channels, out_channels, 3, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x in x H x W -> N x out x ceil(H/2) x ceil(W/2)."""
        return self.dual_module(x)


class ChannelAttention(nn.Module):
    """RCAN's CALayer: ``y * sigmoid(conv_du(mean over H, W of y))``.

    ``conv_du = [conv1x1 c -> r, ReLU, conv1x1 r -> c, Sigmoid]`` with biases (names as in
    the official ``conv_du.0`` / ``conv_du.2``). The global average is written as a mean
    over H and W (no module, nothing shape-dependent), which exports as ``ReduceMean``.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            _conv(channels, squeeze_channels, 1),
            nn.ReLU(),
            _conv(squeeze_channels, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of ``x`` by a gate in (0, 1)."""
        return x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))


class RCAB(nn.Module):
    """Residual channel attention block: ``x + CA(conv3x3(relu(conv3x3(x))))``.

    ``body = [conv c -> mid, ReLU, conv mid -> c, CA(c, squeeze)]`` (parameter names
    ``body.0``, ``body.2``, ``body.3.conv_du.{0,2}`` as in the official checkpoints).
    ``mid`` is the per-block width DRC's channel search prunes (``pruned_feats``).
    """

    def __init__(self, channels: int, mid_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(channels, mid_channels, 3),
            nn.ReLU(),
            _conv(mid_channels, channels, 3),
            ChannelAttention(channels, squeeze_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block; shape preserved."""
        return self.body(x) + x


def _positive_ints(value: Any, what: str, length: int | None = None) -> list[int]:
    """``value`` as a list of positive ints (of ``length`` items when given), else RecipeError."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        or (length is not None and len(value) != length)
    ):
        count = f"{length} " if length is not None else ""
        raise RecipeError(
            f"DRN arch_args are inconsistent — {what} must be a list of {count}positive "
            f"integers, got {value!r} — fix the recipe's [arch_args]"
        )
    return [int(v) for v in value]


@dataclass(frozen=True)
class _Widths:
    """A DRN's layer widths: the arch_args given, DRN's template for those left out (level
    widths ``n_feats * 2**p``, 30 RCABs per level, CA reduction 16), validated; and the
    widths that follow from them: ``level_in[i]`` (``F_i``, the up level's input: the
    previous level's output concatenated with the skip at its resolution) and ``tail_in``."""

    levels: int
    down: list[int]
    down_out: list[int]
    rcabs: list[list[int]]
    ca: list[int]
    ups: list[int]
    up_out: list[int]
    level_in: list[int]
    tail_in: int

    @classmethod
    def resolve(
        cls,
        head_channels: int,
        down_channels: list[int] | None,
        down_out_channels: list[int] | None,
        rcab_channels: list[list[int]] | None,
        ca_channels: list[int] | None,
        upsampler_channels: list[int] | None,
        up_out_channels: list[int] | None,
        upscale: int,
    ) -> _Widths:
        """Raises RecipeError naming the first inconsistent argument."""
        if not isinstance(upscale, int) or upscale < 2 or upscale & (upscale - 1):
            raise RecipeError(
                f"DRN arch_args are inconsistent — upscale must be a power of two >= 2 (one "
                f"2x level each), got {upscale!r} — fix the recipe's [arch_args]"
            )
        levels = int(math.log2(upscale))
        nf = head_channels
        if down_channels is None:
            down_channels = [nf * 2**p for p in range(levels)]
        if down_out_channels is None:
            down_out_channels = [nf * 2 ** (p + 1) for p in range(levels)]
        if rcab_channels is None:
            rcab_channels = [[nf * 2**levels] * 30 for _ in range(levels)]
        if upsampler_channels is None:
            upsampler_channels = [nf * 2**levels] * levels
        if up_out_channels is None:
            up_out_channels = [nf * 2 ** (levels - 1 - i) for i in range(levels)]
        _positive_ints([head_channels], "head_channels")
        down = _positive_ints(down_channels, "down_channels", levels)
        down_out = _positive_ints(down_out_channels, "down_out_channels", levels)
        ups = _positive_ints(upsampler_channels, "upsampler_channels", levels)
        up_out = _positive_ints(up_out_channels, "up_out_channels", levels)
        if (
            not isinstance(rcab_channels, Sequence)
            or len(rcab_channels) != levels
            or not all(isinstance(level, Sequence) and len(level) > 0 for level in rcab_channels)
        ):
            raise RecipeError(
                f"DRN arch_args are inconsistent — rcab_channels must hold {levels} non-empty "
                f"lists (one inner width per RCAB, one list per level), got {rcab_channels!r} — "
                "fix the recipe's [arch_args]"
            )
        rcabs = [_positive_ints(level, "each rcab_channels list") for level in rcab_channels]
        skips = [head_channels, *down_out[:-1]]  # skip[p]: width at HR / 2**p
        level_in = [down_out[-1]] + [up_out[i - 1] + skips[levels - i] for i in range(1, levels)]
        if ca_channels is None:
            ca_channels = [max(1, f // 16) for f in level_in]
        ca = _positive_ints(ca_channels, "ca_channels", levels)
        tail_in = up_out[-1] + skips[0]
        return cls(levels, down, down_out, rcabs, ca, ups, up_out, level_in, tail_in)


class DRN(nn.Module):
    """DRN primal network for ``upscale = 2**L`` SR; see the module docstring for the layout.

    Args:
        in_channels: input colour channels (3: MeanShift is RGB).
        out_channels: output colour channels (3).
        head_channels: output width of ``head`` (``c_0``; DRN-S: ``n_feats = 16``).
        down_channels: per down block, the width after its stride-2 conv (DRN-S x4:
            ``[16, 32]``; pruned by DRC).
        down_out_channels: per down block, its output width (``c_{p+1}``; DRN-S x4:
            ``[32, 64]``).
        rcab_channels: per up level, one inner width per RCAB (DRN-S x4: 30 x 64 per level;
            pruned by DRC). The number of RCABs of a level is the length of its list.
        ca_channels: per up level, the squeeze width of its RCABs' channel attention
            (DRN: ``F_i // 16``).
        upsampler_channels: per up level, the width after the pixel shuffle (the 3x3 conv
            emits four times as many; DRN-S x4: ``[64, 64]``; pruned by DRC).
        up_out_channels: per up level, the output width of its 1x1 conv (DRN-S x4:
            ``[32, 16]``).
        intermediate_tails: keep the per-level output convs ``tail.0 .. tail.{L-1}`` of
            training (present in the official checkpoints, unused by :meth:`forward`).
        negative_slope: LeakyReLU slope of the down blocks (0.2).
        rgb_range: data range of input and output (255).
        rgb_mean: RGB mean of MeanShift, in units of ``rgb_range`` (DIV2K's).
        upscale: SR factor, a power of two >= 2.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        head_channels: int = 16,
        down_channels: list[int] | None = None,
        down_out_channels: list[int] | None = None,
        rcab_channels: list[list[int]] | None = None,
        ca_channels: list[int] | None = None,
        upsampler_channels: list[int] | None = None,
        up_out_channels: list[int] | None = None,
        intermediate_tails: bool = True,
        negative_slope: float = 0.2,
        rgb_range: float = 255.0,
        rgb_mean: list[float] | None = None,
        upscale: int = 4,
    ) -> None:
        super().__init__()
        w = _Widths.resolve(
            head_channels,
            down_channels,
            down_out_channels,
            rcab_channels,
            ca_channels,
            upsampler_channels,
            up_out_channels,
            upscale,
        )
        rgb_mean = list(DIV2K_RGB_MEAN) if rgb_mean is None else rgb_mean
        if len(rgb_mean) != 3:
            raise RecipeError(
                f"DRN arch_args are inconsistent — rgb_mean must hold 3 values (RGB), got "
                f"{rgb_mean!r} — fix the recipe's [arch_args]"
            )
        levels, down, down_out, rcabs = w.levels, w.down, w.down_out, w.rcabs
        ca, ups, up_out, level_in, tail_in = w.ca, w.ups, w.up_out, w.level_in, w.tail_in
        self.arch_args: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "head_channels": head_channels,
            "down_channels": down,
            "down_out_channels": down_out,
            "rcab_channels": rcabs,
            "ca_channels": ca,
            "upsampler_channels": ups,
            "up_out_channels": up_out,
            "intermediate_tails": intermediate_tails,
            "negative_slope": negative_slope,
            "rgb_range": rgb_range,
            "rgb_mean": [float(m) for m in rgb_mean],
            "upscale": upscale,
        }
        self.upscale = upscale
        self.levels = levels
        #: Input width of each up level (``F_i``) and of the final tail, for inspection.
        self.level_channels: tuple[int, ...] = tuple(level_in)
        self.tail_channels = tail_in

        self.sub_mean = MeanShift(rgb_range, rgb_mean, -1)
        self.head = _conv(in_channels, head_channels, 3)
        self.down = nn.ModuleList(
            DownBlock(cin, mid, cout, negative_slope)
            for cin, mid, cout in zip([head_channels, *down_out[:-1]], down, down_out, strict=True)
        )
        self.up_blocks = nn.ModuleList()
        for i in range(levels):
            f = level_in[i]
            blocks: list[nn.Module] = [RCAB(f, mid, ca[i]) for mid in rcabs[i]]
            upsampler = nn.Sequential(_conv(f, 4 * ups[i], 3), nn.PixelShuffle(2))
            blocks += [upsampler, _conv(ups[i], up_out[i], 1)]
            self.up_blocks.append(nn.Sequential(*blocks))
        # tail[p] maps the features of level p to an image; only tail[L] is used at inference.
        # A ModuleDict keeps the official names tail.<p> whichever tails are kept.
        tails = {str(levels): _conv(tail_in, out_channels, 3)}
        if intermediate_tails:
            for p, f in enumerate(level_in):
                tails[str(p)] = _conv(f, out_channels, 3)
        self.tail = nn.ModuleDict({str(p): tails[str(p)] for p in sorted(map(int, tails))})
        self.add_mean = MeanShift(rgb_range, rgb_mean, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x 3 x h x w in 0..rgb_range -> N x 3 x sh x sw in 0..rgb_range (not clamped)."""
        x = F.interpolate(x, scale_factor=float(self.upscale), mode="bicubic", align_corners=False)
        x = self.head(self.sub_mean(x))
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(x)
        for i, up in enumerate(self.up_blocks):
            x = torch.cat((up(x), skips[self.levels - 1 - i]), dim=1)
        return self.add_mean(self.tail[str(self.levels)](x))
