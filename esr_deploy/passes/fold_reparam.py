"""``fold-reparam``: every maximal linear region becomes one convolution.

Structural re-parameterization without knowing the architecture: the regions are found in
the graph (:mod:`esr_deploy.passes.linear_region`), so ECB, RRRB, RepVGG and DBB blocks, BN
after convs, identity skips and 1×1→k×k→1×1 chains fold alike, in models never seen before.

For each outside tensor ``x`` feeding a component of affine ops, the region ``R_x`` is
replaced by the conv ``W * zero_pad(x) + b`` of its response (module docstring there), when

- it contains more than one conv, or a BatchNorm or other affine work besides one conv
  (a lone conv, or a region without any conv and without BN, is left alone), and
- the folded conv costs no more multiply-accumulates per pixel than the convs it replaces
  (``C_out·C_in/g·K² <= Σ C_out_i·C_in_i/g_i·k_i²``; a 3×3 followed by a 3×3 would become a
  more expensive 5×5 and is left to the narrower passes), and
- it is exact at the border, or ``--accept-border-drift`` was given.

Where a maximal region is rejected, smaller ones are tried: first the blocks of a chain, cut
at residual joins that the next block reads (two RRRBs in a row would fold into a 5×5 that
drifts at the border; each RRRB alone folds exactly), then the regions below every fan-out
point (e.g. a head conv feeding the branches of the first block: the branches fold exactly
even when folding the head into them would not).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from esr_deploy.passes.affine_ops import Analysis, is_batchnorm, is_conv, is_passive
from esr_deploy.passes.linear_region import Region, block_boundaries, branch_points, maximal_regions
from esr_deploy.passes.region_fold import Fold, conv_cost
from esr_deploy.passes.region_pass import RegionFoldingPass


class FoldReparam(RegionFoldingPass):
    name = "fold-reparam"
    prefix = "reparam"

    def candidates(self, analysis: Analysis) -> list[list[Region]]:
        # maximal regions first; where one is rejected, the blocks of a chain (cut at residual
        # joins that the next block reads), then the regions below every fan-out point
        return (
            maximal_regions(analysis)
            + maximal_regions(analysis, block_boundaries(analysis))
            + maximal_regions(analysis, branch_points(analysis))
        )

    def worth_folding(self, gm: fx.GraphModule, analysis: Analysis, folds: Sequence[Fold]) -> bool:
        nodes = {n for f in folds for n in f.region.compute_nodes}
        work = [n for n in nodes if not is_passive(gm, n)]
        convs = [n for n in work if is_conv(gm, n)]
        has_bn = any(is_batchnorm(gm, n) for n in work)
        if not convs and not has_bn:
            return False  # e.g. a lone per-channel scale: nothing to gain
        if len(convs) == 1 and len(work) == 1 and len(folds) == 1:
            return False  # already one conv
        return sum(f.cost_after for f in folds) <= conv_cost(gm, analysis, nodes)
