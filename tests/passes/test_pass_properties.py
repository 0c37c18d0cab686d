"""Property tests of ``fold-reparam`` on random linear regions it has never seen.

Each example is a random ``nn.Module`` (built here from a drawn spec, so no class name or layout
can be special-cased by the pass): a stem conv, a PReLU, then a *linear region* on one input
``x`` with ``C`` channels — a sum of 1-4 branches drawn from convs (k×k, depthwise or full,
dilated), conv + BatchNorm (eval, randomised statistics), 1×1 → bias-padded k×k chains (ECB's
``t[:, :, :p, :] = b`` writes or DBB's ``F.pad(t - b) + b``), identity, per-channel scales, fixed
Sobel/Laplacian filters times a learnable scale, stride-1 average pooling and a channel concat
followed by a 1×1 conv — then a second PReLU. The models compute in float64.

Properties (design.md, "Folding, precisely"):

(a) the folded model equals the original to 1e-9 relative, borders included, whenever the pass
    reported no border drift;
(b) the region became exactly one conv, unless it is not worth folding for a reason the test
    predicts independently (no conv at all, already one conv, a dearer folded kernel, or a
    border that would drift) — a drifting region is reported with ``--accept-border-drift``;
(c) with ``accept_border_drift=True`` every region worth folding becomes one conv and the
    interior (pixels at least the receptive-field radius from the border) still matches.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from esr_deploy.passes import FoldReparam
from esr_deploy.passes.affine_ops import count_convs
from esr_deploy.passes.base import PassContext

RTOL = 1e-9
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMAGE_HW = (13, 17)  # odd sizes: borders on every side, no symmetry to hide an off-by-one

# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Conv:
    k: int
    depthwise: bool
    dilation: int

    @property
    def radius(self) -> int:
        return self.dilation * (self.k // 2)


@dataclass(frozen=True)
class ConvBN:
    k: int
    depthwise: bool

    @property
    def radius(self) -> int:
        return self.k // 2


@dataclass(frozen=True)
class Chain:
    """1×1 (C→E, bias) then a k×k valid conv on the 1×1 output padded with its bias (or zeros)."""

    k: int
    expand: int
    pad: str  # "setitem" (ECB/RRRB writes), "shift" (F.pad(t - b) + b), "zero" (drifts)

    @property
    def radius(self) -> int:
        return self.k // 2


@dataclass(frozen=True)
class Identity:
    radius: int = 0


@dataclass(frozen=True)
class Scale:
    radius: int = 0


@dataclass(frozen=True)
class FixedFilter:
    kind: str  # "sobel_x", "sobel_y", "laplacian"
    radius: int = 1


@dataclass(frozen=True)
class AvgPool:
    after_conv: bool  # avg_pool(conv1x1(x)) zero-pads the conv's bias: the border drifts
    radius: int = 1


@dataclass(frozen=True)
class Concat:
    """cat(a(x), b(x)) then a 1×1 conv 2C→C; ``a``/``b`` are a full k×k conv (k) or identity (0)."""

    a: int
    b: int

    @property
    def radius(self) -> int:
        return max(self.a, self.b) // 2


Branch = Conv | ConvBN | Chain | Identity | Scale | FixedFilter | AvgPool | Concat


def is_depthwise(b: Branch) -> bool:
    """Whether the branch has no cross-channel terms (the folded kernel may be depthwise)."""
    if isinstance(b, (Conv, ConvBN)):
        return b.depthwise
    return isinstance(b, (Identity, Scale, FixedFilter)) or (
        isinstance(b, AvgPool) and not b.after_conv
    )


def branch_cost(b: Branch, c: int) -> int:
    """Multiply-accumulates per pixel of the branch's convs (weight numel), as the pass counts."""
    if isinstance(b, (Conv, ConvBN)):
        return c * (1 if b.depthwise else c) * b.k * b.k
    if isinstance(b, Chain):
        return c * b.expand + b.expand * c * b.k * b.k
    if isinstance(b, FixedFilter):
        return c * 9
    if isinstance(b, AvgPool):
        return c * c if b.after_conv else 0
    if isinstance(b, Concat):
        return sum(c * c * k * k for k in (b.a, b.b) if k) + c * 2 * c
    return 0


def branch_convs(b: Branch) -> int:
    if isinstance(b, (Conv, ConvBN, FixedFilter)):
        return 1
    if isinstance(b, Chain):
        return 2
    if isinstance(b, AvgPool):
        return int(b.after_conv)
    if isinstance(b, Concat):
        return 1 + (b.a > 0) + (b.b > 0)
    return 0


def drifts(b: Branch) -> bool:
    """A bias that a later op zero-pads: the fold differs in the outermost pixels."""
    return (isinstance(b, AvgPool) and b.after_conv) or (isinstance(b, Chain) and b.pad == "zero")


@dataclass(frozen=True)
class Spec:
    channels: int
    branches: tuple[Branch, ...]
    seed: int

    @property
    def radius(self) -> int:
        return max(b.radius for b in self.branches)

    @property
    def region_convs(self) -> int:
        return sum(branch_convs(b) for b in self.branches)

    def cost_before(self) -> int:
        return sum(branch_cost(b, self.channels) for b in self.branches)

    def cost_after(self) -> int:
        c, k = self.channels, 2 * self.radius + 1
        return c * (1 if all(is_depthwise(b) for b in self.branches) else c) * k * k

    @property
    def has_work(self) -> bool:
        """Something the pass folds: a conv or a BatchNorm (not only identities and scales)."""
        return self.region_convs > 0

    @property
    def single_conv(self) -> bool:
        """The region is already one conv and nothing else (the pass leaves it)."""
        (only,) = self.branches if len(self.branches) == 1 else (None,)
        return isinstance(only, (Conv, FixedFilter))

    @property
    def too_dear(self) -> bool:
        return self.cost_after() > self.cost_before()

    @property
    def drifts(self) -> bool:
        return any(drifts(b) for b in self.branches)

    @property
    def foldable(self) -> bool:
        """Folded with --accept-border-drift."""
        return self.has_work and not self.single_conv and not self.too_dear


# ----------------------------------------------------------------------------- the model

FIXED_FILTERS = {
    "sobel_x": [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
    "sobel_y": [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
    "laplacian": [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
}


def _conv(c_in: int, c_out: int, k: int, groups: int = 1, dilation: int = 1, pad: bool = True):
    return nn.Conv2d(
        c_in, c_out, k, padding=dilation * (k // 2) if pad else 0, groups=groups, dilation=dilation
    )


def _randomise_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=gen))
        bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        bn.weight.copy_(torch.randn(n, generator=gen))
        bn.bias.copy_(torch.randn(n, generator=gen))


class BranchModule(nn.Module):
    """One drawn branch of the region."""

    def __init__(self, spec: Branch, c: int, gen: torch.Generator) -> None:
        super().__init__()
        self.spec = spec
        if isinstance(spec, Conv):
            g = c if spec.depthwise else 1
            self.conv = _conv(c, c, spec.k, g, spec.dilation)
        elif isinstance(spec, ConvBN):
            self.conv = _conv(c, c, spec.k, c if spec.depthwise else 1)
            self.bn = nn.BatchNorm2d(c)
            _randomise_bn(self.bn, gen)
        elif isinstance(spec, Chain):
            self.squeeze = nn.Conv2d(c, spec.expand, 1)
            self.spread = _conv(spec.expand, c, spec.k, pad=False)
            with torch.no_grad():  # a clearly nonzero bias: zero padding would show
                self.squeeze.bias.copy_(torch.randn(spec.expand, generator=gen) + 1.0)
        elif isinstance(spec, Scale):
            self.s = nn.Parameter(torch.randn(1, c, 1, 1, generator=gen))
        elif isinstance(spec, FixedFilter):
            kernel = torch.tensor(FIXED_FILTERS[spec.kind]).expand(c, 1, 3, 3).clone()
            self.register_buffer("mask", kernel)
            self.scale = nn.Parameter(torch.randn(c, 1, 1, 1, generator=gen))
            self.groups = c
        elif isinstance(spec, AvgPool):
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
            if spec.after_conv:
                self.pre = nn.Conv2d(c, c, 1)
                with torch.no_grad():
                    self.pre.bias.copy_(torch.randn(c, generator=gen) + 1.0)
        elif isinstance(spec, Concat):
            self.a = _conv(c, c, spec.a) if spec.a else nn.Identity()
            self.b = _conv(c, c, spec.b) if spec.b else nn.Identity()
            self.fuse = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if isinstance(spec, Conv):
            return self.conv(x)
        if isinstance(spec, ConvBN):
            return self.bn(self.conv(x))
        if isinstance(spec, Chain):
            t = self.squeeze(x)
            p = spec.k // 2
            b = self.squeeze.bias.view(1, -1, 1, 1)
            if spec.pad == "shift":
                t = F.pad(t - b, (p, p, p, p)) + b
            elif spec.pad == "zero":
                t = F.pad(t, (p, p, p, p))
            else:
                t = F.pad(t, (p, p, p, p))
                t[:, :, :p, :] = b
                t[:, :, -p:, :] = b
                t[:, :, :, :p] = b
                t[:, :, :, -p:] = b
            return self.spread(t)
        if isinstance(spec, Identity):
            return x
        if isinstance(spec, Scale):
            return x * self.s
        if isinstance(spec, FixedFilter):
            return F.conv2d(x, self.mask * self.scale, padding=1, groups=self.groups)
        if isinstance(spec, AvgPool):
            return self.pool(self.pre(x) if spec.after_conv else x)
        assert isinstance(spec, Concat)
        return self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))


class RandomRegionNet(nn.Module):
    """stem → PReLU → Σ branches → PReLU (used in float64: ``.double()``)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(spec.seed)
        torch.manual_seed(spec.seed)
        c = spec.channels
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.act_in = nn.PReLU(c, init=0.1)
        self.branches = nn.ModuleList(BranchModule(b, c, gen) for b in spec.branches)
        self.act_out = nn.PReLU(c, init=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_in(self.stem(x))
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        return self.act_out(y)


# ----------------------------------------------------------------------------- strategies

ks = st.sampled_from([1, 3, 5])
branches = st.one_of(
    st.builds(Conv, k=ks, depthwise=st.booleans(), dilation=st.sampled_from([1, 2])),
    st.builds(ConvBN, k=ks, depthwise=st.booleans()),
    st.builds(
        Chain,
        k=st.sampled_from([3, 5]),
        expand=st.sampled_from([2, 8]),
        pad=st.sampled_from(["setitem", "shift", "zero"]),
    ),
    st.builds(Identity),
    st.builds(Scale),
    st.builds(FixedFilter, kind=st.sampled_from(sorted(FIXED_FILTERS))),
    st.builds(AvgPool, after_conv=st.booleans()),
    st.builds(Concat, a=st.sampled_from([0, 1, 3]), b=st.sampled_from([0, 1, 3])),
)
specs = st.builds(
    Spec,
    channels=st.sampled_from([4, 6]),
    branches=st.lists(branches, min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**16),
)


#: Always tried besides the drawn specs: each corner of the decision (b) must take.
DRIFTING = Spec(4, (Chain(3, 8, "zero"), Identity()), seed=11)  # foldable, drifts
POOL_DRIFTING = Spec(4, (AvgPool(after_conv=True), Conv(3, False, 1)), seed=12)
DEAR = Spec(4, (Conv(5, True, 2), Conv(1, False, 1)), seed=13)  # a full 9×9 costs more
MIXED = Spec(6, (Chain(5, 8, "setitem"), FixedFilter("laplacian"), Scale(), Concat(3, 0)), seed=14)
DEPTHWISE = Spec(4, (Conv(5, True, 1), FixedFilter("sobel_y"), AvgPool(False), Scale()), seed=15)


def with_corners(test):
    for spec in (DRIFTING, POOL_DRIFTING, DEAR, MIXED, DEPTHWISE):
        test = example(spec=spec)(test)
    return test


# ----------------------------------------------------------------------------- helpers

CONTEXT = PassContext(data_range=1.0, sample_hw=(16, 16))
DRIFT_CONTEXT = PassContext(data_range=1.0, sample_hw=(16, 16), accept_border_drift=True)


def graph_convs(model: nn.Module) -> int:
    """Conv modules called plus F.conv2d calls in the model's fx graph."""
    return count_convs(model)


def has_setitem(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and any(
        n.target is operator.setitem for n in model.graph.nodes
    )


def inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [
        torch.randn(1, 3, *IMAGE_HW, generator=gen, dtype=torch.float64),
        torch.rand(2, 3, IMAGE_HW[1], IMAGE_HW[0], generator=gen, dtype=torch.float64),
    ]


def relative_error(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> float:
    if border:
        a = a[..., border:-border, border:-border]
        b = b[..., border:-border, border:-border]
    return float((a - b).abs().max()) / (float(b.abs().max()) or 1.0)


def fold(spec: Spec, context: PassContext):
    model = RandomRegionNet(spec).double().eval()
    with torch.no_grad():
        reference = [model(x) for x in inputs()]
    outcome = FoldReparam().run(model, context)
    with torch.no_grad():
        folded = [outcome.model(x) for x in inputs()]
    return model, reference, outcome, folded


STEM_CONVS = 1


# ----------------------------------------------------------------------------- properties


def test_spec_model_counts_its_convs() -> None:
    """The test's own bookkeeping: the graph has the convs the spec predicts."""
    spec = Spec(4, (Chain(3, 2, "setitem"), FixedFilter("sobel_x"), Concat(3, 0)), seed=1)
    assert graph_convs(RandomRegionNet(spec)) - STEM_CONVS == spec.region_convs == 5


@SETTINGS
@given(spec=specs)
@with_corners
def test_fold_reparam_is_exact(spec: Spec) -> None:
    """(a) equal to 1e-9 at every pixel when no border drift was reported."""
    _, reference, outcome, folded = fold(spec, CONTEXT)
    assert outcome.border_drift == 0.0  # not accepted: never folded with drift
    for got, want in zip(folded, reference, strict=True):
        assert got.dtype == torch.float64
        assert relative_error(got, want) <= RTOL, outcome.details


@SETTINGS
@given(spec=specs)
@with_corners
def test_fold_reparam_leaves_one_conv(spec: Spec) -> None:
    """(b) the region becomes one conv, or is left for a reason the test predicts."""
    model, _, outcome, _ = fold(spec, CONTEXT)
    before = graph_convs(model) - STEM_CONVS
    after = graph_convs(outcome.model) - STEM_CONVS
    assert before == spec.region_convs
    text = " ".join(outcome.details)
    event("folded" if outcome.modified else "left")
    event(f"drifts={spec.drifts} too_dear={spec.too_dear} foldable={spec.foldable}")
    if spec.foldable and not spec.drifts:
        assert outcome.modified, (spec, outcome.details)
        assert after == 1, (spec, outcome.details)
        assert not has_setitem(outcome.model)  # the bias-padding writes went with the region
    elif spec.foldable:  # would drift: left, and the user is told how to fold it anyway
        assert not outcome.modified
        assert after == before
        assert "--accept-border-drift" in text, outcome.details
    else:  # nothing to gain: no conv at all, already one conv, or a dearer kernel
        assert not outcome.modified, (spec, outcome.details)
        assert after == before


@SETTINGS
@given(spec=specs)
@example(spec=DEAR)
def test_dearer_fold_is_reported(spec: Spec) -> None:
    """(b) a region left because its fold would cost more is said so in the details."""
    assume(spec.has_work and not spec.single_conv and spec.too_dear)
    _, _, outcome, _ = fold(spec, CONTEXT)
    assert not outcome.modified
    assert any("cost" in d or "dearer" in d or "expensive" in d for d in outcome.details), (
        spec,
        outcome.details,
    )


@SETTINGS
@given(spec=specs)
@with_corners
def test_fold_reparam_with_accepted_drift(spec: Spec) -> None:
    """(c) one conv whenever the fold pays off; the interior matches, the border only if exact."""
    model, reference, outcome, folded = fold(spec, DRIFT_CONTEXT)
    after = graph_convs(outcome.model) - STEM_CONVS
    if not spec.foldable:
        assert not outcome.modified
        return
    assert outcome.modified and after == 1, (spec, outcome.details)
    for got, want in zip(folded, reference, strict=True):
        assert relative_error(got, want, border=spec.radius) <= RTOL
    if spec.drifts:
        assert outcome.border_drift > RTOL
        assert "border drift" in " ".join(outcome.details)
        assert max(relative_error(g, w) for g, w in zip(folded, reference, strict=True)) > RTOL
    else:
        assert outcome.border_drift == 0.0
        assert all(relative_error(g, w) <= RTOL for g, w in zip(folded, reference, strict=True))


@pytest.mark.parametrize("pad", ["setitem", "shift"])
def test_bias_padded_chain_with_identity_is_one_exact_conv(pad: str) -> None:
    """A fixed example of the drawn family (ECB-like: 1×1→bias-padded 3×3 + identity + BN)."""
    spec = Spec(4, (Chain(3, 8, pad), Identity(), ConvBN(3, False)), seed=3)
    assert spec.foldable and not spec.drifts
    _, reference, outcome, folded = fold(spec, CONTEXT)
    assert outcome.modified
    assert graph_convs(outcome.model) - STEM_CONVS == 1
    assert all(relative_error(g, w) <= RTOL for g, w in zip(folded, reference, strict=True))
