"""The zoo's training-form (multi-branch) models: recipes, randomize(), tracing, deploy_spec().

Also checks what the folding passes rely on: every re-param block is, in eval mode, exactly
one zero-padded conv *including the image borders* (bias padding), measured against a
reference fold computed here from impulse responses in float64.
"""

from __future__ import annotations

import importlib
import inspect
import json
import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from esr_deploy.errors import RecipeError
from esr_deploy.passes.affine_ops import trace
from esr_deploy.recipe import find_recipe
from esr_deploy.zoo.reparam_blocks import (
    ECB,
    RRRB,
    DiverseBranchBlock,
    ExpandSqueezeRepConv,
    RepVGGBlock,
    bn_shift,
    pad_with_bias,
)
from esr_deploy.zoo.training import DeploySpec, deploy_spec, randomize

#: recipe name -> architecture
TRAINING = {
    "ecbsr_m4c16_x4": "esr_deploy.zoo.ecbsr:ECBSR",
    "fmen_train_x4": "esr_deploy.zoo.fmen_train:FMENTrain",
    "rlfn_rep_x4": "esr_deploy.zoo.rlfn_rep:RLFNRep",
    "repvgg_sr_x4": "esr_deploy.zoo.repvgg_sr:RepVGGSR",
    "dbb_sr_x4": "esr_deploy.zoo.dbb_sr:DBBSR",
}
#: models whose bias padding writes into padded tensors (``t[...] = bias``)
BIAS_PADDED = {"ecbsr_m4c16_x4", "fmen_train_x4", "dbb_sr_x4"}
ODD = (37, 53)


def build(name: str, seed: int | None = 0) -> nn.Module:
    model = find_recipe(name).build_model()
    if seed is not None:
        randomize(model, seed)
    return model.eval()


def odd_input(name: str) -> torch.Tensor:
    x = torch.rand(1, 3, *ODD, generator=torch.Generator().manual_seed(0))
    return x * find_recipe(name).data_range


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- recipes, randomize, shapes, tracing ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_recipe_writes_every_constructor_argument(name: str) -> None:
    recipe = find_recipe(name)
    assert recipe.name == name and recipe.arch == TRAINING[name]
    assert recipe.scale == recipe.arch_args["upscale"] == 4
    assert recipe.data_range in (1.0, 255.0)
    assert recipe.default_targets == ("ort-fp32",)
    module_name, class_name = recipe.arch.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(recipe.arch_args) == params
    json.dumps(dict(recipe.arch_args))  # JSON-serialisable, for manifest.json
    model = recipe.build_model()
    assert not model.training
    assert model.arch_args == dict(recipe.arch_args)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_randomize_is_deterministic_per_seed(name: str) -> None:
    a, b, c = build(name, 0), build(name, 0), build(name, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    float_keys = [k for k in sa if sa[k].is_floating_point() and not k.endswith("mask")]
    assert all(not torch.equal(sa[k], sc[k]) for k in float_keys)


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_randomize_changes_batchnorm_and_filter_scales(name: str) -> None:
    fresh, model = build(name, None), build(name, 3)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if name in ("fmen_train_x4", "repvgg_sr_x4", "dbb_sr_x4"):
        assert bns
    for bn in bns:
        assert bn.running_var is not None and bn.running_mean is not None
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert not torch.equal(bn.bias, torch.zeros_like(bn.bias))
    for (key, before), after in zip(
        fresh.state_dict().items(), model.state_dict().values(), strict=True
    ):
        if key.endswith(".scale"):  # ECB's learnable filter scales start at ~1e-3
            assert before.abs().max() < 0.01 < after.abs().max()


def test_randomize_with_calibration_normalises_batchnorm_inputs() -> None:
    x = odd_input("fmen_train_x4")
    a = randomize(build("fmen_train_x4", None), 5, calibration=x)
    b = randomize(build("fmen_train_x4", None), 5, calibration=x)
    assert not a.training
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    seen: list[torch.Tensor] = []
    bn3 = a.get_submodule("HFABs.0.bn3")
    handle = bn3.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        y = a(x)
    handle.remove()
    assert torch.isfinite(y).all()
    gate = torch.sigmoid(seen[0])
    assert 0.05 < float(((gate > 0.01) & (gate < 0.99)).float().mean())  # not saturated


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_odd_input_gives_scaled_output(name: str) -> None:
    model, x = build(name), odd_input(name)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, ODD[0] * 4, ODD[1] * 4)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_fx_trace_gives_identical_output(name: str) -> None:
    model, x = build(name), odd_input(name)
    gm = trace(model)  # the pipeline's tracer: records t[i] = v as operator.setitem
    writes = [n for n in gm.graph.nodes if n.target is operator.setitem]
    assert bool(writes) == (name in BIAS_PADDED)  # bias padding is in the graph
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    if name not in BIAS_PADDED:  # nothing to record beyond plain fx
        with torch.no_grad():
            assert torch.equal(fx.symbolic_trace(model)(x), model(x))


# --- deploy_spec ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_form_is_larger_than_its_deploy_form(name: str) -> None:
    model = build(name, None)
    spec = deploy_spec(name)
    assert spec == deploy_spec(model) == deploy_spec(find_recipe(name))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_params(model) > spec.params and convs >= spec.convs


def test_fmen_train_folds_to_the_official_deploy_counts() -> None:
    train, deploy = find_recipe("fmen_train_x4"), find_recipe("fmen_x4")
    shared = set(deploy.arch_args)
    assert shared < set(train.arch_args)
    assert {k: train.arch_args[k] for k in shared} == dict(deploy.arch_args)
    model = deploy.build_model()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert deploy_spec("fmen_train_x4") == DeploySpec(convs=convs, params=n_params(model))
    assert deploy_spec("fmen_train_x4") == DeploySpec(convs=34, params=341_066)


def test_rlfn_rep_folds_to_the_dipnet_deploy_counts() -> None:
    train, deploy = find_recipe("rlfn_rep_x4"), find_recipe("dipnet_x4")
    assert {k: train.arch_args[k] for k in deploy.arch_args} == dict(deploy.arch_args)
    model = deploy.build_model()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert deploy_spec("rlfn_rep_x4") == DeploySpec(convs=convs, params=n_params(model))
    assert deploy_spec("rlfn_rep_x4") == DeploySpec(convs=39, params=243_252)


def _plain_twin(cin: int, c: int, cout: int, m: int, k: int, prelu: bool) -> nn.Module:
    """The deploy form of ECBSR / RepVGG-SR / DBB-SR, written out with plain layers."""
    layers: list[nn.Module] = [nn.Conv2d(cin, c, k, padding=k // 2)]
    layers += [nn.PReLU(c)] if prelu else []
    for _ in range(m):
        layers.append(nn.Conv2d(c, c, k, padding=k // 2))
        layers += [nn.PReLU(c)] if prelu else []
    layers.append(nn.Conv2d(c, cout, k, padding=k // 2))
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    ("arch", "args", "twin"),
    [
        ("esr_deploy.zoo.ecbsr:ECBSR", {}, (3, 16, 48, 4, 3, True)),
        (
            "esr_deploy.zoo.ecbsr:ECBSR",
            {"num_modules": 2, "channels": 8, "upscale": 3, "act_type": "relu", "with_idt": True},
            (3, 8, 27, 2, 3, False),
        ),
        ("esr_deploy.zoo.repvgg_sr:RepVGGSR", {}, (3, 32, 48, 8, 3, False)),
        (
            "esr_deploy.zoo.repvgg_sr:RepVGGSR",
            {"feature_channels": 12, "num_blocks": 3, "upscale": 2},
            (3, 12, 12, 3, 3, False),
        ),
        ("esr_deploy.zoo.dbb_sr:DBBSR", {}, (3, 32, 48, 8, 3, False)),
        (
            "esr_deploy.zoo.dbb_sr:DBBSR",
            {"feature_channels": 10, "num_blocks": 2, "kernel_size": 5, "upscale": 2},
            (3, 10, 12, 2, 5, False),
        ),
    ],
)
def test_plain_deploy_spec_matches_a_plain_twin(
    arch: str, args: dict, twin: tuple[int, int, int, int, int, bool]
) -> None:
    module_name, class_name = arch.split(":")
    model = getattr(importlib.import_module(module_name), class_name)(**args)
    plain = _plain_twin(*twin)
    convs = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert deploy_spec(model) == DeploySpec(convs=convs, params=n_params(plain))


def test_deploy_spec_of_other_architectures_is_an_error() -> None:
    with pytest.raises(RecipeError, match="No closed-form deploy spec"):
        deploy_spec("rlfn_x4")


# --- every block is one conv, borders included --------------------------------------------


def reference_fold(
    block: Callable[[torch.Tensor], torch.Tensor], cin: int, radius: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of an affine shift-invariant ``block`` from impulse responses (float64).

    The impulse sits at the centre of a ``(4r + 3)^2`` zero image, far enough from the
    border that the extraction does not depend on how the block pads.
    """
    s = 4 * radius + 3
    c = s // 2
    zero = torch.zeros(1, cin, s, s, dtype=torch.float64)
    with torch.no_grad():
        base = block(zero)[0]
        bias = base[:, c, c].clone()
        kernel = torch.zeros(
            base.shape[0], cin, 2 * radius + 1, 2 * radius + 1, dtype=torch.float64
        )
        for i in range(cin):
            impulse = zero.clone()
            impulse[0, i, c, c] = 1.0
            y = block(impulse)[0] - base
            kernel[:, i] = y[:, c - radius : c + radius + 1, c - radius : c + radius + 1].flip(
                -2, -1
            )
    return kernel, bias


class _BNPadConv(nn.Module):
    """FMEN's HFAB squeeze path: BN -> pad with the BN shift -> valid 3x3 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_with_bias(self.bn(x), bn_shift(self.bn)))


class _ZeroPadded1x1Conv3x3(nn.Module):
    """1x1 conv with bias -> *zero* pad -> valid 3x3: not one conv at the border."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 2 * cout, 1)
        self.conv3 = nn.Conv2d(2 * cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.pad(self.conv1(x), (1, 1, 1, 1)))


BLOCKS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    # name: (factory, in channels, radius)
    "ecb": (lambda: ECB(5, 7, act_type="linear"), 5, 1),
    "ecb_identity": (lambda: ECB(6, 6, act_type="linear", with_idt=True), 6, 1),
    "rrrb": (lambda: RRRB(6, ratio=2), 6, 1),
    "hfab_bn_pad_conv": (lambda: _BNPadConv(5, 4), 5, 1),
    "repvgg_identity": (lambda: RepVGGBlock(6, 6), 6, 1),
    "repvgg": (lambda: RepVGGBlock(3, 8), 3, 1),
    "dbb": (lambda: DiverseBranchBlock(6, 6), 6, 1),
    "dbb_in_ne_out": (lambda: DiverseBranchBlock(3, 7), 3, 1),
    "dbb_5x5_conv1": (lambda: DiverseBranchBlock(4, 5, 5, internal_channels_1x1_kxk=6), 4, 2),
    "expand_squeeze_narrow": (lambda: ExpandSqueezeRepConv(7, 5, 16), 7, 1),
    "expand_squeeze_wide": (lambda: ExpandSqueezeRepConv(5, 7, 16, bias=True), 5, 1),
    "expand_squeeze_same": (lambda: ExpandSqueezeRepConv(6, 6, 16), 6, 1),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_is_one_conv_including_borders(name: str) -> None:
    factory, cin, radius = BLOCKS[name]
    block = randomize(factory(), 7).double().eval()
    kernel, bias = reference_fold(block, cin, radius)
    x = torch.randn(2, cin, 9, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    folded = F.conv2d(x, kernel, bias, padding=radius)
    scale = float(y.abs().max())
    assert float((y - folded).abs().max()) <= 1e-12 * scale


def test_zero_padding_a_biased_intermediate_is_not_one_conv_at_the_border() -> None:
    """The check above has teeth: without bias padding the border rows differ."""
    block = randomize(_ZeroPadded1x1Conv3x3(4, 5), 7).double().eval()
    kernel, bias = reference_fold(block, 4, 1)
    x = torch.randn(1, 4, 9, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        err = (block(x) - F.conv2d(x, kernel, bias, padding=1)).abs()
    assert float(err[..., 1:-1, 1:-1].max()) <= 1e-12 * float(err.max())  # interior exact
    assert float(err.max()) > 1e-3  # border not
