"""A plain SR network built of Diverse Branch Blocks, training form (DBB: Ding, Zhang, Han and
Ding, "Diverse Branch Block: Building a Convolution as an Inception-like Unit", CVPR 2021).

Not a published SR model: the zoo's test bed for DBB's sequential branches (1x1 -> BN ->
bias-pad -> k x k and 1x1 -> BN -> bias-pad -> average pooling -> BN). Layout::

    h   = relu(head(x))                       # DBB colors -> C
    h   = relu(block_i(h))  for i = 1..m      # DBB C -> C
    out = PixelShuffle(s)(tail(h))            # DBB C -> colors * s^2, no activation

Each DBB folds into one k x k conv with bias (see
:class:`esr_deploy.zoo.reparam_blocks.DiverseBranchBlock`, whose ``BNAndPad`` layers pad
with the BN shift exactly as DBB does); the deploy model is ``m + 2`` plain k x k convs with
ReLU between them. Input and output in 0..1.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from esr_deploy.errors import RecipeError
from esr_deploy.zoo.reparam_blocks import BlockChainSR, DiverseBranchBlock

__all__ = ["DBBSR"]


class DBBSR(BlockChainSR):
    """DBB-style SR network (training form); x4 default: 8 blocks of 32 channels, 3x3.

    Args:
        in_channels: input colour channels.
        out_channels: output colour channels.
        feature_channels: width ``C`` of the body.
        num_blocks: body blocks ``m`` (``body.0`` .. ``body.{m-1}``).
        kernel_size: odd kernel size ``k`` of every DBB (and of the folded convs).
        upscale: SR factor ``s``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        feature_channels: int = 32,
        num_blocks: int = 8,
        kernel_size: int = 3,
        upscale: int = 4,
    ) -> None:
        if kernel_size % 2 != 1:
            raise RecipeError(
                f"DBBSR arch_args are inconsistent — kernel_size must be odd, got {kernel_size} "
                "— fix the recipe's [arch_args]"
            )
        super().__init__(
            partial(DiverseBranchBlock, kernel_size=kernel_size),
            in_channels,
            out_channels,
            feature_channels,
            num_blocks,
            upscale,
        )
        self.arch_args: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "feature_channels": feature_channels,
            "num_blocks": num_blocks,
            "kernel_size": kernel_size,
            "upscale": upscale,
        }
