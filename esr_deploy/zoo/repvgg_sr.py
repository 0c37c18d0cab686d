"""A RepVGG-style plain SR network, training form (RepVGG block: Ding et al., CVPR 2021).

Not a published SR model: the zoo's VGG-style test bed for BatchNorm folding in parallel
branches (in the spirit of RepSR, Wang et al., ACM MM 2022, which trains VGG-style SR nets
with BN). Layout::

    h   = relu(head(x))                       # RepVGGBlock colors -> C (no identity: 3 != C)
    h   = relu(block_i(h))  for i = 1..m      # RepVGGBlock C -> C (3x3+BN, 1x1+BN, BN identity)
    out = PixelShuffle(s)(tail(h))            # RepVGGBlock C -> colors * s^2, no activation

Every block folds into one 3x3 conv with bias (see
:class:`esr_deploy.zoo.reparam_blocks.RepVGGBlock`); the deploy model is ``m + 2`` plain
3x3 convs with ReLU between them. Input and output in 0..1.
"""

from __future__ import annotations

from typing import Any

from esr_deploy.zoo.reparam_blocks import BlockChainSR, RepVGGBlock

__all__ = ["RepVGGSR"]


class RepVGGSR(BlockChainSR):
    """RepVGG-style SR network (training form); x4 default: 8 blocks of 32 channels.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width ``C`` of the body.
        num_blocks: body blocks ``m`` (``body.0`` .. ``body.{m-1}``).
        upscale: SR factor ``s``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 32,
        num_blocks: int = 8,
        upscale: int = 4,
    ) -> None:
        super().__init__(
            RepVGGBlock, in_channels, out_channels, feature_channels, num_blocks, upscale
        )
        self.arch_args: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "feature_channels": feature_channels,
            "num_blocks": num_blocks,
            "upscale": upscale,
        }
