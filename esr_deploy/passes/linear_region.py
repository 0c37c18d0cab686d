"""Linear regions of a torch.fx graph and how to fold one into a single convolution.

This module is the engine the folding passes share; each pass only decides *which* regions
to fold (:mod:`fold_reparam`, :mod:`fold_batchnorm`, :mod:`fold_identity`,
:mod:`merge_linear_chains`).

**Affine, shift-invariant ops.** A node is *affine* when its tensor output is an affine
function of its data inputs that commutes with spatial shifts: stride-1 convolutions (any
kernel, groups, dilation; modules or ``F.conv2d`` with constant weights), BatchNorm in eval
mode, identity/dropout, sums and differences of data tensors, sums/products with constants that
are scalars or per-channel (``[..., C, 1, 1]``), negation, constant padding, stride-1 average
pooling, channel concat/split/slice, and ``t[...] = const`` writes into a padded tensor (the
bias padding of ECB, RRRB and DBB). Nodes computed from parameters and buffers alone are
*constants* (e.g. ``scale * mask`` of a Sobel branch).

**Regions.** Affine nodes connected through data edges form components. Inside a component,
the nodes whose data comes from exactly one outside tensor ``x`` form a single-input region
``R_x``. If ``R_x`` feeds the rest of the graph through one node, it computes
``y = A(x) = L(x) + b`` with ``L`` linear and shift-invariant with a finite receptive field of
radius ``r`` (the sum of the kernels' radii along the longest path), so

    y = conv2d(zero_pad(x, r), W) + b,  W in R^{C_out x C_in x (2r+1) x (2r+1)}

holds in the interior (pixels at least ``r`` from the border).

**Computing W and b** (float64, no per-op algebra): ``b`` is the region's response to a zero
input; ``W[:, c]`` is its response to a unit impulse in channel ``c`` at the centre of a
``(4r+3)^2`` image minus ``b``, read back flipped (cross-correlation): with the impulse at
``m``, ``W[i, j] = y(m + r - i, m + r - j)``. Border rings of ``W`` that are exactly zero are
trimmed (an over-estimated ``r``); a kernel with no cross-channel terms becomes depthwise.

**Verification.** On a random odd-sized input the region and the folded conv are compared
in float64: the interior must agree to :data:`EXACT` (1e-6) of the output's magnitude (else
the region was not linear and shift-invariant and is left alone). At the border they agree
only when every intermediate that a later conv pads was padded with its own bias; with zero
padding, a 1×1 conv with bias followed by a padded 3×3 conv differs in the outermost pixels.
That *border drift* is measured and reported, and the fold is applied only when accepted.
"""

from __future__ import annotations

import logging
import operator
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from esr_deploy.passes.base import Pass, PassContext, PassOutcome, copy_model

log = logging.getLogger(__name__)

#: Relative agreement required between a region and its folded conv. The check runs in
#: float64, but constants that fx evaluated while tracing (``_tensor_constant*``, e.g. a
#: BN's ``1/sqrt(var + eps)`` written into a bias padding) carry float32 rounding (~1e-8);
#: real border drift and misclassified ops are orders of magnitude above 1e-6.
EXACT = 1e-6
_SEED = 1234
#: Rounds of analyse → fold; one round normally suffices, a second confirms nothing is left.
MAX_ROUNDS = 5

CONST, AFFINE, OTHER = "const", "affine", "other"

_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_NEG = {operator.neg, torch.neg}
_CAT = {torch.cat, torch.concat}
_SPLIT = {torch.split, torch.chunk}
_IDENTITY_FN = {F.dropout, F.dropout2d, torch.clone}
_PASSIVE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_METHODS_ADD = {"add", "sub", "add_", "sub_"}
_METHODS_MUL = {"mul", "div", "mul_", "div_"}
_METHODS_ID = {"clone", "contiguous"}


@dataclass(frozen=True)
class Region:
    """A single-input, single-output affine subgraph: ``output = A(input)``."""

    input: fx.Node
    nodes: tuple[fx.Node, ...]  # topological order, mutations (setitem) included
    output: fx.Node

    @property
    def compute_nodes(self) -> list[fx.Node]:
        return [n for n in self.nodes if n.target is not operator.setitem]


@dataclass(frozen=True)
class Fold:
    """A region's equivalent convolution, before it is applied."""

    region: Region
    weight: torch.Tensor  # float64, C_out x C_in/groups x k x k
    bias: torch.Tensor  # float64, C_out
    groups: int
    radius: int
    interior_error: float  # relative
    border_error: float  # relative

    @property
    def cost_after(self) -> int:
        """Multiply-accumulates per output pixel of the folded conv."""
        return self.weight.numel()


@dataclass
class Analysis:
    """Node kinds and shapes of a traced model, recomputed after every change."""

    gm: fx.GraphModule
    kinds: dict[fx.Node, str] = field(default_factory=dict)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.kinds.get(a) != CONST]

    def is_affine(self, node: fx.Node) -> bool:
        return self.kinds.get(node) == AFFINE


class _WritableProxy(fx.Proxy):
    """A proxy that records ``t[index] = value`` (plain fx proxies refuse item assignment).

    Bias padding is written that way (ECB, RRRB, DBB's BNAndPad); the write becomes an
    ``operator.setitem`` node, which fx keeps in place as a side effect.
    """

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


class _Tracer(fx.Tracer):
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _WritableProxy(node, self)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as a GraphModule (already traced models are kept as they are)."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def analyse(gm: fx.GraphModule, sample: torch.Tensor) -> Analysis:
    """Propagate shapes with ``sample`` and classify every node (module docstring)."""
    ShapeProp(gm).propagate(sample)
    analysis = Analysis(gm)
    for node in gm.graph.nodes:
        analysis.kinds[node] = _classify(gm, analysis, node)
    # a tensor mutated by a node that is not affine is not affine either
    for node in gm.graph.nodes:
        if node.target is operator.setitem and analysis.kinds[node] != AFFINE:
            target = node.args[0]
            if isinstance(target, fx.Node) and analysis.kinds.get(target) == AFFINE:
                analysis.kinds[target] = OTHER
    return analysis


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument given by position or by keyword (fx keeps either form)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _per_channel(analysis: Analysis, value: Any) -> bool:
    """A constant that broadcasts per channel (or is a scalar)."""
    if isinstance(value, (int, float)):
        return True
    if not isinstance(value, fx.Node) or analysis.kinds.get(value) != CONST:
        return False
    shape = analysis.shape(value)
    if shape is None:
        return False
    numel = 1
    for s in shape:
        numel *= s
    return numel == 1 or (len(shape) >= 3 and shape[-1] == 1 and shape[-2] == 1)


def _full_spatial_index(index: Any) -> bool:
    """``t[:, a:b]``-style channel indexing: dims 2 and 3 untouched, no tensors as indices."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(isinstance(i, fx.Node) or i is Ellipsis or i is None for i in index):
        return False
    if len(index) > 2:
        return all(i == slice(None) for i in index[2:]) and index[0] == slice(None)
    return len(index) < 2 or index[0] == slice(None)


def _conv_module_ok(m: nn.Conv2d) -> bool:
    return (
        all(s == 1 for s in m.stride)
        and m.padding_mode == "zeros"
        and all(k % 2 == 1 for k in m.kernel_size)
        and not isinstance(m.padding, str)
    )


def _classify(gm: fx.GraphModule, analysis: Analysis, node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return OTHER
    if node.op == "get_attr":
        return CONST
    inputs = node.all_input_nodes
    if inputs and all(analysis.kinds.get(a) == CONST for a in inputs) and node.op != "call_module":
        return CONST
    if not inputs and node.op == "call_function":
        return CONST  # e.g. torch.zeros(...) with literal sizes
    if analysis.shape(node) is None and not (node.target is operator.setitem or _is_split(node)):
        return OTHER  # non-tensor values (sizes) and tuples we do not understand
    data = analysis.data_inputs(node)
    if any(analysis.shape(a) is None and a.target not in _SPLIT for a in data):
        if not (node.target is operator.getitem and data and _is_split(data[0])):
            return OTHER
    if node.op == "call_module":
        return AFFINE if _module_affine(gm.get_submodule(str(node.target)), data) else OTHER
    if node.op == "call_function":
        return AFFINE if _function_affine(analysis, node, data) else OTHER
    if node.op == "call_method":
        return AFFINE if _method_affine(analysis, node, data) else OTHER
    return OTHER


def _is_split(node: fx.Node) -> bool:
    return node.target in _SPLIT or node.target in ("split", "chunk")


def _module_affine(m: nn.Module, data: Sequence[fx.Node]) -> bool:
    if len(data) != 1:
        return False
    if isinstance(m, nn.Conv2d):
        return _conv_module_ok(m)
    if isinstance(m, nn.BatchNorm2d):
        return not m.training and m.track_running_stats and m.running_mean is not None
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return not m.training or isinstance(m, nn.Identity)
    if isinstance(m, nn.AvgPool2d):
        stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
        return (
            all(s == 1 for s in stride)
            and not m.ceil_mode
            and m.divisor_override is None
            and m.count_include_pad
        )
    return isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d))


def _function_affine(analysis: Analysis, node: fx.Node, data: Sequence[fx.Node]) -> bool:
    t = node.target
    args: Any = node.args
    kwargs: Any = node.kwargs
    if t in _ADD:
        return (
            bool(data)
            and all(a in data or _per_channel(analysis, a) for a in args[:2])
            and all(not isinstance(v, fx.Node) for v in kwargs.values())
        )
    if t in _MUL:
        if len(data) != 1 or len(args) < 2:
            return False
        other = args[1] if args[0] is data[0] else args[0]
        divides = t in (operator.truediv, operator.itruediv, torch.div)
        return (not divides or args[0] is data[0]) and _per_channel(analysis, other)
    if t in _NEG or t in _IDENTITY_FN:
        # F.dropout defaults to training=True: it drops even in eval() unless told otherwise
        if t in (F.dropout, F.dropout2d) and _arg(node, 2, "training", True):
            return False
        return len(data) == 1
    if t in (F.conv2d, torch.conv2d):
        weight = _arg(node, 1, "weight")
        bias = _arg(node, 2, "bias")
        stride = _arg(node, 3, "stride", 1)
        w_shape = analysis.shape(weight) if isinstance(weight, fx.Node) else None
        return (
            len(data) == 1
            and args[0] is data[0]
            and isinstance(weight, fx.Node)
            and analysis.kinds.get(weight) == CONST
            and (bias is None or (isinstance(bias, fx.Node) and analysis.kinds.get(bias) == CONST))
            and stride in (1, (1, 1), [1, 1])
            and w_shape is not None
            and w_shape[-1] % 2 == 1
            and w_shape[-2] % 2 == 1
            and not isinstance(_arg(node, 4, "padding", 0), str)
        )
    if t is F.pad:
        mode = _arg(node, 2, "mode", "constant")
        return len(data) == 1 and mode == "constant" and not _nodes_in(args[1:])
    if t is F.avg_pool2d:
        stride = _arg(node, 2, "stride")
        return len(data) == 1 and stride in (1, (1, 1), [1, 1]) and not kwargs.get("ceil_mode")
    if t is F.batch_norm:
        training = _arg(node, 5, "training", False)
        return len(data) == 1 and not training
    if t in _CAT:
        dim = _arg(node, 1, "dim", 0)
        tensors = args[0]
        return dim in (1, -3) and all(isinstance(a, fx.Node) and a in data for a in tensors)
    if t in _SPLIT:
        dim = _arg(node, 2, "dim", 0)
        return len(data) == 1 and dim in (1, -3)
    if t is operator.getitem:
        src = args[0]
        if isinstance(src, fx.Node) and _is_split(src):
            return isinstance(args[1], int)
        return len(data) == 1 and _full_spatial_index(args[1])
    if t is operator.setitem:
        target, value = args[0], args[2]
        return (
            isinstance(target, fx.Node)
            and analysis.kinds.get(target) == AFFINE
            and _border_write(args[1])
            and (isinstance(value, (int, float)) or _per_channel(analysis, value))
        )
    return False


def _border_write(index: Any) -> bool:
    """``t[:, :, :p, :] = b``-style writes: every channel, and along H and W either all
    positions or a band at the start (``:p``, ``0:p``) or the end (``-p:``) of the axis.

    Only such writes (bias padding) keep a region shift-invariant up to its border; a write
    at a fixed interior row (``t[:, :, 20:21] = 1``) does not, and would go unnoticed by
    probes smaller than the row index.
    """
    if not isinstance(index, tuple) or len(index) != 4:
        return False
    if any(not isinstance(i, slice) or i.step not in (None, 1) for i in index):
        return False
    if index[0] != slice(None) or index[1] != slice(None):
        return False
    for axis in index[2:]:
        start, stop = axis.start, axis.stop
        full = start is None and stop is None
        head = start in (None, 0) and isinstance(stop, int) and stop > 0
        tail = isinstance(start, int) and start < 0 and stop is None
        if not (full or head or tail):
            return False
    return True


def _method_affine(analysis: Analysis, node: fx.Node, data: Sequence[fx.Node]) -> bool:
    name = node.target
    args: Any = node.args
    if name in _METHODS_ADD:
        return bool(data) and all(a in data or _per_channel(analysis, a) for a in args[:2])
    if name in _METHODS_MUL:
        if len(data) != 1 or args[0] is not data[0]:
            return False
        return _per_channel(analysis, args[1])
    if name in _METHODS_ID or name == "neg":
        return len(data) == 1
    if name in ("split", "chunk"):
        dim = _arg(node, 2, "dim", 0)
        return len(data) == 1 and dim in (1, -3)
    return False


# --------------------------------------------------------------------------- regions


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


# --------------------------------------------------------------------------- folding


def _radius(gm: fx.GraphModule, analysis: Analysis, region: Region) -> int:
    """Upper bound of the receptive-field radius: kernel radii summed along paths."""
    rad: dict[fx.Node, int] = {}
    for n in region.nodes:
        base = max((rad.get(a, 0) for a in analysis.data_inputs(n)), default=0)
        own = 0
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, nn.Conv2d):
                own = max(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))
            elif isinstance(m, nn.AvgPool2d):
                size = m.kernel_size
                own = (max(size) if isinstance(size, tuple) else int(size)) // 2
        elif n.target in (F.conv2d, torch.conv2d):
            w = analysis.shape(_arg(n, 1, "weight"))
            dil = _arg(n, 5, "dilation", 1)
            d = max(dil) if isinstance(dil, (tuple, list)) else int(dil)
            own = d * (max(w[-2:]) - 1) // 2 if w else 0
        elif n.target is F.avg_pool2d:
            k = _arg(n, 1, "kernel_size")
            own = (max(k) if isinstance(k, (tuple, list)) else int(k)) // 2
        rad[n] = base + own
    return rad.get(region.output, 0)


def region_module(gm: fx.GraphModule, analysis: Analysis, region: Region) -> fx.GraphModule:
    """A standalone GraphModule computing the region (its constants included)."""
    inside = set(region.nodes)
    needed: set[fx.Node] = set()
    stack = [a for n in region.nodes for a in n.all_input_nodes if a not in inside]
    while stack:
        a = stack.pop()
        if a in needed or a is region.input or analysis.kinds.get(a) != CONST:
            continue
        needed.add(a)
        stack.extend(a.all_input_nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {region.input: graph.placeholder("x")}
    for n in gm.graph.nodes:
        if n in needed or n in inside:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[region.output])
    return fx.GraphModule(gm, graph)


def conv_cost(gm: fx.GraphModule, analysis: Analysis, nodes: Iterable[fx.Node]) -> int:
    """Multiply-accumulates per output pixel of the convolutions among ``nodes``."""
    total = 0
    for n in nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, nn.Conv2d):
                total += m.weight.numel()
        elif n.target in (F.conv2d, torch.conv2d):
            shape = analysis.shape(_arg(n, 1, "weight"))
            if shape:
                total += int(torch.Size(shape).numel())
    return total


def compute_fold(gm: fx.GraphModule, analysis: Analysis, region: Region) -> Fold | None:
    """The region's conv (module docstring), or None if it is not linear shift-invariant."""
    in_shape, out_shape = analysis.shape(region.input), analysis.shape(region.output)
    if in_shape is None or out_shape is None or len(out_shape) != 4:
        return None
    with single_thread():
        return _compute_fold(gm, analysis, region, in_shape[1], out_shape[1])


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny probe convolutions run ~1000× faster on one thread than on a thread pool that
    wakes up for each of them (seen on 2-core VMs); restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _compute_fold(
    gm: fx.GraphModule, analysis: Analysis, region: Region, c_in: int, c_out: int
) -> Fold | None:
    r = _radius(gm, analysis, region)
    sub = _float64(copy_model(region_module(gm, analysis, region)))
    size = 4 * r + 3
    centre = size // 2
    probe = torch.zeros(c_in + 1, c_in, size, size, dtype=torch.float64)
    for c in range(c_in):
        probe[c, c, centre, centre] = 1.0
    try:
        with torch.no_grad():
            response = sub(probe)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        log.info("region ending at %s not folded: %s", region.output.name, exc)
        return None
    if not isinstance(response, torch.Tensor) or tuple(response.shape) != (
        c_in + 1,
        c_out,
        size,
        size,
    ):
        return None  # the region changes the spatial size: not a same-size conv
    bias_map = response[c_in]
    bias = bias_map[:, centre, centre].clone()
    impulse = response[:c_in] - bias_map  # c_in x c_out x S x S
    window = impulse[:, :, centre - r : centre + r + 1, centre - r : centre + r + 1]
    weight = window.flip(-1).flip(-2).transpose(0, 1).contiguous()  # c_out x c_in x k x k
    scale = float(weight.abs().max()) or 1.0
    while r > 0 and all(
        float(edge.abs().max()) <= 1e-12 * scale
        for edge in (weight[..., 0, :], weight[..., -1, :], weight[..., :, 0], weight[..., :, -1])
    ):
        weight, r = weight[..., 1:-1, 1:-1], r - 1
    groups = 1
    if c_in == c_out and c_in > 1:
        off_diagonal = weight.clone()
        idx = torch.arange(c_in)
        off_diagonal[idx, idx] = 0
        if float(off_diagonal.abs().max()) == 0.0:
            groups, weight = c_in, weight[idx, idx].unsqueeze(1).contiguous()
    interior, border = _verify(sub, weight, bias, groups, r, c_in)
    if interior > EXACT:
        log.info(
            "region ending at %s is not shift-invariant (error %.3g); left as is",
            region.output.name,
            interior,
        )
        return None
    return Fold(
        region=region,
        weight=weight,
        bias=bias,
        groups=groups,
        radius=r,
        interior_error=interior,
        border_error=border,
    )


def _float64(module: nn.Module) -> nn.Module:
    """Parameters, buffers *and* plain tensor attributes (fx's ``_tensor_constant*``, which
    ``.double()`` leaves alone) in float64, so that no float32 value enters the probe."""
    module = module.double().eval()
    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(sub, name, value.double())
    return module


def _verify(
    sub: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    r: int,
    c_in: int,
) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(_SEED)
    x = torch.randn(2, c_in, 2 * r + 13, 2 * r + 17, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = sub(x)
        got = F.conv2d(x, weight, bias, padding=r, groups=groups)
    scale = float(ref.abs().max()) or 1.0
    diff = (ref - got).abs()
    inner = diff[..., r : diff.shape[-2] - r, r : diff.shape[-1] - r]
    return float(inner.max()) / scale, float(diff.max()) / scale


def apply_fold(
    gm: fx.GraphModule,
    fold: Fold,
    name_prefix: str = "folded",
    replaced: dict[fx.Node, fx.Node] | None = None,
) -> str:
    """Replace the region by one ``nn.Conv2d``; returns the new module's name.

    ``replaced`` maps region outputs already folded in this round to their new nodes (a
    region may start where another ends: two blocks of a chain); it is updated.
    """
    region = fold.region
    replaced = {} if replaced is None else replaced
    source = replaced.get(region.input, region.input)
    c_out = fold.weight.shape[0]
    c_in = fold.weight.shape[1] * fold.groups
    k = fold.weight.shape[-1]
    dtype = _param_dtype(gm)
    has_bias = bool(fold.bias.abs().max() > 0)  # bias-free branches stay bias-free
    conv = nn.Conv2d(
        c_in, c_out, k, padding=fold.radius, groups=fold.groups, bias=has_bias, dtype=dtype
    )  # in the model's dtype: float64 kernels are not rounded
    with torch.no_grad():
        conv.weight.copy_(fold.weight.to(dtype))
        if conv.bias is not None:
            conv.bias.copy_(fold.bias.to(dtype))
    index = 0
    while hasattr(gm, f"{name_prefix}_{index}"):
        index += 1
    name = f"{name_prefix}_{index}"
    gm.add_submodule(name, conv)
    graph = gm.graph
    with graph.inserting_before(region.output):
        new = graph.call_module(name, (source,))
    region.output.replace_all_uses_with(new)
    replaced[region.output] = new
    inside = set(region.nodes)
    for n in reversed(region.nodes):
        if n.target is operator.setitem:
            continue
        mutations = [u for u in n.users if u.target is operator.setitem and u in inside]
        if all(u in mutations for u in n.users):
            for u in mutations:
                graph.erase_node(u)
            graph.erase_node(n)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return name


def _param_dtype(gm: nn.Module) -> torch.dtype:
    for p in gm.parameters():
        return p.dtype
    return torch.float32


# --------------------------------------------------------------------------- pass driver


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Conv2d)
    return node.target in (F.conv2d, torch.conv2d)


def is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.BatchNorm2d)
    return node.target is F.batch_norm


def is_passive(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that compute nothing (identity, eval dropout, clone) or only move/pad data."""
    if node.target is operator.setitem or node.target is F.pad:
        return True
    if node.op == "call_module":
        return isinstance(
            gm.get_submodule(str(node.target)), (*_PASSIVE_MODULES, nn.ZeroPad2d, nn.ConstantPad2d)
        )
    return node.target in _IDENTITY_FN or node.target in _METHODS_ID


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


class RegionFoldingPass(Pass):
    """Shared driver: analyse, let the subclass choose region groups, fold, repeat.

    Subclasses implement :meth:`candidates` (groups of regions that are folded together or
    not at all) and may override :meth:`worth_folding`.
    """

    prefix: ClassVar[str] = "folded"

    @abstractmethod
    def candidates(self, analysis: Analysis) -> list[list[Region]]: ...

    def worth_folding(self, gm: fx.GraphModule, analysis: Analysis, folds: Sequence[Fold]) -> bool:
        """Default: the folded convs cost no more than the convs they replace."""
        nodes = {n for f in folds for n in f.region.nodes}
        return sum(f.cost_after for f in folds) <= conv_cost(gm, analysis, nodes)

    def run(self, model: nn.Module, context: PassContext) -> PassOutcome:
        try:
            gm = trace(model)
        except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
            return PassOutcome(
                model=model,
                modified=False,
                details=(
                    f"not applied: the model cannot be traced by torch.fx ({type(exc).__name__}: "
                    f"{str(exc)[:200]})",
                ),
            )
        details: list[str] = []
        skipped: dict[str, str] = {}  # region output -> why it was not folded
        rejected: set[str] = set()
        drift = 0.0
        folded = 0
        for _ in range(MAX_ROUNDS):
            analysis = analyse(gm, context.sample().to(_param_dtype(gm)))
            plan: list[list[Fold]] = []
            planned: set[fx.Node] = set()
            for group in self.candidates(analysis):
                nodes = {n for r in group for n in r.nodes}
                key = ",".join(sorted(n.name for n in nodes))
                if key in rejected or nodes & planned:
                    continue
                maybe = [compute_fold(gm, analysis, r) for r in group]
                ok = [f for f in maybe if f is not None]
                if len(ok) != len(maybe):
                    rejected.add(key)
                    continue
                if not self.worth_folding(gm, analysis, ok):
                    before = conv_cost(gm, analysis, nodes)
                    after = sum(f.cost_after for f in ok)
                    if after > before > 0:  # silent for "already one conv" / "no conv"
                        k = "x".join(str(d) for d in ok[0].weight.shape[-2:])
                        skipped[group[-1].output.name] = (
                            f"region ending at {group[-1].output.name}: not folded — the "
                            f"{k} conv would cost {after} multiply-accumulates per pixel vs "
                            f"{before} for the convs it replaces"
                        )
                    rejected.add(key)
                    continue
                worst = max(f.border_error for f in ok)
                if worst > EXACT and not context.accept_border_drift:
                    skipped[group[-1].output.name] = (
                        f"region ending at {group[-1].output.name}: not folded — the fold "
                        f"differs at the image border by {worst:.3g} of the output's "
                        "magnitude (zero padding where the training form pads with a bias); "
                        "pass --accept-border-drift to fold it"
                    )
                    rejected.add(key)
                    continue
                plan.append(ok)
                planned |= nodes
            if not plan:
                break
            replaced: dict[fx.Node, fx.Node] = {}
            for applied in plan:
                names = [apply_fold(gm, f, self.prefix, replaced) for f in applied]
                ops = sum(len(f.region.compute_nodes) for f in applied)
                worst = max(f.border_error for f in applied)
                drift = max(drift, worst if worst > EXACT else 0.0)
                details.append(
                    f"{'+'.join(names)}: {ops} ops → {len(applied)} conv(s) "
                    f"{'x'.join(str(s) for s in applied[0].weight.shape[-2:])}"
                    + (f", border drift {worst:.3g} accepted" if worst > EXACT else "")
                )
                folded += 1
        # report regions left unfolded only if no later fold (below a cut point) covered them
        remaining = {n.name for n in gm.graph.nodes}
        details += [why for name, why in skipped.items() if name in remaining]
        return PassOutcome(
            model=gm, modified=folded > 0, details=tuple(details), border_drift=drift
        )


def count_convs(model: nn.Module) -> int:
    """Convolutions in the model's traced graph: conv modules called and ``F.conv2d`` calls."""
    gm = trace(model)
    return sum(1 for n in gm.graph.nodes if n.op != "get_attr" and is_conv(gm, n))
