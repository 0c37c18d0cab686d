"""Recipes: TOML validation, zoo listing, auto-detection and user architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esr_deploy.checkpoint import load_checkpoint
from esr_deploy.errors import RecipeError
from esr_deploy.recipe import (
    DEFAULT_TOLERANCES,
    detect_recipe,
    find_recipe,
    load_recipe,
    rank_recipes,
    recipe_from_arch,
    zoo_recipes,
)

OFFICIAL = {"imdn_x4", "rfdn_x4", "rlfn_x4", "fmen_x4", "dipnet_x4"}
TRAINING_FORMS = {"ecbsr_m4c16_x4", "fmen_train_x4", "rlfn_rep_x4", "repvgg_sr_x4", "dbb_sr_x4"}
SEARCHED = {"drn_s_x4"}  # DRN-S with channel widths from a compression search
CHECKPOINT_RECIPE = {
    "imdn_x4.pth": "imdn_x4",
    "rlfn_x4.pth": "rlfn_x4",
    "rfdn_aim2020.pth": "rfdn_x4",
    "fmen_ntire2022.pth": "fmen_x4",
    "dipnet_ntire2023.pth": "dipnet_x4",
}


class Doubler(nn.Module):
    """A user architecture defined here, outside the package."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3 * 4, 3, padding=1)
        self.channels = channels
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


def test_zoo_lists_official_and_training_form_recipes() -> None:
    recipes = zoo_recipes()
    assert {r.name for r in recipes} == OFFICIAL | TRAINING_FORMS | SEARCHED
    for r in recipes:
        assert r.scale == 4 and r.data_range in (1.0, 255.0)
        assert r.profile.opt == (256, 256)
        assert r.tolerance("fp32") == DEFAULT_TOLERANCES["fp32"]


@pytest.mark.parametrize("filename", sorted(CHECKPOINT_RECIPE))
def test_detection_finds_the_one_recipe(weights_dir, filename) -> None:
    sd = load_checkpoint(weights_dir / filename).state_dict
    assert detect_recipe(sd).name == CHECKPOINT_RECIPE[filename]
    ranking = rank_recipes(sd)
    assert ranking[0].exact and not any(m.exact for m in ranking[1:])


def test_no_match_lists_closest_recipes(weights_dir) -> None:
    sd = load_checkpoint(weights_dir / "rlfn_x4.pth").state_dict
    sd = {k: v for k, v in sd.items() if not k.startswith("block_4.")}  # a 3-block RLFN
    with pytest.raises(RecipeError, match=r"closest: rlfn_x4 \(\d+% .*--arch"):
        detect_recipe(sd)


def test_recipe_file_tolerance_override(tmp_path) -> None:
    text = (
        find_recipe("rlfn_x4").source.read_text()  # type: ignore[union-attr]
        + "\n[tolerances.fp32]\nparity_min_psnr = 70.0\n"
    )
    path = tmp_path / "strict.toml"
    path.write_text(text)
    recipe = find_recipe(str(path))
    assert recipe.tolerance("fp32").parity_min_psnr == 70.0
    assert recipe.tolerance("fp32").max_psnr_drop == DEFAULT_TOLERANCES["fp32"].max_psnr_drop
    assert recipe.tolerance("int8") == DEFAULT_TOLERANCES["int8"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('arch = "a:B"\nscale = 4\n', "missing required key 'data_range'"),
        ('arch = "a:B"\nscale = 0\ndata_range = 1\n', "scale must be a positive integer"),
        ('arch = "a:B"\nscale = 2\ndata_range = 7\n', "data_range must be 1 or 255"),
        ('arch = "a:B"\nscale = 2\ndata_range = 1\nsclae = 3\n', r"unknown keys \['sclae'\]"),
        ('arch = "a:B"\nscale = 2\ndata_range = 1\n[profile]\nopt = [0, 4]\n', "profile.opt"),
        ('arch = "a:B"\nscale = 2\ndata_range = 1\n[tolerances.fp64]\n', "not a precision"),
        ("arch = \n", "not valid TOML"),
        (
            'arch = "a:B"\nscale = 2\ndata_range = 1\n[tolerances.fp32]\nparity_min_psnr = 250.0\n',
            "above 200",
        ),
    ],
)
def test_bad_recipe_files(tmp_path, text, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_unknown_recipe_name_lists_the_zoo() -> None:
    with pytest.raises(RecipeError, match="the zoo has: dbb_sr_x4, dipnet_x4"):
        find_recipe("edsr_x4")


def test_user_architecture_from_this_module() -> None:
    recipe = recipe_from_arch(f"{__name__}:Doubler", '{"channels": 8}', scale=2, data_range=1)
    model = recipe.build_model()
    assert isinstance(model, Doubler) and model.channels == 8
    assert model(torch.zeros(1, 3, 5, 7)).shape == (1, 3, 10, 14)


@pytest.mark.parametrize(
    ("arch", "args", "message"),
    [
        ("no_colon", None, "not of the form package.module:Class"),
        ("no_such_module_xyz:Net", None, "Could not import module 'no_such_module_xyz'"),
        (f"{__name__}:Missing", None, "has no attribute 'Missing'"),
        (f"{__name__}:Doubler", '{"chanels": 8}', "constructor rejected the arguments"),
        (f"{__name__}:Doubler", "[1, 2]", "must be a JSON object"),
        (f"{__name__}:Doubler", "{oops", "not valid JSON"),
    ],
)
def test_bad_user_architecture(arch, args, message) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe_from_arch(arch, args, scale=2, data_range=1).build_model()


def test_user_architecture_needs_scale_and_range() -> None:
    with pytest.raises(RecipeError, match="--scale and --data-range"):
        recipe_from_arch(f"{__name__}:Doubler", None, scale=None, data_range=1)


@pytest.mark.parametrize(
    ("source", "raised", "line"),
    [
        ("import torch\nraise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here", 2),
        ("from torch import nn\nfrom torch.nn import NoSuchThing\n", "ImportError", 2),
        (
            "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
            "        super().__init__()\n        self.c = nn.Conv2d(3, 3, 3, padding='bogus')\n",
            "padding",
            6,
        ),
        (
            "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
            "        raise KeyError('weights')\n",
            "KeyError: 'weights'",
            5,
        ),
    ],
    ids=["import-raises", "import-error-inside", "torch-rejects-argument", "ctor-raises"],
)
def test_user_architecture_failures_exit_2_naming_the_line(
    tmp_path, monkeypatch, source, raised, line
) -> None:
    """Any exception raised by the user's module or constructor: exit 2, its message and
    the file:line in the user's code, no traceback."""
    from typer.testing import CliRunner

    from esr_deploy.cli import app

    name = f"user_arch_{abs(hash(source)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(source)
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    args = ["compile", "w.pth", "--arch", f"{name}:Net", "--scale", "2", "--data-range", "1"]
    result = CliRunner().invoke(app, args)
    shown = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert raised in shown and f"{tmp_path / name}.py:{line}" in shown, result.output
