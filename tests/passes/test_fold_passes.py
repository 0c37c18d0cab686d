"""The graph-folding passes on concrete models: equivalence, structure, and nothing-to-do cases.

Every pass gets the three kinds of tests of design.md ("Style"): its output equals its input
(numerically), the graph changed the way the pass's math says (counts computed here in closed
form), and graphs where it must do nothing are left untouched. The models are written here,
with their own class names and branch layouts, so the passes cannot recognise them by name.
The pass manager's verification (a wrong pass, a crashing pass, the recorded counts) and one
end-to-end compile through :func:`esr_deploy.compiling.compile_model` close the file.
Random property tests on generated regions are in ``test_pass_properties.py`` beside it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from esr_deploy.compiling.frontend import run_passes
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.errors import PassError
from esr_deploy.export import derive_input_range
from esr_deploy.loading.detect import ModelSource
from esr_deploy.passes import (
    DEFAULT_PASSES,
    PASSES,
    FoldBatchNorm,
    FoldIdentity,
    FoldReparam,
    MergeLinearChains,
    build_passes,
)
from esr_deploy.passes.affine_ops import count_convs, trace
from esr_deploy.passes.base import Pass, PassContext, PassManager, PassOutcome
from esr_deploy.recipe import recipe_from_arch

REPO = Path(__file__).resolve().parents[2]
C = 8  # feature channels: small, so the file runs in seconds on 2 cores
HW = (16, 16)
CONTEXT = PassContext(data_range=1.0, sample_hw=HW)
DRIFT = PassContext(data_range=1.0, sample_hw=HW, accept_border_drift=True)
EXACT_TOL = 1e-5  # design.md: exact algebraic passes, max abs error relative to the range


# ----------------------------------------------------------------------------- helpers


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights (and BN statistics) from a fixed seed, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def images(channels: int = 3, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [
        torch.rand(1, channels, 19, 23, generator=gen, dtype=dtype),
        torch.rand(2, channels, 16, 13, generator=gen, dtype=dtype),
    ]


def outputs(model: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(x) for x in xs]


def rel_error(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> float:
    """max |a - b| relative to the span of ``b`` (at least 1, the data range)."""
    span = max(float(b.max() - b.min()), 1.0)
    if border:
        a, b = a[..., border:-border, border:-border], b[..., border:-border, border:-border]
    return float((a - b).abs().max()) / span


def max_rel_error(before: nn.Module, after: nn.Module, border: int = 0, **kw) -> float:
    xs = images(**kw)
    return max(
        rel_error(a, b, border)
        for a, b in zip(outputs(after, xs), outputs(before, xs), strict=True)
    )


def convs_in(model: nn.Module) -> int:
    """Conv modules called plus F.conv2d calls in the model's fx graph."""
    return count_convs(model)


def modules_of(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def conv_modules_called(model: nn.Module) -> list[nn.Conv2d]:
    gm = trace(model)
    return [
        gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    ]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bias_pad(t: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """Pad ``t`` by ``p`` with its per-channel ``bias`` (ECB / RRRB style writes)."""
    b = bias.view(1, -1, 1, 1)
    t = F.pad(t, (p, p, p, p))
    t[:, :, :p, :] = b
    t[:, :, -p:, :] = b
    t[:, :, :, :p] = b
    t[:, :, :, -p:] = b
    return t


# ----------------------------------------------------------------------------- 1. a user block


class TriBranch(nn.Module):
    """5×5 depthwise + 1×1→3×3 (bias-padded) + dilated 3×3 + a scaled identity (C→C)."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        self.wide_dw = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.squeeze = nn.Conv2d(channels, expand, 1)
        self.mix = nn.Conv2d(expand, channels, 3)  # valid: its input is padded with the bias
        self.sparse = nn.Conv2d(channels, channels, 3, padding=2, dilation=2)
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        routed = self.mix(bias_pad(self.squeeze(feat), self.squeeze.bias, 1))
        return self.wide_dw(feat) + routed + self.sparse(feat) + feat * self.gain


class TriNet(nn.Module):
    """head → (TriBranch → LeakyReLU) × 2 → tail → pixel shuffle."""

    def __init__(self, channels: int = C, expand: int = 2 * C, scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.trunk = nn.Sequential(
            TriBranch(channels, expand),
            nn.LeakyReLU(0.1),
            TriBranch(channels, expand),
            nn.LeakyReLU(0.1),
        )
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.tail(self.trunk(self.head(x))))


def test_user_multi_branch_block_folds_to_closed_form() -> None:
    scale, c = 2, C
    model = seeded(TriNet(c, 2 * c, scale), seed=1)
    recipe = recipe_from_arch("tests.passes.test_fold_passes:TriNet", {}, scale, 1.0)
    deploy, results = run_passes(
        model, recipe, derive_input_range(model, scale), [], None, accept_border_drift=False
    )
    # Each TriBranch has radius max(2, 1, 2) = 2 and cross-channel terms: one full 5×5 conv.
    # The head is not folded into the first block: its biased output is zero-padded by the
    # block's convs (border drift), so the block is folded below the head's fan-out.
    per_block = c * c * 5 * 5 + c
    head = 3 * c * 9 + c
    tail = c * 3 * scale**2 * 9 + 3 * scale**2
    assert convs_in(deploy) == 4
    assert n_params(deploy) == head + 2 * per_block + tail
    folded = [m for m in conv_modules_called(deploy) if m.kernel_size == (5, 5)]
    assert len(folded) == 2 and all(m.groups == 1 and m.padding == (2, 2) for m in folded)
    assert not modules_of(deploy, TriBranch)
    assert max_rel_error(model, deploy) <= EXACT_TOL
    reparam = next(r for r in results if r.name == "fold-reparam")
    assert reparam.modified and (reparam.convs_before, reparam.convs_after) == (2 + 2 * 4, 4)
    assert reparam.max_abs_error <= EXACT_TOL


def test_float64_model_folds_exactly_in_float64() -> None:
    model = seeded(TriNet(4, 8, 2), seed=2).double()
    outcome = FoldReparam().run(copy.deepcopy(model), CONTEXT)
    assert outcome.modified
    assert all(p.dtype == torch.float64 for p in outcome.model.parameters())
    assert max_rel_error(model, outcome.model, dtype=torch.float64) <= 1e-12


# ----------------------------------------------------------------------------- 2. nothing to do


class ConvReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class StridedThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, C, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(C, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.down(x))


class MeanGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.a(x)
        return self.b(t * t.mean(dim=(2, 3), keepdim=True))


class SigmoidGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.gate = nn.Conv2d(C, C, 1)
        self.b = nn.Conv2d(C, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.a(x)
        return self.b(t * torch.sigmoid(self.gate(t)))


class PositionalBias(nn.Module):
    """A spatially varying constant: not shift-invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.pos = nn.Parameter(torch.zeros(1, C, *HW))
        self.b = nn.Conv2d(C, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + self.pos)


class PlainConvRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, C, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(C, C, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(C, 3, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


NOTHING_TO_FOLD = [
    ConvReluConv,
    StridedThenConv,
    MeanGate,
    SigmoidGate,
    PositionalBias,
    PlainConvRelu,
]


@pytest.mark.parametrize("pass_name", sorted(PASSES))
@pytest.mark.parametrize("make", NOTHING_TO_FOLD, ids=lambda m: m.__name__)
def test_pass_leaves_unfoldable_graph_alone(make: type[nn.Module], pass_name: str) -> None:
    model = seeded(make(), seed=3)
    graph_before = trace(model).code
    x = torch.rand(1, 3, *HW, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    outcome = PASSES[pass_name]().run(copy.deepcopy(model), CONTEXT)
    assert not outcome.modified, outcome.details
    assert trace(outcome.model).code == graph_before
    assert convs_in(outcome.model) == convs_in(model)
    with torch.no_grad():
        assert torch.equal(outcome.model(x), y)


@pytest.mark.parametrize(
    "make",
    [m for m in NOTHING_TO_FOLD if m is not PositionalBias],  # counts run at 256×256
    ids=lambda m: m.__name__,
)
def test_pipeline_leaves_unfoldable_graph_alone(make: type[nn.Module]) -> None:
    model = seeded(make(), seed=3)
    x = torch.rand(1, 3, *HW, generator=torch.Generator().manual_seed(0))
    manager = PassManager(build_passes(DEFAULT_PASSES), CONTEXT, [x])
    deploy, results = manager.run(copy.deepcopy(model))
    assert [r.name for r in results] == list(DEFAULT_PASSES)
    assert not any(r.modified for r in results)
    assert all(r.convs_before == r.convs_after and r.max_abs_error == 0.0 for r in results)
    with torch.no_grad():
        assert torch.equal(deploy(x), model(x))


# ----------------------------------------------------------------------------- 3. border drift


class ZeroPaddedChain(nn.Module):
    """1×1 conv with bias → zero-padded 3×3 conv, between ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.point = nn.Conv2d(C, 2 * C, 1)
        self.spatial = nn.Conv2d(2 * C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.spatial(self.point(torch.relu(self.head(x)))))


@pytest.mark.parametrize("pass_cls", [FoldReparam, MergeLinearChains])
def test_zero_padded_bias_is_border_drift(pass_cls: type[Pass]) -> None:
    model = seeded(ZeroPaddedChain(), seed=4)
    with torch.no_grad():
        model.point.bias.fill_(0.5)  # a clearly nonzero bias, zero-padded by the 3×3
    left = pass_cls().run(copy.deepcopy(model), CONTEXT)
    assert not left.modified
    assert left.border_drift == 0.0
    assert any("--accept-border-drift" in d for d in left.details), left.details
    assert convs_in(left.model) == 3

    accepted = pass_cls().run(copy.deepcopy(model), DRIFT)
    assert accepted.modified
    assert convs_in(accepted.model) == 2
    assert accepted.border_drift > 1e-4
    assert any("border drift" in d and "accepted" in d for d in accepted.details)
    # the output pixel (i, j) of the folded 3×3 differs only where its window leaves the image
    assert max_rel_error(model, accepted.model, border=1) <= EXACT_TOL
    assert max_rel_error(model, accepted.model) > 1e-4


def test_pass_manager_records_accepted_drift() -> None:
    model = seeded(ZeroPaddedChain(), seed=4)
    with torch.no_grad():
        model.point.bias.fill_(0.5)
    manager = PassManager([FoldReparam()], DRIFT, images())
    deploy, (result,) = manager.run(copy.deepcopy(model))
    assert result.modified and result.border_drift > 1e-4
    assert result.max_abs_error > EXACT_TOL  # recorded, not rejected: the user asked for it
    assert (result.convs_before, result.convs_after) == (3, 2)


# ----------------------------------------------------------------------------- 4. fold-bn


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.out = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.conv(x))))


class BNThenConv(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.conv = nn.Conv2d(C, C, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(self.bn(torch.relu(self.head(x)))))


class LoneBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.tail = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.bn(torch.relu(self.head(x)))))


def _no_bn(model: nn.Module) -> bool:
    gm = trace(model)
    return not modules_of(model, nn.BatchNorm2d) and not any(
        n.target is F.batch_norm for n in gm.graph.nodes
    )


def test_fold_bn_after_conv() -> None:
    model = seeded(ConvBN(), seed=5)
    outcome = FoldBatchNorm().run(copy.deepcopy(model), CONTEXT)
    assert outcome.modified and _no_bn(outcome.model)
    assert convs_in(outcome.model) == 2
    assert n_params(outcome.model) == n_params(model) - 2 * C  # γ and β gone
    assert max_rel_error(model, outcome.model) <= EXACT_TOL


def test_fold_bn_before_pointwise_conv_is_exact() -> None:
    model = seeded(BNThenConv(1), seed=6)
    outcome = FoldBatchNorm().run(copy.deepcopy(model), CONTEXT)
    assert outcome.modified and _no_bn(outcome.model)
    assert outcome.border_drift == 0.0
    assert convs_in(outcome.model) == 2
    assert max_rel_error(model, outcome.model) <= EXACT_TOL


def test_fold_bn_before_zero_padded_conv_is_border_drift() -> None:
    model = seeded(BNThenConv(3), seed=6)
    # not merged into the zero-padded conv (it would drift at the border, and says so);
    # folded instead, exactly, as a lone BN: a depthwise 1x1 conv between head and conv
    left = FoldBatchNorm().run(copy.deepcopy(model), CONTEXT)
    assert any("--accept-border-drift" in d for d in left.details), left.details
    assert left.modified and _no_bn(left.model) and left.border_drift == 0.0
    assert convs_in(left.model) == 3
    assert max_rel_error(model, left.model) <= EXACT_TOL

    accepted = FoldBatchNorm().run(copy.deepcopy(model), DRIFT)
    assert accepted.modified and _no_bn(accepted.model)
    assert convs_in(accepted.model) == 2
    assert accepted.border_drift > 1e-4
    assert max_rel_error(model, accepted.model, border=1) <= EXACT_TOL


def test_lone_bn_becomes_depthwise_conv() -> None:
    model = seeded(LoneBN(), seed=7)
    outcome = FoldBatchNorm().run(copy.deepcopy(model), CONTEXT)
    assert outcome.modified and _no_bn(outcome.model)
    assert convs_in(outcome.model) == 3
    (new,) = [m for m in conv_modules_called(outcome.model) if m.kernel_size == (1, 1)]
    assert new.groups == C and new.in_channels == new.out_channels == C
    assert max_rel_error(model, outcome.model) <= EXACT_TOL


class BNNet(nn.Module):
    """A small x4 SR net with BatchNorm after and between convs (compiled end to end)."""

    def __init__(self, channels: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(channels)
        self.body = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = torch.relu(self.bn0(self.head(x)))
        feat = torch.relu(self.bn1(self.body(feat)))
        base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return base + 0.1 * self.up(self.tail(feat))


def test_compile_folds_batchnorm_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)  # --arch is resolved from the current directory
    model = seeded(BNNet(), seed=8)
    ckpt = tmp_path / "bnnet.pth"
    torch.save(model.state_dict(), ckpt)
    result = compile_model(
        CompileOptions(
            source=ModelSource(
                checkpoint=ckpt,
                arch="tests.passes.test_fold_passes:BNNet",
                arch_args=json.dumps({"channels": 8, "scale": 4}),
                scale=4,
                data_range=1.0,
            ),
            val_dirs=(),  # the packaged set (x4)
            out=tmp_path / "bundle",
            latency_shapes=(),
        )
    )
    onnx_model = onnx.load(str(result.bundle / "model.fp32.onnx"))
    ops = {n.op_type for n in onnx_model.graph.node}
    assert "BatchNormalization" not in ops
    passes = {p["name"]: p for p in result.manifest["passes"]}
    folded = [p for n, p in passes.items() if n in ("fold-bn", "fold-reparam") and p["modified"]]
    assert folded, result.manifest["passes"]
    assert all(p["convs_after"] <= p["convs_before"] for p in folded)
    assert folded[0]["params_after"] < folded[0]["params_before"]
    assert result.manifest["metrics"]["onnx_convs"] == 3


# ----------------------------------------------------------------------------- 5. fold-identity


class ConvPlusSkip(nn.Module):
    def __init__(self, other_skip: bool = False) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.tail = nn.Conv2d(C, 3, 3, padding=1)
        self.other_skip = other_skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        a = torch.relu(h)
        skip = h if self.other_skip else a  # other_skip: the conv reads a, the skip is h
        return self.tail(torch.relu(self.conv(a) + skip))


def test_fold_identity_puts_identity_in_centre_tap() -> None:
    model = seeded(ConvPlusSkip(), seed=9)
    outcome = FoldIdentity().run(copy.deepcopy(model), CONTEXT)
    assert outcome.modified
    assert convs_in(outcome.model) == 3
    folded = [m for m in conv_modules_called(outcome.model) if m.in_channels == m.out_channels]
    (conv,) = folded
    expected = model.conv.weight.detach().clone()
    expected[torch.arange(C), torch.arange(C), 1, 1] += 1.0
    torch.testing.assert_close(conv.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(conv.bias, model.conv.bias, rtol=0, atol=1e-6)
    assert max_rel_error(model, outcome.model) <= EXACT_TOL


def test_fold_identity_leaves_skip_from_another_tensor() -> None:
    model = seeded(ConvPlusSkip(other_skip=True), seed=9)
    outcome = FoldIdentity().run(copy.deepcopy(model), CONTEXT)
    assert not outcome.modified, outcome.details
    assert convs_in(outcome.model) == 3
    assert max_rel_error(model, outcome.model) == 0.0


# ----------------------------------------------------------------------------- 6. chains


class BiasPaddedChain(nn.Module):
    """1×1 → 3×3 (input padded with the 1×1's bias) → 1×1, between ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.expand = nn.Conv2d(C, 2 * C, 1)
        self.spatial = nn.Conv2d(2 * C, 2 * C, 3)
        self.reduce = nn.Conv2d(2 * C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.expand(torch.relu(self.head(x)))
        return torch.relu(self.reduce(self.spatial(bias_pad(t, self.expand.bias, 1))))


class TwoThrees(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.a = nn.Conv2d(C, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(torch.relu(self.head(x)))))


def test_merge_chain_1x1_3x3_1x1_is_one_3x3() -> None:
    model = seeded(BiasPaddedChain(), seed=10)
    outcome = MergeLinearChains().run(copy.deepcopy(model), CONTEXT)
    assert outcome.modified and outcome.border_drift == 0.0
    assert convs_in(outcome.model) == 2
    merged = [m for m in conv_modules_called(outcome.model) if m is not outcome.model.head]
    (conv,) = merged
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (C, C, (3, 3))
    assert conv.padding == (1, 1) and conv.groups == 1
    assert max_rel_error(model, outcome.model) <= EXACT_TOL


def test_merge_chain_keeps_dearer_3x3_3x3() -> None:
    model = seeded(TwoThrees(), seed=11)
    for pass_cls in (MergeLinearChains, FoldReparam):
        outcome = pass_cls().run(copy.deepcopy(model), CONTEXT)
        assert not outcome.modified, outcome.details
        assert convs_in(outcome.model) == 3


# ----------------------------------------------------------------------------- 7. the manager


class RepBlockNet(nn.Module):
    """RepVGG-like: 3×3 + 1×1 + identity between ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.k3 = nn.Conv2d(C, C, 3, padding=1)
        self.k1 = nn.Conv2d(C, C, 1)
        self.tail = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.head(x))
        return self.tail(torch.relu(self.k3(h) + self.k1(h) + h))


class PerturbConv(Pass):
    """Deliberately wrong: nudges a conv's weight and claims the model is equivalent."""

    name = "perturb-conv"

    def run(self, model: nn.Module, context: PassContext) -> PassOutcome:
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.weight.add_(1e-2)
        return PassOutcome(model=model, modified=True)


class Crashes(Pass):
    name = "crash-pass"

    def run(self, model: nn.Module, context: PassContext) -> PassOutcome:
        raise RuntimeError("boom in the pass")


def test_manager_rejects_wrong_pass_naming_it_and_its_predecessor() -> None:
    model = seeded(RepBlockNet(), seed=12)
    manager = PassManager([FoldReparam(), PerturbConv()], CONTEXT, images())
    with pytest.raises(PassError) as info:
        manager.run(copy.deepcopy(model))
    msg = str(info.value)
    assert "'perturb-conv'" in msg and "passes before it: fold-reparam" in msg


def test_manager_names_a_crashing_pass() -> None:
    model = seeded(RepBlockNet(), seed=12)
    manager = PassManager([FoldBatchNorm(), Crashes()], CONTEXT, images())
    with pytest.raises(PassError) as info:
        manager.run(copy.deepcopy(model))
    msg = str(info.value)
    assert "'crash-pass'" in msg and "fold-bn" in msg
    assert "RuntimeError" in msg and "boom in the pass" in msg
    assert isinstance(info.value.__cause__, RuntimeError)


def test_manager_counts_a_known_fold() -> None:
    model = seeded(RepBlockNet(), seed=12)
    manager = PassManager([FoldReparam(), FoldIdentity()], CONTEXT, images())
    deploy, (reparam, identity) = manager.run(copy.deepcopy(model))
    head, tail = 3 * C * 9 + C, C * 3 * 9 + 3
    k3, k1 = C * C * 9 + C, C * C + C
    assert reparam.modified
    assert (reparam.convs_before, reparam.convs_after) == (4, 3)
    assert (reparam.params_before, reparam.params_after) == (
        head + k3 + k1 + tail,
        head + k3 + tail,
    )
    hw = 256 * 256  # flops are counted at the NTIRE 256×256
    assert reparam.flops_before - reparam.flops_after == C * C * hw
    assert reparam.max_abs_error <= EXACT_TOL
    assert not identity.modified  # nothing left for it
    assert (identity.convs_before, identity.convs_after) == (3, 3)
    assert n_params(deploy) == reparam.params_after
    assert max_rel_error(model, deploy) <= EXACT_TOL


# ----------------------------------------------------------------------------- 8. untraceable


class DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.k3 = nn.Conv2d(C, C, 3, padding=1)
        self.k1 = nn.Conv2d(C, C, 1)
        self.tail = nn.Conv2d(C, 3 * 4, 3, padding=1)
        self.up = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.head(x))
        if x.sum() > 0:  # Python control flow on data: torch.fx cannot trace it
            h = self.k3(h) + self.k1(h)
        return self.up(self.tail(h))


# the folding passes trace with torch.fx; prune-channels follows autograd and is not affected
FX_PASSES = sorted(n for n in PASSES if n != "prune-channels")


@pytest.mark.parametrize("pass_name", FX_PASSES)
def test_untraceable_model_is_reported_and_kept(pass_name: str) -> None:
    model = seeded(DataDependentBranch(), seed=13)
    outcome = PASSES[pass_name]().run(model, CONTEXT)
    assert not outcome.modified
    assert outcome.model is model
    assert any("cannot be traced" in d for d in outcome.details), outcome.details


def test_untraceable_model_still_compiles_passes() -> None:
    model = seeded(DataDependentBranch(), seed=13)
    recipe = recipe_from_arch("tests.passes.test_fold_passes:DataDependentBranch", {}, 2, 1.0)
    deploy, results = run_passes(
        model, recipe, derive_input_range(model, 2), [], None, accept_border_drift=False
    )
    assert [r.name for r in results] == list(DEFAULT_PASSES)
    assert not any(r.modified for r in results)
    folding = [r for r in results if r.name in FX_PASSES]
    assert all(any("cannot be traced" in d for d in r.details) for r in folding)
    assert isinstance(deploy, DataDependentBranch) and not isinstance(deploy, fx.GraphModule)
    assert max_rel_error(model, deploy) == 0.0


class InteriorWrite(nn.Module):
    """A write at a fixed interior row is not shift-invariant: never part of a region."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 1)
        self.b = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y[:, :, 20:21, :] = 1.0
        return torch.relu(self.b(y))


def test_interior_write_is_not_folded_even_with_drift_accepted() -> None:
    model = InteriorWrite().eval()
    for context in (CONTEXT, DRIFT):
        outcome = FoldReparam().run(copy.deepcopy(model), context)
        assert not outcome.modified
        x = torch.rand(1, 3, 45, 61)
        with torch.no_grad():
            assert float((outcome.model(x) - model(x)).abs().max()) == 0.0


class FunctionalDropout(nn.Module):
    """F.dropout without training= drops even in eval mode (its default is training=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(F.dropout(self.a(x), 0.5)))


def test_functional_dropout_in_training_mode_is_not_an_identity() -> None:
    outcome = FoldReparam().run(copy.deepcopy(FunctionalDropout().eval()), CONTEXT)
    assert not outcome.modified
