"""Loading a model: the checkpoint read safely, the recipe chosen (named, ``--arch``, a zoo
recipe that loads the state dict strictly, or spandrel's detection), the network built and
its weights loaded, weight normalisation folded into plain weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from esr_deploy.checkpoint import LoadedCheckpoint, check_finite, load_checkpoint, load_weights
from esr_deploy.errors import KeyMismatchError, NoRecipeMatch
from esr_deploy.passes.weight_norm import fold_weight_normalisation
from esr_deploy.recipe import (
    Recipe,
    describe_closest,
    detect_recipe,
    find_recipe,
    rank_recipes,
    recipe_from_arch,
)


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a checkpoint plus a recipe, named or detected."""

    checkpoint: Path
    recipe: str | None = None
    arch: str | None = None
    arch_args: str | None = None
    scale: int | None = None
    data_range: float | None = None


@dataclass(frozen=True)
class LoadedModel:
    recipe: Recipe
    model: nn.Module
    checkpoint: LoadedCheckpoint
    notes: tuple[str, ...] = ()
    #: how an architecture found from the state dict alone was recognised (spandrel)
    detection: dict[str, Any] | None = None


def resolve_recipe(source: ModelSource, ckpt: LoadedCheckpoint) -> tuple[Recipe, str]:
    """The recipe for ``ckpt`` and a sentence saying how it was chosen."""
    if source.arch:
        recipe = recipe_from_arch(source.arch, source.arch_args, source.scale, source.data_range)
        return recipe, f"architecture {source.arch} given with --arch"
    if source.recipe:
        return find_recipe(source.recipe), f"recipe '{source.recipe}' given with --recipe"
    recipe = detect_recipe(ckpt.state_dict)
    return recipe, f"detected recipe '{recipe.name}' (the only zoo recipe that loads it strictly)"


def load_model(source: ModelSource) -> LoadedModel:
    """Load the checkpoint safely, choose the recipe (zoo, then spandrel's detection), build
    the model and load its weights; weight normalisation is folded into plain weights."""
    ckpt = load_checkpoint(source.checkpoint)
    detection: dict[str, Any] | None = None
    try:
        recipe, how = resolve_recipe(source, ckpt)
    except NoRecipeMatch as no_zoo:
        from esr_deploy.spandrel_arch import recipe_from_spandrel

        check_finite(ckpt.state_dict)
        recipe, model, detection = recipe_from_spandrel(ckpt.state_dict, no_zoo)
        how = (
            f"{detection['name']} detected by {detection['by']} (no zoo recipe matches): "
            f"x{recipe.scale}, {recipe.color_order}, input 0..{recipe.data_range:g}"
        )
    else:
        model = _model_with_weights(recipe, ckpt, how)
    notes = [f"Using {how}."]
    folded = fold_weight_normalisation(model)
    if folded:
        notes.append(f"Weight normalisation folded into plain weights: {', '.join(folded)}.")
    if ckpt.placeholders:
        notes.append(
            "Non-tensor objects in the checkpoint were not imported or run: "
            + ", ".join(ckpt.placeholders[:5])
        )
    return LoadedModel(
        recipe=recipe, model=model.eval(), checkpoint=ckpt, notes=tuple(notes), detection=detection
    )


def _model_with_weights(recipe: Recipe, ckpt: LoadedCheckpoint, how: str) -> nn.Module:
    model = recipe.build_model()
    try:
        load_weights(model, ckpt)
    except KeyMismatchError as exc:
        ranking = rank_recipes(ckpt.state_dict)
        closest = describe_closest(ranking)
        fits = [m.recipe.name for m in ranking if m.exact and m.recipe.name != recipe.name]
        todo = (
            f"compile it with --recipe {fits[0]}, which loads it exactly"
            if fits
            else "fix the recipe's arch_args or name the recipe it was trained with"
        )
        raise KeyMismatchError(
            f"{exc}\n  The checkpoint does not fit {recipe.arch} ({how}); zoo recipes closest "
            f"to it: {closest} — {todo}."
        ) from exc
    return model
