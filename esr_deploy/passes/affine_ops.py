"""Which nodes of a torch.fx graph are affine and shift-invariant (the ops a fold may merge).

A node is *affine* when its tensor output is an affine function of its data inputs that
commutes with spatial shifts: stride-1 convolutions (any kernel, groups, dilation; modules or
``F.conv2d`` with constant weights), BatchNorm in eval mode, identity/dropout, sums and
differences of data tensors, sums/products with constants that are scalars or per-channel
(``[..., C, 1, 1]``), negation, constant padding, stride-1 average pooling, channel
concat/split/slice, and ``t[...] = const`` writes into a padded tensor (the bias padding of
ECB, RRRB and DBB). Nodes computed from parameters and buffers alone are *constants* (e.g.
``scale * mask`` of a Sobel branch); everything else is *other*.

The model is traced with a tracer that records item assignment (``t[:, :, :1] = bias``) as an
``operator.setitem`` node; shapes come from one propagation of a sample input. Regions of
these nodes are found in :mod:`linear_region` and folded in :mod:`region_fold`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

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


def call_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
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
        if t in (F.dropout, F.dropout2d) and call_arg(node, 2, "training", True):
            return False
        return len(data) == 1
    if t in (F.conv2d, torch.conv2d):
        weight = call_arg(node, 1, "weight")
        bias = call_arg(node, 2, "bias")
        stride = call_arg(node, 3, "stride", 1)
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
            and not isinstance(call_arg(node, 4, "padding", 0), str)
        )
    if t is F.pad:
        mode = call_arg(node, 2, "mode", "constant")
        return len(data) == 1 and mode == "constant" and not _nodes_in(args[1:])
    if t is F.avg_pool2d:
        stride = call_arg(node, 2, "stride")
        return len(data) == 1 and stride in (1, (1, 1), [1, 1]) and not kwargs.get("ceil_mode")
    if t is F.batch_norm:
        training = call_arg(node, 5, "training", False)
        return len(data) == 1 and not training
    if t in _CAT:
        dim = call_arg(node, 1, "dim", 0)
        tensors = args[0]
        return dim in (1, -3) and all(isinstance(a, fx.Node) and a in data for a in tensors)
    if t in _SPLIT:
        dim = call_arg(node, 2, "dim", 0)
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
        dim = call_arg(node, 2, "dim", 0)
        return len(data) == 1 and dim in (1, -3)
    return False


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


def count_convs(model: nn.Module) -> int:
    """Convolutions in the model's traced graph: conv modules called and ``F.conv2d`` calls."""
    gm = trace(model)
    return sum(1 for n in gm.graph.nodes if n.op != "get_attr" and is_conv(gm, n))
