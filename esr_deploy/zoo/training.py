"""Helpers for the zoo's training-form (multi-branch) models.

* :func:`randomize`: random weights and random BatchNorm statistics, deterministic per seed.
  Folding must be exact whatever the weights, so tests of the folding passes start here
  (no training-form checkpoints of these models are published).
* :func:`deploy_spec`: the closed-form number of convs and of parameters of each model's
  deploy architecture, from its constructor arguments alone, to check what a folding pass
  produced.

What :func:`deploy_spec` counts
-------------------------------

The deploy architecture is what a perfect fold gives: every single-input linear
shift-invariant region (a re-param block with its BNs, a BN next to a conv) becomes one conv
with bias; convs separated by a nonlinearity (activation, sigmoid gating, max-pooling) or by
an op that is not shift-invariant (stride-2 conv, bilinear resize) stay separate. Regions
with two inputs -- a long skip added before the next conv (``conv(a + b)``) or ECBSR's
input skip -- are not merged, as in every published deploy model and as the design's
folding rule says ("such a region with one input is exactly one conv"). This is, for each
model, the architecture of its published deploy form (ECBSR's ``PlainSR``, FMEN's
``team03_fmen`` model, DIPNet's released model, a plain VGG net for RepVGG / DBB).

``convs`` counts ``Conv2d`` layers (1x1 and strided ones included, pixel shuffle and
pooling not). ``params`` counts every learnable tensor element of the deploy model: conv
weights, conv biases, PReLU slopes. A folded conv has a bias except where every branch is
bias-free and BN-free (DIPNet's trunk convs, whose published deploy convs have no bias);
a pass that emits an all-zero bias there adds ``out_channels`` parameters per such conv.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esr_deploy.data import load_validation_set, to_tensor
from esr_deploy.paths import default_val_dir
from esr_deploy.zoo.dbb_sr import DBBSR
from esr_deploy.zoo.ecbsr import ECBSR
from esr_deploy.zoo.fmen_train import FMENTrain
from esr_deploy.zoo.reparam_blocks import Conv1x1FixedFilter
from esr_deploy.zoo.repvgg_sr import RepVGGSR
from esr_deploy.zoo.rlfn_rep import RLFNRep

__all__ = [
    "TRAINING_ARCHITECTURES",
    "DeploySpec",
    "calibration_image",
    "deploy_spec",
    "randomize",
]


@dataclass(frozen=True)
class DeploySpec:
    """Conv count and parameter count of a deploy (folded) architecture."""

    convs: int
    params: int


# --- randomize -------------------------------------------------------------------------------


def _uniform(shape: torch.Size, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _normal(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    return std * torch.randn(shape, generator=g, dtype=torch.float64)


def calibration_image(data_range: float) -> torch.Tensor:
    """A real LR image as a model input in ``[0, data_range]`` (the first x4 LR image of the
    packaged validation set): BatchNorm statistics calibrated on it keep random-weight
    models well conditioned (``randomize(..., calibration=...)``)."""
    lr = load_validation_set(default_val_dir(), 4).pairs[0].lr
    return to_tensor(lr, data_range)


def randomize(model: nn.Module, seed: int, *, calibration: torch.Tensor | None = None) -> nn.Module:
    """Give ``model`` random parameters and BatchNorm statistics, in place; return it.

    Deterministic per ``seed`` (a private ``torch.Generator``; the global RNG is untouched).

    * conv-like weights (2-D or more): normal with std ``1 / sqrt(fan_in)``;
    * biases and other 1-D parameters: normal, std 0.1;
    * ECB filter scales (``Conv1x1FixedFilter.scale``): normal, std 0.2 (not the 1e-3 of
      the initialisation, so that the Sobel / Laplacian branches matter);
    * PReLU slopes: uniform(0.05, 0.3);
    * BatchNorm: ``weight`` uniform(0.5, 1.5), ``bias`` normal(0, 0.5), ``running_mean``
      normal(0, 0.5), ``running_var`` uniform(0.5, 2).

    With ``calibration`` (an input batch), the BN statistics are instead measured on it --
    one forward pass in training mode with a cumulative average, so every BN gets the
    batch statistics of its own input -- and then perturbed: ``running_var`` times
    uniform(0.5, 2), ``running_mean`` plus normal(0, 0.5) standard deviations. The BNs then
    normalise to O(1) values, so sigmoid gates (FMEN's HFAB) are not saturated and border
    errors in the paths behind them stay visible. The model's training flag is restored.
    """
    g = torch.Generator().manual_seed(seed)
    bns: list[nn.modules.batchnorm._BatchNorm] = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                bns.append(module)
                if module.affine:
                    module.weight.copy_(_uniform(module.weight.shape, 0.5, 1.5, g))
                    module.bias.copy_(_normal(module.bias.shape, 0.5, g))
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.copy_(_normal(module.running_mean.shape, 0.5, g))
                    module.running_var.copy_(_uniform(module.running_var.shape, 0.5, 2.0, g))
                continue
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.PReLU):
                    value = _uniform(p.shape, 0.05, 0.3, g)
                elif isinstance(module, Conv1x1FixedFilter) and name == "scale":
                    value = _normal(p.shape, 0.2, g)
                elif p.dim() >= 2:
                    value = _normal(p.shape, 1.0 / math.sqrt(p[0].numel()), g)
                else:
                    value = _normal(p.shape, 0.1, g)
                p.copy_(value)
    if calibration is not None and bns:
        _calibrate_batchnorm(model, bns, calibration, g)
    return model


def _calibrate_batchnorm(
    model: nn.Module,
    bns: list[nn.modules.batchnorm._BatchNorm],
    calibration: torch.Tensor,
    g: torch.Generator,
) -> None:
    """Set every BN's running stats to its input's batch stats, then perturb them."""
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: after one batch, exactly its statistics
        model.train()
        with torch.no_grad():
            model(calibration)
            for bn in bns:
                assert bn.running_mean is not None and bn.running_var is not None
                std = bn.running_var.sqrt()
                bn.running_mean.add_(std * _normal(std.shape, 0.5, g).to(std.dtype))
                bn.running_var.mul_(_uniform(std.shape, 0.5, 2.0, g).to(std.dtype))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)


# --- deploy_spec -----------------------------------------------------------------------------


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    """Parameters of a dense ``k x k`` conv ``cin -> cout``: weights plus optional bias."""
    return cin * cout * k * k + (cout if bias else 0)


def _ecbsr_spec(a: Mapping[str, Any]) -> DeploySpec:
    colors, m, c, s = a["colors"], a["num_modules"], a["channels"], a["upscale"]
    prelu = c if a["act_type"] == "prelu" else 0  # one PReLU slope per channel
    # head ECB (colors -> C), m body ECBs (C -> C), tail ECB (C -> colors*s^2): each folds
    # into one 3x3 conv with bias (every branch is a 3x3-equivalent, the identity too).
    convs = 1 + m + 1
    head = _conv(colors, c, 3) + prelu  # head conv + its PReLU
    body = m * (_conv(c, c, 3) + prelu)  # body convs + their PReLUs
    tail = _conv(c, colors * s * s, 3)  # tail conv, linear; the input skip has no parameters
    params = head + body + tail
    return DeploySpec(convs, params)


def _fmen_spec(a: Mapping[str, Any]) -> DeploySpec:
    cin, cout, nf, n = a["in_channels"], a["out_channels"], a["feature_channels"], a["num_blocks"]
    ups = a["up_blocks"] if a["up_blocks"] is not None else [2] + [1] * n
    s = a["upscale"]

    def hfab(mid: int, erbs: int) -> tuple[int, int]:
        # bn1 folds into squeeze (3x3 nf -> mid), bn2 and bn3 into excitate (3x3 mid -> nf);
        # each ERB is two RRRBs = two 3x3 convs mid -> mid (the LeakyReLU separates them).
        return 2 + 2 * erbs, _conv(nf, mid, 3) + erbs * 2 * _conv(mid, mid, 3) + _conv(mid, nf, 3)

    convs = 1 + 1  # head (3x3 cin -> nf), warmup.0 (3x3 nf -> nf); head also feeds the skip
    params = _conv(cin, nf, 3) + _conv(nf, nf, 3)
    c, p = hfab(a["warmup_mid_channels"], ups[0])  # warm-up HFAB
    convs, params = convs + c, params + p
    for i in range(n):
        c, p = hfab(a["mid_channels"], ups[i + 1])
        convs += 2 + c  # trunk ERB: two RRRBs, each one 3x3 nf -> nf
        params += 2 * _conv(nf, nf, 3) + p
    convs += 2  # lr_conv (3x3 nf -> nf) and the tail conv (3x3 nf -> cout*s^2)
    params += _conv(nf, nf, 3) + _conv(nf, cout * s * s, 3)
    return DeploySpec(convs, params)


def _rlfn_rep_spec(a: Mapping[str, Any]) -> DeploySpec:
    cin, cout, nf, s = a["in_channels"], a["out_channels"], a["feature_channels"], a["upscale"]
    mids = a["mid_channels"] if a["mid_channels"] is not None else [[38, 38]] * 4
    esas = a["esa_channels"] if a["esa_channels"] is not None else [16] * len(mids)
    b1, b2, b3, b5 = a["block_conv_bias"] if a["block_conv_bias"] is not None else [False] * 4
    eb = a["esa_bias"]
    convs = 1  # conv_1 (3x3 cin -> nf)
    params = _conv(cin, nf, 3, a["head_bias"])
    for (m1, m2), f in zip(mids, esas, strict=True):
        # c1_r, c2_r, c3_r: each re-param conv folds into one 3x3 conv (bias only if it had
        # biases); c5 is a 1x1 conv; ESA keeps its five convs (conv1 1x1, conv_f 1x1,
        # conv2 3x3 stride 2, conv3 3x3 after max-pooling, conv4 1x1 after the add with
        # the bilinear upsampling): nothing in ESA is a single-input linear chain.
        convs += 4 + 5
        params += _conv(nf, m1, 3, b1) + _conv(m1, m2, 3, b2) + _conv(m2, nf, 3, b3)
        params += _conv(nf, nf, 1, b5)
        params += _conv(nf, f, 1, eb) + _conv(f, f, 1, eb) + 2 * _conv(f, f, 3, eb)
        params += _conv(f, nf, 1, eb)
    convs += 2  # conv_2 (3x3 nf -> nf), upsampler conv (3x3 nf -> cout*s^2)
    params += _conv(nf, nf, 3, a["lr_conv_bias"]) + _conv(nf, cout * s * s, 3, a["upsampler_bias"])
    return DeploySpec(convs, params)


def _plain_spec(a: Mapping[str, Any], k: int) -> DeploySpec:
    cin, cout, c, m, s = (
        a["in_channels"],
        a["out_channels"],
        a["feature_channels"],
        a["num_blocks"],
        a["upscale"],
    )
    # head block, m body blocks and tail block each fold (BNs included) into one k x k conv
    # with bias; ReLU separates them and has no parameters.
    convs = 1 + m + 1
    params = _conv(cin, c, k) + m * _conv(c, c, k) + _conv(c, cout * s * s, k)
    return DeploySpec(convs, params)


#: Training-form architecture -> closed-form deploy spec from its constructor arguments.
_SPECS: dict[type[nn.Module], Callable[[Mapping[str, Any]], DeploySpec]] = {
    ECBSR: _ecbsr_spec,
    FMENTrain: _fmen_spec,
    RLFNRep: _rlfn_rep_spec,
    RepVGGSR: lambda a: _plain_spec(a, 3),
    DBBSR: lambda a: _plain_spec(a, a["kernel_size"]),
}

#: The training-form architectures, as recipe-style references.
TRAINING_ARCHITECTURES: tuple[str, ...] = tuple(
    f"{cls.__module__}:{cls.__qualname__}" for cls in _SPECS
)


def _full_args(cls: type[nn.Module], args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments with the signature's defaults filled in."""
    params = inspect.signature(cls.__init__).parameters
    full = {
        name: p.default
        for name, p in params.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }
    full.update(args)
    return full


def deploy_spec(recipe_name_or_model: str | nn.Module | Any) -> DeploySpec:
    """Closed-form conv and parameter counts of a training-form model's deploy architecture.

    Accepts a zoo recipe name or recipe path (``"fmen_train_x4"``), a
    :class:`esr_deploy.recipe.Recipe`, or a model instance of one of
    :data:`TRAINING_ARCHITECTURES`. See the module docstring for what is counted.
    """
    from esr_deploy.errors import RecipeError
    from esr_deploy.recipe import Recipe, find_recipe, import_arch

    cls: Any
    if isinstance(recipe_name_or_model, nn.Module):
        cls = type(recipe_name_or_model)
        args: Mapping[str, Any] = getattr(recipe_name_or_model, "arch_args", {})
    else:
        recipe = (
            recipe_name_or_model
            if isinstance(recipe_name_or_model, Recipe)
            else find_recipe(str(recipe_name_or_model))
        )
        cls = import_arch(recipe.arch)
        args = recipe.arch_args
    spec = _SPECS.get(cls)
    if spec is None:
        raise RecipeError(
            f"No closed-form deploy spec for {cls.__module__}:{cls.__qualname__} — it is not "
            f"one of the zoo's training-form architectures ({', '.join(TRAINING_ARCHITECTURES)})"
            " — count the folded model's convs and parameters instead."
        )
    return spec(_full_args(cls, args))
