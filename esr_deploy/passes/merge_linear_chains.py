"""``merge-linear-chains``: consecutive convs with nothing nonlinear between become one.

``W2 * (W1 * x + b1) + b2`` = ``(W2 ∘ W1) * x + (W2 * b1 + b2)``, a conv of kernel size
``k1 + k2 - 1`` (e.g. 1×1 → 3×3 → 1×1 is one 3×3). It is applied only when it does not raise
the cost: ``C_out·C_in·K² <= Σ C_out_i·C_in_i·k_i²`` (a 3×3 → 3×3 chain would become a dearer
5×5 and is kept), and exactly only when each intermediate that a later conv zero-pads was
padded with its bias; otherwise the border drift is reported (``--accept-border-drift``).
The longest chain that pays off is folded; otherwise adjacent pairs are tried.
"""

from __future__ import annotations

from torch import fx

from esr_deploy.passes.affine_ops import Analysis, is_conv
from esr_deploy.passes.linear_region import Region, region_from_nodes, single_consumer
from esr_deploy.passes.region_pass import RegionFoldingPass


class MergeLinearChains(RegionFoldingPass):
    name = "merge-linear-chains"
    prefix = "chain"

    def candidates(self, analysis: Analysis) -> list[list[Region]]:
        gm = analysis.gm
        chains: list[list[set[fx.Node]]] = []
        seen: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node in seen or not analysis.is_affine(node) or not is_conv(gm, node):
                continue
            links = [{node}]
            current = node
            while True:
                nxt, padding = single_consumer(analysis, current)
                if nxt is None or not is_conv(gm, nxt):
                    break
                links.append({*padding, nxt})
                seen.add(nxt)
                current = nxt
            if len(links) > 1:
                chains.append(links)
        groups: list[list[Region]] = []
        for links in chains:
            whole = region_from_nodes(analysis, set().union(*links))
            if whole is not None:
                groups.append([whole])
            for a, b in zip(links, links[1:], strict=False):
                pair = region_from_nodes(analysis, a | b)
                if pair is not None:
                    groups.append([pair])
        return groups
