"""The Python API of the compile side: :func:`compile_source`, exposed as
:func:`esr_deploy.compile`.

A source is one of:

- a checkpoint path (``.pth``/``.pt``/``.ckpt``/...): loaded as ``esr-deploy compile`` loads
  it (``weights_only``; a zoo recipe detected or named with ``recipe=``, or ``arch=`` with
  ``scale`` and ``data_range``);
- an ``nn.Module`` the caller built and trained: compiled from a copy (the caller's module is
  not modified); ``recipe=`` (a zoo recipe name: its scale, input range, tolerances and shape
  profile) or ``scale=`` (with ``data_range``, 1.0 unless given) say what it computes. Its
  weights' SHA-256 (every tensor of the state dict, in key order) stands in for a checkpoint's;
- an ONNX file (``.onnx``): compiled as given (:mod:`esr_deploy.compiling.onnx_source`); the
  fp32 reference is the ONNX run in ONNX Runtime.

Every other keyword is a :class:`~esr_deploy.compiling.options.CompileOptions` field
(``latency_shapes=()`` skips timing, ``max_psnr_drop``, ``precision``, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esr_deploy.compiling.onnx_source import load_onnx_source
from esr_deploy.compiling.options import CompileOptions, CompileResult
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.errors import EsrDeployError
from esr_deploy.loading.checkpoint import LoadedCheckpoint
from esr_deploy.loading.detect import LoadedModel, ModelSource
from esr_deploy.passes.base import copy_model
from esr_deploy.passes.weight_norm import fold_weight_normalisation
from esr_deploy.progress import Progress
from esr_deploy.recipe import Recipe, find_recipe, recipe_from_arch

#: CompileOptions fields the API sets itself (from ``source``, ``target``, ``val``, ``out``).
_OWN = ("source", "target", "val_dirs", "out")


def state_sha256(model: nn.Module) -> str:
    """SHA-256 over every state-dict entry in key order: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_recipe(
    model: nn.Module, recipe: str | None, scale: int | None, data_range: float | None,
    name: str | None,
) -> Recipe:  # fmt: skip
    """The recipe of a module given to the API: a zoo recipe by name, or one made from
    ``scale`` and ``data_range`` (1.0 unless given)."""
    if recipe is not None:
        if scale is not None or data_range is not None:
            raise EsrDeployError(
                f"compile(): recipe={recipe!r} states the scale and input range — give "
                "recipe= or scale=/data_range=, not both."
            )
        found = find_recipe(recipe)
        return dataclasses.replace(found, name=name) if name else found
    if scale is None:
        raise EsrDeployError(
            f"compile(): an nn.Module ({type(model).__name__}) does not say its upscaling "
            "factor — pass scale= (and data_range=, 1.0 unless given), or recipe= naming a "
            "zoo recipe."
        )
    cls = type(model)
    arch = f"{cls.__module__}:{cls.__qualname__}"
    return recipe_from_arch(arch, {}, scale, 1.0 if data_range is None else data_range, name)


def loaded_module(
    model: nn.Module, recipe: str | None, scale: int | None, data_range: float | None,
    name: str | None,
) -> LoadedModel:  # fmt: skip
    """A copy of ``model`` (eval mode, weight normalisation folded) as a loaded model."""
    chosen = module_recipe(model, recipe, scale, data_range, name)
    copy = copy_model(model).eval()
    folded = fold_weight_normalisation(copy)
    ckpt = LoadedCheckpoint(
        path=Path(f"<nn.Module {chosen.arch}>"), sha256=state_sha256(copy), state_dict={},
        nested_key=None, placeholders=(),
    )  # fmt: skip
    notes = [f"Using the nn.Module {type(model).__name__} given to compile(): x{chosen.scale}, "
             f"input 0..{chosen.data_range:g}."]  # fmt: skip
    if folded:
        notes.append(f"Weight normalisation folded into plain weights: {', '.join(folded)}.")
    return LoadedModel(recipe=chosen, model=copy, checkpoint=ckpt, notes=tuple(notes))


def _options(
    target: str, val: Any, out: Any, source: ModelSource, extra: dict[str, Any]
) -> CompileOptions:
    """The options of one API call; unknown keywords are refused by name."""
    fields = {f.name for f in dataclasses.fields(CompileOptions)} - set(_OWN)
    unknown = sorted(set(extra) - fields)
    if unknown:
        raise EsrDeployError(
            f"compile() got unknown option(s) {', '.join(unknown)} — the options are "
            f"{', '.join(sorted(fields))} (see esr_deploy.compiling.CompileOptions)."
        )
    vals = [val] if isinstance(val, str | Path) else list(val or ())
    return CompileOptions(
        source=source, target=target, val_dirs=tuple(Path(v) for v in vals),
        out=None if out is None else Path(out), **extra,
    )  # fmt: skip


def compile_source(
    source: str | Path | nn.Module,
    target: str = "ort-fp32",
    *,
    val: str | Path | Sequence[str | Path] = (),
    out: str | Path | None = None,
    recipe: str | None = None,
    arch: str | None = None,
    arch_args: str | None = None,
    scale: int | None = None,
    data_range: float | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> CompileResult:
    """Compile ``source`` for ``target`` into a validated bundle; see the module docstring."""
    if isinstance(source, nn.Module):
        if arch is not None or arch_args is not None:
            raise EsrDeployError(
                "compile(): arch= and arch_args= describe a checkpoint's architecture — an "
                "nn.Module is already built; drop them."
            )
        loaded = loaded_module(source, recipe, scale, data_range, name)
        placeholder = ModelSource(checkpoint=loaded.checkpoint.path)
        return compile_model(_options(target, val, out, placeholder, options), progress,
                             loaded=loaded)  # fmt: skip
    if not isinstance(source, str | Path):
        raise EsrDeployError(
            f"compile(): the source is a {type(source).__name__} — give a checkpoint path, an "
            "ONNX file path or a torch.nn.Module."
        )
    path = Path(source)
    if path.suffix.lower() == ".onnx":
        if recipe is not None or arch is not None or arch_args is not None:
            raise EsrDeployError(
                "compile(): recipe=, arch= and arch_args= describe a PyTorch model — an ONNX "
                "file is compiled as given; pass scale= and data_range= only."
            )
        loaded = load_onnx_source(path, 1.0 if data_range is None else data_range, scale, name)
        placeholder = ModelSource(checkpoint=path)
        return compile_model(_options(target, val, out, placeholder, options), progress,
                             loaded=loaded)  # fmt: skip
    model_source = ModelSource(checkpoint=path, recipe=recipe, arch=arch, arch_args=arch_args,
                               scale=scale, data_range=data_range)  # fmt: skip
    return compile_model(_options(target, val, out, model_source, options), progress)
