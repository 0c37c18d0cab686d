"""The zoo: every recipe builds its architecture, strict-loads the official weights, and
reproduces the reference Set5 PSNR of ``../shared/weights/README.md``."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from esr_deploy.paths import recipes_dir

# --- PSNR helper (to be replaced by esr_deploy.validate.quality) ---------------------------


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an H x W x 3 RGB array in 0..255, as float64 (16..235)."""
    rgb = rgb.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR (peak 255) between the Y channels of two uint8 RGB images, ``border`` px cropped."""
    a = y_channel(sr)[border:-border, border:-border]
    b = y_channel(hr)[border:-border, border:-border]
    mse = float(np.mean((a - b) ** 2))
    return 10.0 * float(np.log10(255.0**2 / mse))


# --- recipes and weights -------------------------------------------------------------------

# recipe name -> (official checkpoint in ../shared/weights, README "Set5 Y" PSNR in dB)
ZOO: dict[str, tuple[str, float]] = {
    "imdn_x4": ("imdn_x4.pth", 32.2096),
    "rfdn_x4": ("rfdn_aim2020.pth", 32.1589),
    "rlfn_x4": ("rlfn_x4.pth", 32.2379),
    "fmen_x4": ("fmen_ntire2022.pth", 32.0289),
    "dipnet_x4": ("dipnet_ntire2023.pth", 31.8053),
}
SET5 = ("baby", "bird", "butterfly", "head", "woman")
PARAMS = {
    "imdn_x4": 715_176,
    "rfdn_x4": 433_448,
    "rlfn_x4": 543_740,
    "fmen_x4": 341_066,
    "dipnet_x4": 243_252,
}


def read_recipe(name: str) -> dict:
    with open(recipes_dir() / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


def build(recipe: dict) -> nn.Module:
    module_name, class_name = recipe["arch"].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**recipe["arch_args"])


@functools.cache
def load_official(name: str, weights_dir: Path) -> tuple[nn.Module, dict]:
    recipe = read_recipe(name)
    model = build(recipe)
    sd = torch.load(weights_dir / ZOO[name][0], map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model.eval(), recipe


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ZOO))
def test_recipe_writes_every_constructor_argument(name: str) -> None:
    recipe = read_recipe(name)
    assert recipe["name"] == name
    assert recipe["scale"] == recipe["arch_args"]["upscale"]
    assert recipe["data_range"] in (1.0, 255.0)
    module_name, class_name = recipe["arch"].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(recipe["arch_args"]) == params
    json.dumps(recipe["arch_args"])  # JSON-serialisable, for manifest.json


@pytest.mark.parametrize("name", sorted(ZOO))
def test_official_weights_load_strict_and_odd_size_runs(name: str, weights_dir: Path) -> None:
    model, recipe = load_official(name, weights_dir)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    s = recipe["scale"]
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0)) * recipe["data_range"]
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 37 * s, 53 * s)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_set5_psnr_matches_reference(name: str, weights_dir: Path, sr_data_dir: Path) -> None:
    model, recipe = load_official(name, weights_dir)
    scale, data_range = recipe["scale"], float(recipe["data_range"])
    psnrs = []
    for img in SET5:
        lr = Image.open(sr_data_dir / "Set5" / "LR_bicubic" / f"X{scale}" / f"{img}x{scale}.png")
        hr = np.asarray(Image.open(sr_data_dir / "Set5" / "HR" / f"{img}.png").convert("RGB"))
        lr_arr = np.asarray(lr.convert("RGB"), dtype=np.float32) * (data_range / 255.0)
        x = torch.from_numpy(lr_arr).permute(2, 0, 1).unsqueeze(0)
        with torch.no_grad():
            out = model(x)[0].clamp(0.0, data_range) * (255.0 / data_range)
        sr = out.round().to(torch.uint8).permute(1, 2, 0).numpy()
        hr = hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale]
        assert sr.shape == hr.shape
        psnrs.append(psnr_y(sr, hr, border=scale))
    assert float(np.mean(psnrs)) == pytest.approx(ZOO[name][1], abs=0.01)


def test_dipnet_widths_come_from_arguments() -> None:
    from esr_deploy.zoo.dipnet import DIPNet

    model = DIPNet(
        feature_channels=20,
        mid_channels=[[7, 9], [11, 5], [13, 6]],
        esa_channels=[4, 8, 6],
        head_bias=True,
        block_conv_bias=[True, False, True, False],
        esa_bias=False,
        lr_conv_bias=True,
        upsampler_bias=True,
        upscale=3,
    ).eval()
    sd = model.state_dict()
    assert sd["block_2.c1_r.weight"].shape == (11, 20, 3, 3)
    assert sd["block_2.c2_r.weight"].shape == (5, 11, 3, 3)
    assert sd["block_2.c3_r.weight"].shape == (20, 5, 3, 3)
    assert sd["block_3.esa.conv1.weight"].shape == (6, 20, 1, 1)
    assert "block_1.c1_r.bias" in sd and "block_1.c2_r.bias" not in sd
    assert "block_1.esa.conv1.bias" not in sd and "conv_1.bias" in sd
    with torch.no_grad():
        y = model(torch.rand(1, 3, 17, 19, generator=torch.Generator().manual_seed(0)))
    assert y.shape == (1, 3, 51, 57)
