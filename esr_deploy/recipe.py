"""Recipes: everything a checkpoint does not say about the model it holds.

A recipe names the architecture (``module:Class`` and its constructor arguments), the scale,
the input range the network was trained with (1 or 255), the colour order, the LR shape
profile (min/opt/max H×W), the default targets and the tolerances that validation applies.
The zoo's recipes live in ``recipes/*.toml``; a user writes one for their own architecture or
passes ``--arch pkg.module:Class --arch-args JSON`` (see :func:`recipe_from_arch`).

When no recipe is named, :func:`detect_recipe` builds every zoo architecture and keeps the one
whose parameters the state_dict matches exactly (keys and shapes, after prefix
normalisation). None or several matches is an error that lists the closest recipes by key
overlap.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from esr_deploy.checkpoint import align_keys, expected_shapes, key_overlap
from esr_deploy.errors import KeyMismatchError, NoRecipeMatch, RecipeError
from esr_deploy.paths import recipes_dir
from esr_deploy.shapes import DEFAULT_MAX_HW, DEFAULT_OPT_HW, HW, ShapeProfile
from esr_deploy.user_code import build_user_model, import_user_callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerances:
    """Validation limits for one precision.

    ``parity_min_psnr``: the lowest PSNR (dB, RGB, outputs clamped to 0..1) an engine's
    output may have against the PyTorch fp32 reference, per image.
    ``max_psnr_drop``: the largest drop of task PSNR (Y, dB) against HR, per set.
    """

    parity_min_psnr: float
    max_psnr_drop: float


#: The one table of default tolerances (``../shared/design.md``, Validation); recipes may tighten.
DEFAULT_TOLERANCES: Mapping[str, Tolerances] = MappingProxyType(
    {
        "fp32": Tolerances(parity_min_psnr=60.0, max_psnr_drop=0.01),
        "fp16": Tolerances(parity_min_psnr=45.0, max_psnr_drop=0.02),
        "bf16": Tolerances(parity_min_psnr=45.0, max_psnr_drop=0.02),
        "int8": Tolerances(parity_min_psnr=32.0, max_psnr_drop=0.15),
    }
)

#: Parity PSNR reported for identical outputs (validate/parity.py uses the same value).
PARITY_PSNR_CAP = 200.0


@dataclass(frozen=True)
class Recipe:
    """A model description; see the module docstring. Immutable."""

    name: str
    arch: str
    scale: int
    data_range: float
    arch_args: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    color_order: str = "RGB"
    default_targets: tuple[str, ...] = ("ort-fp32",)
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    tolerances: Mapping[str, Tolerances] = field(default_factory=lambda: DEFAULT_TOLERANCES)
    source: Path | None = None

    def tolerance(self, precision: str) -> Tolerances:
        try:
            return self.tolerances[precision]
        except KeyError:
            return DEFAULT_TOLERANCES[precision]

    def build_model(self) -> nn.Module:
        """Instantiate the architecture with random weights, in eval mode (any failure of
        the user's code is a :class:`~esr_deploy.errors.UserCodeError`)."""
        return build_user_model(import_arch(self.arch), self.arch, dict(self.arch_args), self.name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "arch_args": dict(self.arch_args),
            "scale": self.scale,
            "data_range": self.data_range,
            "color_order": self.color_order,
            "profile": self.profile.to_dict(),
            "source": str(self.source) if self.source else None,
        }


def import_arch(spec: str) -> Callable[..., Any]:
    """Import ``package.module:name``, a class or a factory function returning the network,
    from the current directory and PYTHONPATH too (:mod:`esr_deploy.user_code`)."""
    return import_user_callable(spec)


def _hw(value: Any, what: str, where: str) -> HW:
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise RecipeError(f"{where}: {what} must be [H, W] with positive integers, got {value!r}.")
    return (int(value[0]), int(value[1]))


def _validate_common(name: str, scale: Any, data_range: Any, where: str) -> None:
    if not isinstance(scale, int) or scale < 1:
        raise RecipeError(f"{where}: scale must be a positive integer, got {scale!r}.")
    if data_range not in (1, 1.0, 255, 255.0):
        raise RecipeError(
            f"{where}: data_range must be 1 or 255 (the range the network was trained "
            f"with), got {data_range!r}."
        )


_KNOWN_KEYS = {
    "name",
    "description",
    "arch",
    "arch_args",
    "scale",
    "data_range",
    "color_order",
    "default_targets",
    "profile",
    "tolerances",
}


def parse_recipe(data: Mapping[str, Any], source: Path | None = None) -> Recipe:
    """Validate a recipe mapping (parsed TOML) and turn it into a :class:`Recipe`."""
    where = f"recipe {source}" if source else "recipe"
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise RecipeError(
            f"{where}: unknown keys {sorted(unknown)} — allowed: {sorted(_KNOWN_KEYS)}."
        )
    for required in ("arch", "scale", "data_range"):
        if required not in data:
            raise RecipeError(f"{where}: missing required key '{required}'.")
    name = str(data.get("name") or (source.stem if source else "model"))
    _validate_common(name, data["scale"], data["data_range"], where)
    color_order = str(data.get("color_order", "RGB")).upper()
    if color_order not in ("RGB", "BGR"):
        raise RecipeError(f"{where}: color_order must be RGB or BGR, got {color_order!r}.")
    prof = data.get("profile", {})
    profile = ShapeProfile(
        opt=_hw(prof.get("opt", DEFAULT_OPT_HW), "profile.opt", where),
        max=_hw(prof.get("max", DEFAULT_MAX_HW), "profile.max", where),
        min=_hw(prof["min"], "profile.min", where) if "min" in prof else None,
    )
    tolerances = dict(DEFAULT_TOLERANCES)
    for precision, values in dict(data.get("tolerances", {})).items():
        if precision not in DEFAULT_TOLERANCES:
            raise RecipeError(
                f"{where}: tolerances.{precision} is not a precision "
                f"({', '.join(DEFAULT_TOLERANCES)})."
            )
        tolerances[precision] = replace(DEFAULT_TOLERANCES[precision], **dict(values))
        if tolerances[precision].parity_min_psnr > PARITY_PSNR_CAP:
            raise RecipeError(
                f"{where}: tolerances.{precision}.parity_min_psnr "
                f"{tolerances[precision].parity_min_psnr} is above {PARITY_PSNR_CAP} dB, the "
                "value reported for outputs identical to float precision — no engine could "
                "pass it."
            )
    arch_args = data.get("arch_args", {})
    if not isinstance(arch_args, Mapping):
        raise RecipeError(f"{where}: arch_args must be a table, got {type(arch_args).__name__}.")
    return Recipe(
        name=name,
        description=str(data.get("description", "")),
        arch=str(data["arch"]),
        arch_args=MappingProxyType(dict(arch_args)),
        scale=int(data["scale"]),
        data_range=float(data["data_range"]),
        color_order=color_order,
        default_targets=tuple(data.get("default_targets", ("ort-fp32",))),
        profile=profile,
        tolerances=MappingProxyType(tolerances),
        source=source,
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate one recipe TOML file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RecipeError(f"Recipe file {path} does not exist.") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Recipe {path} is not valid TOML: {exc}.") from exc
    return parse_recipe(data, source=path)


def zoo_recipes() -> list[Recipe]:
    """All recipes that ship with esr-deploy, sorted by name."""
    return sorted((load_recipe(p) for p in recipes_dir().glob("*.toml")), key=lambda r: r.name)


def find_recipe(name_or_path: str) -> Recipe:
    """A zoo recipe by name, or a recipe file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return load_recipe(path)
    recipes = {r.name: r for r in zoo_recipes()}
    if name_or_path in recipes:
        return recipes[name_or_path]
    raise RecipeError(
        f"No recipe named '{name_or_path}' — the zoo has: {', '.join(sorted(recipes))}; "
        "or pass a path to a .toml recipe."
    )


def recipe_from_arch(
    arch: str,
    arch_args: str | Mapping[str, Any] | None,
    scale: int | None,
    data_range: float | None,
    name: str | None = None,
) -> Recipe:
    """A recipe for a user architecture given on the command line (``--arch``)."""
    if isinstance(arch_args, str):
        try:
            parsed = json.loads(arch_args) if arch_args.strip() else {}
        except json.JSONDecodeError as exc:
            raise RecipeError(f"--arch-args is not valid JSON: {exc}.") from exc
        if not isinstance(parsed, dict):
            raise RecipeError("--arch-args must be a JSON object, e.g. '{\"channels\": 32}'.")
        arch_args = parsed
    if scale is None or data_range is None:
        raise RecipeError(
            "--arch needs --scale and --data-range (1 or 255): a checkpoint does not say them."
        )
    data = {
        "name": name or arch.partition(":")[2].lower() or "model",
        "arch": arch,
        "arch_args": dict(arch_args or {}),
        "scale": scale,
        "data_range": data_range,
    }
    return parse_recipe(data)


@dataclass(frozen=True)
class RecipeMatch:
    """How well a state_dict fits one zoo recipe."""

    recipe: Recipe
    overlap: float  # key_overlap in [0, 1]
    exact: bool  # align_keys succeeds (keys and shapes)


def rank_recipes(state_dict: Mapping[str, torch.Tensor]) -> list[RecipeMatch]:
    """Every zoo recipe scored against ``state_dict``, best first."""
    matches = []
    for recipe in zoo_recipes():
        expected = expected_shapes(recipe.build_model())
        try:
            align_keys(state_dict, expected)
            exact = True
        except KeyMismatchError:
            exact = False
        matches.append(RecipeMatch(recipe, key_overlap(state_dict, expected), exact))
    return sorted(matches, key=lambda m: (-m.exact, -m.overlap, m.recipe.name))


def describe_closest(ranking: Sequence[RecipeMatch], n: int = 3) -> str:
    return (
        ", ".join(
            f"{m.recipe.name} ({100 * m.overlap:.0f}% of keys and shapes)" for m in ranking[:n]
        )
        or "none"
    )


def detect_recipe(state_dict: Mapping[str, torch.Tensor]) -> Recipe:
    """The single zoo recipe whose architecture loads ``state_dict`` strictly.

    Raises :class:`RecipeError` listing the closest recipes when none or several match.
    """
    ranking = rank_recipes(state_dict)
    exact = [m.recipe for m in ranking if m.exact]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        raise NoRecipeMatch(
            "No zoo recipe matches this checkpoint — its parameter names and shapes fit "
            f"none of the zoo architectures exactly; closest: {describe_closest(ranking)}. — "
            "Name one with --recipe NAME|PATH (the error then lists the differing keys), or "
            "describe your own network with --arch pkg.module:Class --arch-args JSON "
            "--scale N --data-range 1|255."
        )
    raise RecipeError(
        f"Several zoo recipes match this checkpoint: {', '.join(r.name for r in exact)} — "
        "choose one with --recipe NAME."
    )
