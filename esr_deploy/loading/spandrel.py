"""spandrel as a front end: architectures recognised from a state dict alone.

`spandrel <https://github.com/chaiNNer-org/spandrel>`_ (the architecture library of chaiNNer and
ComfyUI) inspects the keys and shapes of a state dict and infers the architecture and its
hyperparameters (SPAN, Real-ESRGAN's SRVGG "Compact", OmniSR, SAFMN, PLKSR, DITN, ESRGAN
and many more). esr-deploy offers it the tensors it already read with ``weights_only``
loading (:mod:`esr_deploy.loading.checkpoint`) when no zoo recipe matches: spandrel sees
plain tensors and builds its own classes from them, so nothing from the file is executed.

A match becomes a :class:`~esr_deploy.recipe.Recipe` whose architecture is
:func:`build_spandrel` with the class's qualified name and the hyperparameters spandrel
found, so the model can be rebuilt from the manifest like any ``--arch`` model. spandrel's
models take RGB in 0..1 and return RGB in 0..1 (its documented convention).

**torchvision.** spandrel declares torchvision as a dependency, but only two of its
architectures use it (LaMa, inpainting; RestoreFormer, face restoration) and its package
``__init__`` imports all of them. Where torchvision is absent (or fails to import, as a build
for another torch does) spandrel is imported with an inert stand-in for the two torchvision
functions those modules name at import time; the stand-in raises if called, and it is
removed from ``sys.modules`` again right after, so the user's own ``import torchvision`` still
fails as it should. Those two architectures are then not offered for detection.

This module is the only place spandrel is imported; without spandrel, detection just
says how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esr_deploy.errors import NoRecipeMatch, RecipeError
from esr_deploy.loading.user_code import register_user_code
from esr_deploy.recipe import Recipe, parse_recipe

log = logging.getLogger(__name__)

#: What `esr-deploy` pins (the Makefile installs it without its torchvision dependency).
INSTALL_HINT = "pip install --no-deps spandrel==0.4.2 einops safetensors"
#: spandrel architectures whose modules import torchvision.
NEEDS_TORCHVISION = frozenset({"LaMa", "RestoreFormer"})
#: spandrel purposes esr-deploy compiles: an image in, an image (s× larger) out.
IMAGE_PURPOSES = ("SR", "Restoration")
_TORCHVISION_MODULES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)


class _Missing:
    """An attribute of the torchvision stand-in: any use beyond attribute access raises."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Missing:
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ModuleNotFoundError(
            f"torchvision is not installed: {self._name} is not available", name="torchvision"
        )


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "esr-deploy's inert stand-in for an absent torchvision")
    module.__getattr__ = lambda attr: _Missing(f"{name}.{attr}")  # type: ignore[method-assign]
    return module


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    saved = {m: sys.modules.get(m) for m in _TORCHVISION_MODULES}
    for m in _TORCHVISION_MODULES:
        sys.modules[m] = _stand_in(m)
    try:
        yield
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old


def _torchvision_usable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision.transforms.functional")
    except Exception as exc:  # a broken install raises anything (RuntimeError from its ops)
        log.warning("torchvision is installed but fails to import (%s); spandrel's LaMa and "
                    "RestoreFormer are not offered", exc)  # fmt: skip
        for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[m]
        return False
    return True


@dataclass(frozen=True)
class SpandrelModule:
    """The imported spandrel package and whether torchvision was really there."""

    package: Any
    with_torchvision: bool


@cache
def spandrel_module() -> SpandrelModule | None:
    """spandrel, imported once (see the module docstring); ``None`` when not installed."""
    if importlib.util.find_spec("spandrel") is None:
        return None
    with_torchvision = _torchvision_usable()
    if with_torchvision:
        package = importlib.import_module("spandrel")
    else:
        with _torchvision_stand_in():
            package = importlib.import_module("spandrel")
    register_user_code(package)  # its networks' errors are model errors (exit 2)
    return SpandrelModule(package, with_torchvision)


@dataclass(frozen=True)
class ArchInfo:
    """One architecture spandrel recognises, and whether esr-deploy can compile it here."""

    id: str
    name: str
    usable: bool
    why_not: str = ""


def spandrel_architectures() -> list[ArchInfo]:
    """Every architecture spandrel detects; unusable ones say why (``esr-deploy recipes``)."""
    sp = spandrel_module()
    if sp is None:
        return []
    infos = []
    for support in sp.package.MAIN_REGISTRY.architectures("insertion"):
        arch = support.architecture
        why = ""
        if arch.id in NEEDS_TORCHVISION and not sp.with_torchvision:
            why = "needs torchvision, which is not installed"
        infos.append(ArchInfo(str(arch.id), arch.name, not why, why))
    return infos


@dataclass(frozen=True)
class SpandrelMatch:
    """What spandrel found: the model with its weights loaded, and how to rebuild it."""

    arch_id: str
    arch_name: str
    scale: int
    purpose: str
    tags: tuple[str, ...]
    model: nn.Module  # wrapped in PadToMultiple where spandrel states a size multiple
    arch_args: Mapping[str, Any]  # keyword arguments of build_spandrel


class PadToMultiple(nn.Module):
    """``model`` run as spandrel runs an architecture with a size requirement: the input is
    reflect-padded at the bottom and right to a multiple of ``multiple`` and the output
    cropped back to ``scale`` × the input. The padding is computed from the input's shape on
    every call (zero where none is needed), so an exported graph holds at any size."""

    def __init__(self, model: nn.Module, multiple: int, scale: int) -> None:
        super().__init__()
        self.model = model
        self.multiple = multiple
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h = (self.multiple - h % self.multiple) % self.multiple
        pad_w = (self.multiple - w % self.multiple) % self.multiple
        y = self.model(F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"))
        return y[..., : h * self.scale, : w * self.scale]


class _UniformAdaptivePools:
    """``torch.nn.functional`` as seen by a spandrel architecture module, except that an
    adaptive max pool whose input is a multiple of its output size is the max pool it equals
    (kernel = stride = input / output, taken as constants): ONNX has no adaptive pooling to
    a size computed from the input, but has this max pool at any size."""

    def __getattr__(self, name: str) -> Any:
        return getattr(F, name)

    @staticmethod
    def adaptive_max_pool2d(x: torch.Tensor, output_size: Any, *args: Any, **kw: Any) -> Any:
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if not args and not kw and oh and ow and h % int(oh) == 0 and w % int(ow) == 0:
            kernel = (h // int(oh), w // int(ow))
            return F.max_pool2d(x, kernel, kernel)
        return F.adaptive_max_pool2d(x, output_size, *args, **kw)


def _pools_as_max_pools(model: nn.Module) -> None:
    """Give the architecture module of ``model`` :class:`_UniformAdaptivePools` as its ``F``
    (only for spandrel's modules, and only where it pads to a multiple: then the adaptive
    pools of SAFMN-like networks always divide evenly)."""
    module = sys.modules.get(type(model).__module__)
    if module is not None and module.__name__.startswith("spandrel.architectures."):
        if getattr(module, "F", None) is F:
            module.F = _UniformAdaptivePools()  # type: ignore[attr-defined]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"hyperparameter of type {type(value).__name__}")


def detect_spandrel(state_dict: Mapping[str, torch.Tensor]) -> SpandrelMatch | None:
    """spandrel's detection on ``state_dict`` (tensors only); ``None`` when spandrel is not
    installed or recognises no architecture. Raises :class:`ValueError` for a recognised
    model esr-deploy cannot compile (not an RGB image-to-image network)."""
    sp = spandrel_module()
    if sp is None:
        return None
    registry = sp.package.MAIN_REGISTRY
    if not sp.with_torchvision:
        registry = sp.package.ArchRegistry()
        registry.add(
            *(
                a
                for a in sp.package.MAIN_REGISTRY.architectures("insertion")
                if a.architecture.id not in NEEDS_TORCHVISION
            )
        )
    try:
        descriptor = registry.load(dict(state_dict))
    except sp.package.UnsupportedModelError:
        return None
    arch = descriptor.architecture
    if descriptor.purpose not in IMAGE_PURPOSES or not isinstance(
        descriptor, sp.package.ImageModelDescriptor
    ):
        raise ValueError(f"spandrel recognises {arch.name}, a {descriptor.purpose} model")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ValueError(
            f"spandrel recognises {arch.name} with {descriptor.input_channels} input and "
            f"{descriptor.output_channels} output channels; esr-deploy compiles RGB models"
        )
    model = descriptor.model
    cls = type(model)
    try:
        hyper = _jsonable(dict(getattr(model, "hyperparameters", {})))
    except TypeError as exc:
        raise ValueError(f"spandrel's {arch.name} has a {exc} that cannot be recorded") from exc
    multiple = int(descriptor.size_requirements.multiple_of)
    if multiple > 1:
        _pools_as_max_pools(model)
        model = PadToMultiple(model, multiple, int(descriptor.scale))
    return SpandrelMatch(
        arch_id=str(arch.id),
        arch_name=arch.name,
        scale=int(descriptor.scale),
        purpose=str(descriptor.purpose),
        tags=tuple(str(t) for t in descriptor.tags),
        model=model.eval(),
        arch_args={
            "cls": f"{cls.__module__}:{cls.__qualname__}",
            "hyperparameters": hyper,
            "pad_to_multiple": multiple,
            "scale": int(descriptor.scale),
        },
    )


def build_spandrel(
    architecture: str,
    cls: str,
    hyperparameters: Mapping[str, Any],
    pad_to_multiple: int = 1,
    scale: int = 1,
) -> nn.Module:
    """Build spandrel's ``architecture`` from its class ``module:Qualname`` and
    ``hyperparameters`` (random weights). A spandrel detection's recipe names this function
    as its architecture, so the model is rebuilt from the manifest like any ``--arch``.
    """
    module_name, _, qualname = cls.partition(":")
    if not module_name.startswith("spandrel.") or spandrel_module() is None:
        raise ValueError(f"{architecture} ({cls!r}) is not a spandrel architecture installed here")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    model: nn.Module = obj(**dict(hyperparameters))
    if pad_to_multiple > 1:
        _pools_as_max_pools(model)
        model = PadToMultiple(model, pad_to_multiple, scale)
    return model


def recipe_from_spandrel(
    state_dict: Mapping[str, torch.Tensor], no_zoo: NoRecipeMatch
) -> tuple[Recipe, nn.Module, dict[str, Any]]:
    """The recipe, the loaded model and a description of the detection, for a state dict no
    zoo recipe matched; re-raises ``no_zoo`` (with advice) when spandrel finds nothing."""
    try:
        match = detect_spandrel(state_dict)
    except ValueError as exc:
        raise RecipeError(
            f"No zoo recipe matches this checkpoint, and {exc} — esr-deploy compiles RGB "
            "image-to-image networks; describe yours with --arch if it is one."
        ) from exc
    if match is None:
        hint = (
            f" (spandrel is not installed, so the architectures it recognises were not "
            f"tried: {INSTALL_HINT})"
            if spandrel_module() is None
            else " spandrel recognises none of its architectures in it either."
        )
        raise NoRecipeMatch(f"{no_zoo}{hint}") from no_zoo
    sp = spandrel_module()
    version = getattr(sp.package, "__version__", "?") if sp else "?"
    recipe = parse_recipe(
        {
            "name": f"{match.arch_id.lower()}_x{match.scale}",
            "description": f"{match.arch_name} ({', '.join(match.tags)}), detected by spandrel",
            "arch": f"{__name__}:build_spandrel",
            "arch_args": {"architecture": match.arch_id, **match.arch_args},
            "scale": match.scale,
            "data_range": 1,
            "color_order": "RGB",
        }
    )
    detection = {
        "by": f"spandrel {version}",
        "architecture": match.arch_id,
        "name": match.arch_name,
        "purpose": match.purpose,
        "tags": list(match.tags),
        "scale": match.scale,
        "data_range": 1.0,
        "color_order": "RGB",
    }
    return recipe, match.model, detection
