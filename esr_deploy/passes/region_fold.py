"""Folding one linear region into one convolution: its kernel, bias, and how exact it is.

**Computing W and b** (float64, no per-op algebra): ``b`` is the region's response to a zero
input; ``W[:, c]`` is its response to a unit impulse in channel ``c`` at the centre of a
``(4r+3)^2`` image minus ``b``, read back flipped (cross-correlation): with the impulse at
``m``, ``W[i, j] = y(m + r - i, m + r - j)``. Border rings of ``W`` that are exactly zero are
trimmed (an over-estimated ``r``); a kernel with no cross-channel terms becomes depthwise.
``r`` bounds the receptive-field radius: the kernels' radii summed along the longest path.

**Verification.** On a random odd-sized input the region and the folded conv are compared
in float64: the interior must agree to :data:`EXACT` (1e-6) of the output's magnitude (else
the region was not linear and shift-invariant and is left alone). At the border they agree
only when every intermediate that a later conv pads was padded with its own bias; with zero
padding, a 1×1 conv with bias followed by a padded 3×3 conv differs in the outermost pixels.
That *border drift* is measured and reported, and the fold is applied only when accepted.

**Applying** a fold replaces the region's output by one ``nn.Conv2d`` (in the model's dtype,
bias-free when the region's response to zero is zero) and erases the nodes nothing else reads.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from esr_deploy.passes.affine_ops import CONST, Analysis, call_arg
from esr_deploy.passes.base import copy_model
from esr_deploy.passes.linear_region import Region
from esr_deploy.threads import single_thread

log = logging.getLogger(__name__)

#: Relative agreement required between a region and its folded conv. The check runs in
#: float64, but constants that fx evaluated while tracing (``_tensor_constant*``, e.g. a
#: BN's ``1/sqrt(var + eps)`` written into a bias padding) carry float32 rounding (~1e-8);
#: real border drift and misclassified ops are orders of magnitude above 1e-6.
EXACT = 1e-6
_SEED = 1234


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
            w = analysis.shape(call_arg(n, 1, "weight"))
            dil = call_arg(n, 5, "dilation", 1)
            d = max(dil) if isinstance(dil, (tuple, list)) else int(dil)
            own = d * (max(w[-2:]) - 1) // 2 if w else 0
        elif n.target is F.avg_pool2d:
            k = call_arg(n, 1, "kernel_size")
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
            shape = analysis.shape(call_arg(n, 1, "weight"))
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
    dtype = param_dtype(gm)
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


def param_dtype(gm: nn.Module) -> torch.dtype:
    for p in gm.parameters():
        return p.dtype
    return torch.float32
