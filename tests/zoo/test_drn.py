"""DRN (primal network, DRN-S x4 with DRC-style irregular widths): recipe, shapes, widths,
closed-form parameter count, and an end-to-end compile to ``ort-fp32``.

Accepted sizes: the LR input is resized to exactly ``4h x 4w`` before the two stride-2 down
blocks (``n -> ceil(n / 2)``), and ``4h`` is divisible by 4, so the down path ends at
``h x w`` and both pixel shuffles land on the skip sizes: every ``h, w >= 1`` works.
"""

from __future__ import annotations

import inspect
import json
import math
from typing import Any

import pytest
import torch
from torch import nn

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.data import load_validation_set, to_tensor
from esr_deploy.errors import RecipeError
from esr_deploy.loading.detect import ModelSource
from esr_deploy.paths import default_val_dir
from esr_deploy.recipe import find_recipe
from esr_deploy.zoo.drn import DRN, RCAB, ChannelAttention, DownBlock, MeanShift
from esr_deploy.zoo.training import randomize

NAME = "drn_s_x4"
ODD = (37, 53)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def closed_form_params(a: dict[str, Any]) -> int:
    """Parameters of DRN from its widths alone (see the layout in ``esr_deploy.zoo.drn``)."""
    cin, cout = a["in_channels"], a["out_channels"]
    c0, down, down_out = a["head_channels"], a["down_channels"], a["down_out_channels"]
    up, up_out = a["upsampler_channels"], a["up_out_channels"]
    levels = int(math.log2(a["upscale"]))
    skips = [c0, *down_out[:-1]]
    level_in = [down_out[-1]] + [up_out[i - 1] + skips[levels - i] for i in range(1, levels)]
    total = 2 * conv_params(3, 3, 1)  # sub_mean, add_mean
    total += conv_params(cin, c0, 3)  # head
    for p in range(levels):  # stride-2 conv and output conv, both bias-free
        total += conv_params(skips[p], down[p], 3, False)
        total += conv_params(down[p], down_out[p], 3, False)
    for i, f in enumerate(level_in):
        r = a["ca_channels"][i]
        for mid in a["rcab_channels"][i]:  # two 3x3 convs + channel attention (two 1x1)
            total += conv_params(f, mid, 3) + conv_params(mid, f, 3)
            total += conv_params(f, r, 1) + conv_params(r, f, 1)
        total += conv_params(f, 4 * up[i], 3) + conv_params(up[i], up_out[i], 1)
    total += conv_params(up_out[-1] + c0, cout, 3)  # the HR tail
    if a["intermediate_tails"]:
        total += sum(conv_params(f, cout, 3) for f in level_in)
    return total


def build(seed: int | None = 0) -> DRN:
    model = find_recipe(NAME).build_model()
    assert isinstance(model, DRN)
    if seed is not None:
        randomize(model, seed)
    return model.eval()


def calibration_image() -> torch.Tensor:
    return to_tensor(load_validation_set(default_val_dir(), 4).pairs[0].lr, 255.0)


def sane_random_weights(model: DRN, lr: torch.Tensor) -> DRN:
    """Random weights with an output in a sane 0..255 range, in place.

    ``randomize`` (std ``1/sqrt(fan_in)``) makes every RCAB a gain > 1; 60 of them grow the
    features about 100x and amplify fp32 rounding beyond what parity allows of a real model.
    So the second conv of each RCAB is scaled by 0.1 (trained residual branches are small
    too), MeanShift gets its fixed values back, and the HR tail is rescaled so that the
    output on ``lr`` has mean ``255 * rgb_mean`` and standard deviation 48.
    """
    randomize(model, seed=0, calibration=lr)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MeanShift):
                module.reset_shift()
            elif isinstance(module, RCAB):
                module.body[2].weight.mul_(0.1)
                module.body[2].bias.mul_(0.1)
        pre = model(lr) - model.add_mean.bias.view(1, 3, 1, 1)
        tail = model.tail[str(model.levels)]
        k = 48.0 / float(pre.std())
        tail.weight.mul_(k)
        tail.bias.sub_(pre.mean(dim=(0, 2, 3))).mul_(k)
    return model


# --- recipe, shapes ---------------------------------------------------------------------


def test_recipe_writes_every_constructor_argument() -> None:
    recipe = find_recipe(NAME)
    assert recipe.arch == "esr_deploy.zoo.drn:DRN"
    assert recipe.scale == recipe.arch_args["upscale"] == 4
    assert recipe.data_range == recipe.arch_args["rgb_range"] == 255.0
    assert recipe.default_targets == ("ort-fp32",)
    params = set(inspect.signature(DRN.__init__).parameters) - {"self"}
    assert set(recipe.arch_args) == params
    json.dumps(dict(recipe.arch_args))
    model = recipe.build_model()
    assert not model.training
    assert model.arch_args == dict(recipe.arch_args)  # type: ignore[attr-defined]


def test_recipe_widths_are_irregular_and_small() -> None:
    a = find_recipe(NAME).arch_args
    widths = [
        a["head_channels"],
        *a["down_channels"],
        *a["down_out_channels"],
        *(w for level in a["rcab_channels"] for w in level),
        *a["upsampler_channels"],
        *a["up_out_channels"],
    ]
    assert sum(w % 8 != 0 for w in widths) > 0.8 * len(widths)  # not a multiple-of-8 grid
    for level in a["rcab_channels"]:
        assert len(level) == 30 and len(set(level)) > 10  # DRN-S depth, a width per block
    assert n_params(build(None)) < 1_000_000


@pytest.mark.parametrize("hw", [ODD, (1, 1), (5, 2), (48, 48), (17, 64)])
def test_any_lr_size_gives_a_4x_output(hw: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        y = build()(x)
    assert y.shape == (1, 3, 4 * hw[0], 4 * hw[1])
    assert torch.isfinite(y).all()


# --- widths and parameters --------------------------------------------------------------


def test_parameter_count_is_the_closed_form_of_the_widths() -> None:
    recipe = find_recipe(NAME)
    model = build(None)
    assert n_params(model) == closed_form_params(dict(recipe.arch_args)) == 791_412
    no_tails = DRN(**{**recipe.arch_args, "intermediate_tails": False})
    assert n_params(no_tails) == closed_form_params(
        {**recipe.arch_args, "intermediate_tails": False}
    )


def test_defaults_are_drn_s_x4() -> None:
    """DRN-S x4 (n_feats 16, 30 RCABs per level): 4.8 M parameters (DRN/DRC model zoo)."""
    model = DRN()
    assert n_params(model) == closed_form_params(model.arch_args) == 4_804_065
    keys = set(model.state_dict())
    for key in (
        "sub_mean.weight",
        "head.weight",
        "down.0.dual_module.0.0.weight",
        "down.1.dual_module.1.weight",
        "up_blocks.0.29.body.3.conv_du.2.bias",
        "up_blocks.1.30.0.weight",
        "up_blocks.1.31.weight",
        "tail.0.weight",
        "tail.2.bias",
        "add_mean.bias",
    ):
        assert key in keys  # the official guoyongcs/DRN parameter names


def test_irregular_widths_appear_in_the_modules() -> None:
    a = find_recipe(NAME).arch_args
    model = build(None)
    assert model.head.out_channels == a["head_channels"]
    downs = [m for m in model.modules() if isinstance(m, DownBlock)]
    assert [d.dual_module[0][0].out_channels for d in downs] == a["down_channels"]
    assert [d.dual_module[0][0].stride for d in downs] == [(2, 2)] * 2
    assert [d.dual_module[1].out_channels for d in downs] == a["down_out_channels"]
    assert model.level_channels == (50, 54) and model.tail_channels == 26
    for i, level in enumerate(model.up_blocks):
        rcabs = [m for m in level if isinstance(m, RCAB)]
        assert [r.body[0].out_channels for r in rcabs] == a["rcab_channels"][i]
        assert [r.body[2].in_channels for r in rcabs] == a["rcab_channels"][i]
        assert all(r.body[0].in_channels == model.level_channels[i] for r in rcabs)
        cas = [m for m in level.modules() if isinstance(m, ChannelAttention)]
        assert {c.conv_du[0].out_channels for c in cas} == {a["ca_channels"][i]}
        upsampler, project = level[len(rcabs)], level[len(rcabs) + 1]
        assert upsampler[0].out_channels == 4 * a["upsampler_channels"][i]
        assert isinstance(upsampler[1], nn.PixelShuffle)
        assert (project.in_channels, project.out_channels, project.kernel_size) == (
            a["upsampler_channels"][i],
            a["up_out_channels"][i],
            (1, 1),
        )
    assert model.tail["2"].in_channels == 26


def test_output_is_the_hr_image_only() -> None:
    """The low-level tails (deep supervision in training) do not change the output."""
    model = build()
    x = torch.rand(1, 3, *ODD, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        y = model(x)
        for p in ("0", "1"):
            model.tail[p].weight.zero_()
            model.tail[p].bias.fill_(1e3)
        assert torch.equal(model(x), y)


def test_mean_shift_and_bicubic_pre_upsampling() -> None:
    """A model whose trunk outputs zero returns ``add_mean``'s bias: 255 * DIV2K mean."""
    model = build(None)
    with torch.no_grad():
        model.tail["2"].weight.zero_()
        model.tail["2"].bias.zero_()
        y = model(torch.full((1, 3, 4, 5), 100.0))
    expected = 255.0 * torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1)
    assert torch.allclose(y, expected.expand_as(y))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"upscale": 3}, "power of two"),
        ({"down_channels": [16]}, "down_channels"),
        ({"rcab_channels": [[64] * 3]}, "rcab_channels"),
        ({"upsampler_channels": [64, 0]}, "upsampler_channels"),
    ],
)
def test_inconsistent_widths_are_recipe_errors(args: dict[str, Any], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        DRN(**args)


# --- end to end -------------------------------------------------------------------------


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_compiles_to_ort_fp32_with_parity(tmp_path) -> None:
    recipe = find_recipe(NAME)
    lr = calibration_image()
    model = sane_random_weights(recipe.build_model(), lr)  # type: ignore[arg-type]
    with torch.no_grad():
        y = model(lr)
    assert float(((y >= 0) & (y <= 255)).float().mean()) > 0.95 and float(y.std()) > 30
    ckpt = tmp_path / "drn.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)

    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=ckpt, recipe=NAME),
            val_dirs=(),
            out=tmp_path / "bundle",
            latency_shapes=(),
        )
    )
    manifest = result.manifest
    (report,) = manifest["validation"].values()
    assert report["images"] == 3
    assert report["parity_min_psnr"] >= 60.0
    assert manifest["metrics"]["training_form"]["params"] == 791_412
    # the intermediate tails are dead code at inference: the engine does not carry them
    # (a few floats of slack: scalar constants of the graph count as parameters there)
    dead = conv_params(50, 3, 3) + conv_params(54, 3, 3)
    assert manifest["metrics"]["onnx_params"] <= 791_412 - dead + 16
