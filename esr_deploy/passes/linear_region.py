"""Linear regions of a torch.fx graph: the single-input, single-output affine subgraphs that
the folding passes may replace by one convolution.

The folding passes share this engine and only decide *which* regions to fold
(:mod:`fold_reparam`, :mod:`fold_batchnorm`, :mod:`fold_identity`,
:mod:`merge_linear_chains`); the node kinds come from :mod:`affine_ops`, the fold itself from
:mod:`region_fold`, the analyse → fold rounds from :mod:`region_pass`.

**Regions.** Affine nodes connected through data edges form components. Inside a component,
the nodes whose data comes from exactly one outside tensor ``x`` form a single-input region
``R_x``. If ``R_x`` feeds the rest of the graph through one node, it computes
``y = A(x) = L(x) + b`` with ``L`` linear and shift-invariant with a finite receptive field of
radius ``r`` (the sum of the kernels' radii along the longest path), so

    y = conv2d(zero_pad(x, r), W) + b,  W in R^{C_out x C_in x (2r+1) x (2r+1)}

holds in the interior (pixels at least ``r`` from the border). A write ``t[...] = b`` into a
tensor belongs to the region of that tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from esr_deploy.passes.affine_ops import Analysis


@dataclass(frozen=True)
class Region:
    """A single-input, single-output affine subgraph: ``output = A(input)``."""

    input: fx.Node
    nodes: tuple[fx.Node, ...]  # topological order, mutations (setitem) included
    output: fx.Node

    @property
    def compute_nodes(self) -> list[fx.Node]:
        return [n for n in self.nodes if n.target is not operator.setitem]


def _mutations(analysis: Analysis) -> dict[fx.Node, list[fx.Node]]:
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in analysis.gm.graph.nodes:
        if node.target is operator.setitem and analysis.is_affine(node):
            out.setdefault(node.args[0], []).append(node)
    return out


def components(analysis: Analysis) -> list[list[fx.Node]]:
    """Affine nodes grouped by data edges (mutations joined to the tensor they write)."""
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    order = [n for n in analysis.gm.graph.nodes if analysis.is_affine(n)]
    for n in order:
        parent[n] = n
    for n in order:
        for a in analysis.data_inputs(n):
            if a in parent:
                parent[find(a)] = find(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in order:
        groups.setdefault(find(n), []).append(n)
    return list(groups.values())


def _externals(
    analysis: Analysis, comp: Sequence[fx.Node], cuts: frozenset[fx.Node] = frozenset()
) -> dict[fx.Node, frozenset[fx.Node]]:
    """For each node, the tensors from outside ``comp`` (or cut points) its data comes from."""
    inside = set(comp)
    ext: dict[fx.Node, frozenset[fx.Node]] = {}
    for n in comp:  # topological order
        if n.target is operator.setitem:
            src = n.args[0]
            ext[n] = ext.get(src, frozenset([src])) if isinstance(src, fx.Node) else frozenset()
            continue
        acc: set[fx.Node] = set()
        for a in analysis.data_inputs(n):
            acc |= ext[a] if a in inside and a not in cuts else {a}
        ext[n] = frozenset(acc)
    return ext


def region_from_nodes(
    analysis: Analysis, nodes: Iterable[fx.Node], source: fx.Node | None = None
) -> Region | None:
    """``nodes`` (plus the mutations of their tensors) as a Region, if single-in single-out.

    ``source``: the region's input when it is a node of the component (a cut point).
    """
    chosen = set(nodes)
    if source is not None:
        chosen.discard(source)
    muts = _mutations(analysis)
    for n in list(chosen):
        chosen.update(muts.get(n, ()))
    if not chosen or not all(analysis.is_affine(n) for n in chosen):
        return None
    ordered = [n for n in analysis.gm.graph.nodes if n in chosen]
    ext = _externals(analysis, ordered, frozenset([source]) if source is not None else frozenset())
    inputs = set().union(*ext.values()) if ext else set()
    if len(inputs) != 1:
        return None
    outputs = [
        n
        for n in ordered
        if n.target is not operator.setitem and any(u not in chosen for u in n.users)
    ]
    if len(outputs) != 1 or analysis.shape(outputs[0]) is None:
        return None
    (source,) = inputs
    if analysis.shape(source) is None or len(analysis.shape(source) or ()) != 4:
        return None
    return Region(input=source, nodes=tuple(ordered), output=outputs[0])


def branch_points(analysis: Analysis) -> frozenset[fx.Node]:
    """Affine nodes read by more than one op: where a rejected region can be cut."""
    return frozenset(
        n
        for n in analysis.gm.graph.nodes
        if analysis.is_affine(n)
        and n.target is not operator.setitem
        and sum(1 for u in n.users if u.target is not operator.setitem) > 1
    )


def block_boundaries(analysis: Analysis) -> frozenset[fx.Node]:
    """Branch points that are also joins (e.g. a residual add read by the next block): cutting
    there splits a chain of blocks without splitting a block's own bias-padded branches."""
    return frozenset(n for n in branch_points(analysis) if len(analysis.data_inputs(n)) > 1)


def maximal_regions(
    analysis: Analysis, cuts: frozenset[fx.Node] = frozenset()
) -> list[list[Region]]:
    """For every component and outside input, the regions that together replace ``R_x``.

    Usually one region per ``R_x``; when ``R_x`` feeds the graph through several nodes, one
    region per such node (their shared nodes computed in each). Nodes in ``cuts`` are
    treated as inputs: the regions below a fan-out point, for when the maximal region
    through it cannot be folded (border drift, cost).
    """
    result: list[list[Region]] = []
    for comp in components(analysis):
        ext = _externals(analysis, comp, cuts)
        by_input: dict[fx.Node, list[fx.Node]] = {}
        for n in comp:
            if len(ext[n]) == 1:
                by_input.setdefault(next(iter(ext[n])), []).append(n)
        for source, nodes in by_input.items():
            group = set(nodes)
            outs = [
                n
                for n in nodes
                if n.target is not operator.setitem and any(u not in group for u in n.users)
            ]
            regions = []
            for out in outs:
                anc = _ancestors_within(analysis, out, group)
                region = region_from_nodes(analysis, anc, source)
                if region is not None:
                    regions.append(region)
            if regions and len(regions) == len(outs):
                result.append(regions)
    return result


def _ancestors_within(analysis: Analysis, node: fx.Node, group: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in group:
            continue
        seen.add(n)
        stack.extend(analysis.data_inputs(n))
    return seen


def single_consumer(analysis: Analysis, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """The one op that consumes ``node`` past any padding (and the padding nodes passed)."""
    passed: list[fx.Node] = []
    current = node
    while True:
        users = [u for u in current.users if u.target is not operator.setitem]
        if len(users) != 1 or not analysis.is_affine(users[0]):
            return None, passed
        nxt = users[0]
        if nxt.target is F.pad or (
            nxt.op == "call_module"
            and isinstance(
                analysis.gm.get_submodule(str(nxt.target)), (nn.ZeroPad2d, nn.ConstantPad2d)
            )
        ):
            passed.append(nxt)
            current = nxt
            continue
        return nxt, passed
