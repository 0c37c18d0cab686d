"""``fold-bn``: BatchNorm (eval) merged into a neighbouring convolution.

In eval mode ``BN(y) = γ (y - μ) / sqrt(σ² + ε) + β`` is a per-channel affine map
``s·y + t``. Cases, in order:

1. **after a conv** ``BN(W*x + b)`` = ``(s·W)*x + (s·b + t)``: always exact;
2. **before a conv** ``W*pad(BN(x))``: exact only where the conv does not zero-pad
   (a 1×1 conv, or padding that writes BN's shift ``t`` as DBB's BNAndPad does); otherwise the
   border drifts (measured and folded only with ``--accept-border-drift``);
3. **a lone BN** (between nonlinearities) becomes a depthwise 1×1 conv ``s·x + t``, so no
   BatchNormalization node reaches the ONNX graph.

The kernels are computed by the shared engine (:mod:`esr_deploy.passes.region_fold`) in
float64; this module only chooses the regions.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from esr_deploy.passes.affine_ops import Analysis, is_batchnorm, is_conv
from esr_deploy.passes.linear_region import Region, region_from_nodes, single_consumer
from esr_deploy.passes.region_fold import Fold
from esr_deploy.passes.region_pass import RegionFoldingPass


class FoldBatchNorm(RegionFoldingPass):
    name = "fold-bn"
    prefix = "bnfold"

    def candidates(self, analysis: Analysis) -> list[list[Region]]:
        gm = analysis.gm
        groups: list[list[Region]] = []
        for node in gm.graph.nodes:
            if not analysis.is_affine(node) or not is_batchnorm(gm, node):
                continue
            data = analysis.data_inputs(node)
            producer = data[0] if len(data) == 1 else None
            options: list[set[fx.Node]] = []
            if (
                producer is not None
                and analysis.is_affine(producer)
                and is_conv(gm, producer)
                and len(producer.users) == 1
            ):
                options.append({producer, node})
            consumer, padding = single_consumer(analysis, node)
            if consumer is not None and is_conv(gm, consumer):
                options.append({node, *padding, consumer})
            options.append({node})
            # in order of preference; the driver folds the first that is exact (or accepted)
            # and skips the others, which overlap it
            for nodes in options:
                region = region_from_nodes(analysis, nodes)
                if region is not None:
                    groups.append([region])
        return groups

    def worth_folding(self, gm: fx.GraphModule, analysis: Analysis, folds: Sequence[Fold]) -> bool:
        return True  # removing the BN is the point; the conv's cost is unchanged
