"""``fold-identity``: an identity skip added into the conv it bypasses.

``W*x + b + x`` = ``(W + I)*x + b`` where ``I`` is the identity kernel (1 at the centre tap of
channel ``c`` → ``c``); it needs ``C_in = C_out`` and is exact at the border (the skip has no
padding). Also ``x - W*x`` and scaled skips, since the kernel is computed numerically by the
shared engine (:mod:`esr_deploy.passes.linear_region`).
"""

from __future__ import annotations

import operator

import torch

from esr_deploy.passes.affine_ops import Analysis, is_conv
from esr_deploy.passes.linear_region import Region, region_from_nodes
from esr_deploy.passes.region_pass import RegionFoldingPass

_ADDS = {
    operator.add,
    operator.iadd,
    torch.add,
    operator.sub,
    operator.isub,
    torch.sub,
    "add",
    "add_",
    "sub",
    "sub_",
}


class FoldIdentity(RegionFoldingPass):
    name = "fold-identity"
    prefix = "idfold"

    def candidates(self, analysis: Analysis) -> list[list[Region]]:
        gm = analysis.gm
        groups: list[list[Region]] = []
        for node in gm.graph.nodes:
            if not analysis.is_affine(node) or node.target not in _ADDS:
                continue
            data = analysis.data_inputs(node)
            if len(data) != 2:
                continue
            for conv, skip in ((data[0], data[1]), (data[1], data[0])):
                if (
                    analysis.is_affine(conv)
                    and is_conv(gm, conv)
                    and len(conv.users) == 1
                    and analysis.data_inputs(conv) == [skip]
                ):
                    region = region_from_nodes(analysis, {conv, node})
                    if region is not None:
                        groups.append([region])
                        break
        return groups
