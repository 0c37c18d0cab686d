"""Is a float32 difference the model's own instability? Compare with a float64 reference.

A network can be sound on images and still ill-conditioned in float32 on some inputs (uniform
noise driving a sound network to outputs of ±400, where PyTorch's own float32 and float64
results differ by hundreds). Two float32 computations of it (PyTorch and ONNX Runtime, or a
model before and after an exact fold) then differ by as much, and neither is wrong. So when
a candidate differs from the float32 reference by more than the tolerance, the model is run
in float64 (on a copy): if the float32 reference is itself further than the tolerance from
float64 on that input (``unstable``), the candidate is accepted when it is within
``2 × unstable`` of float64, i.e. no less accurate than PyTorch's own float32, to a factor 2.
Models that will not run in float64 (float32 constants built in ``forward``) have no excuse.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def float64_output(model: nn.Module, x: torch.Tensor) -> np.ndarray | None:
    """``model`` run in float64 on a copy, or ``None`` where it will not run so."""
    from esr_deploy.passes.base import copy_model

    try:
        with torch.no_grad():
            return copy_model(model).double()(x.double()).numpy()
    except Exception as exc:  # models that hard-code float32 tensors raise anything
        log.info("no float64 reference: %s", exc)
        return None


def float32_instability(
    model: nn.Module,
    x: torch.Tensor,
    reference: np.ndarray,
    candidate: np.ndarray,
    span: float,
    tolerance: float,
) -> str | None:
    """A note when ``candidate`` is excused by float32 instability (module docstring), else
    ``None``. ``reference`` is ``model(x)`` in float32; errors are relative to ``span``."""
    ref64 = float64_output(model, x)
    if ref64 is None or ref64.shape != reference.shape:
        return None
    unstable = float(np.max(np.abs(reference - ref64))) / span
    error64 = float(np.max(np.abs(candidate - ref64))) / span
    if unstable > tolerance and error64 <= 2 * unstable:
        return (
            f"float32 is unstable here (PyTorch float32 differs from float64 by {unstable:.3g} "
            f"× the output span); the result is within {error64:.3g} of float64"
        )
    return None
