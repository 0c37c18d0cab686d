"""Fold weight normalisation (and every other parametrization) into plain weights.

Weight normalisation re-parameterizes a weight as ``w = g * v / ||v||`` (norm over every
dimension but ``dim``) for training; at inference ``w`` is a constant, like any folded
re-parameterization. It reaches a model in two forms:

* the old hook, ``torch.nn.utils.weight_norm``: parameters ``weight_g``/``weight_v`` and a
  forward pre-hook that recomputes ``weight`` (a non-leaf tensor attribute that
  ``copy.deepcopy`` refuses); spectral normalisation's old hook works the same way;
* ``torch.nn.utils.parametrizations`` (``weight_norm``, ``spectral_norm``, orthogonal, user
  parametrizations): ``module.parametrizations.<name>`` computes the tensor on access.

:func:`fold_weight_normalisation` evaluates each of them once, in eval mode, and stores the
result as an ordinary ``nn.Parameter`` (``remove_weight_norm``, ``remove_spectral_norm``,
``remove_parametrizations(leave_parametrized=True)``): the function the model computes is
unchanged, and the graph passes then see plain convs. It runs on the loaded model before
the passes, so the fp32 reference and the engine compute from the same weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm


def fold_weight_normalisation(model: nn.Module) -> list[str]:
    """Fold in place; returns ``"module.tensor (kind)"`` for every tensor folded."""
    model.eval()
    folded: list[str] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            where = name or type(module).__name__
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, WeightNorm):
                    remove_weight_norm(module, hook.name)
                    folded.append(f"{where}.{hook.name} (weight_norm)")
                elif isinstance(hook, SpectralNorm):
                    remove_spectral_norm(module, hook.name)
                    folded.append(f"{where}.{hook.name} (spectral_norm)")
            if parametrize.is_parametrized(module):
                for tensor in list(module.parametrizations.keys()):  # type: ignore[union-attr]
                    kinds = ", ".join(
                        type(p).__name__.lstrip("_")
                        for p in module.parametrizations[tensor]  # type: ignore[index]
                    )
                    parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                    folded.append(f"{where}.{tensor} ({kinds})")
    return folded
