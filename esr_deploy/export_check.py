"""The export check: does the ONNX graph compute what the PyTorch model computes, at every size?

Inputs (:func:`export_check_inputs`) are real LR images, cropped (or mirrored out) to the
smallest accepted size, to odd sizes that are not multiples of any window or patch size, and to
a full image: trained SR networks are well conditioned on images, while uniform noise can drive
a sound network where float32 itself is unstable (outputs of ±400 whose float32 and float64
results differ by hundreds). Random inputs are used only when no image is at hand.

For each input, :func:`check_graph` runs the graph with ONNX Runtime and compares it with the
model (float32) relative to the output span (at least the data range). When the difference is
above the tolerance and float32 is itself unstable on that input, the graph is held to a
float64 reference instead (:mod:`esr_deploy.float64_reference`). A failure names the input,
its size, and the node: the ONNX node ONNX Runtime stopped at, or (dynamo exports) the first
intermediate value that differs from the exported program's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esr_deploy.float64_reference import float32_instability

log = logging.getLogger(__name__)

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
#: Odd sizes (H, W) the check crops real images to: no multiple of 2, 4, 8 or 16.
ODD_HW = ((37, 53), (45, 27))
_SEED = 20260
#: Labelled inputs: ("bird.png 37×53", 1×3×H×W float32 tensor).
CheckInput = tuple[str, torch.Tensor]


def _crop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """The top-left ``h``×``w`` of ``img`` (H×W×C), mirrored out where the image is smaller."""
    ph, pw = max(0, h - img.shape[0]), max(0, w - img.shape[1])
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(img[:h, :w])


def export_check_inputs(
    images: Sequence[tuple[str, np.ndarray]],
    to_input: Callable[[np.ndarray], torch.Tensor],
    min_hw: tuple[int, int],
    data_range: float,
) -> list[CheckInput]:
    """Real LR crops at the minimum size, at :data:`ODD_HW` and whole (see the module
    docstring); seeded random inputs of those sizes when ``images`` is empty."""
    odd = [(max(min_hw[0], h) | 1, max(min_hw[1], w) | 1) for h, w in ODD_HW]
    if not images:
        gen = torch.Generator().manual_seed(_SEED)
        return [
            (f"random {h}×{w}", torch.rand(1, 3, h, w, generator=gen) * data_range)
            for h, w in [min_hw, *odd]
        ]
    inputs = []
    first_name, first = images[0]
    inputs.append((f"{first_name} {first.shape[0]}×{first.shape[1]}", to_input(first)))
    for i, (h, w) in enumerate([min_hw, *odd]):
        name, img = images[(i + 1) % len(images)]
        inputs.append((f"{name} cropped to {h}×{w}", to_input(_crop(img, h, w))))
    return inputs


@dataclass(frozen=True)
class CheckFailure:
    """Why the graph failed on one input."""

    input: str
    kind: str  # "runtime" (ONNX Runtime raised), "shape" or "values"
    detail: str
    node: str | None = None
    held_on: tuple[str, ...] = ()  # inputs (other sizes) the graph matched before this one

    @property
    def size_dependent(self) -> bool:
        """The graph fails at this size but ran, or matched, at another."""
        return self.kind in ("runtime", "shape") or bool(self.held_on)

    def describe(self) -> str:
        at = f" at node '{self.node}'" if self.node else ""
        held = f" (it matched on {', '.join(self.held_on)})" if self.held_on else ""
        return f"on {self.input}{at}: {self.detail}{held}"


@dataclass(frozen=True)
class CheckResult:
    max_error: float  # relative to the output span, over the inputs that ran
    failure: CheckFailure | None
    notes: tuple[str, ...] = ()


_ORT_NODE = re.compile(r"[Nn]ode\.? [Nn]ame:\s*'([^']+)'|node (\S+)")


def _ort_node(message: str) -> str | None:
    match = _ORT_NODE.search(message)
    return next((g for g in match.groups() if g), None) if match else None


def check_graph(
    path: Path,
    model: nn.Module,
    data_range: float,
    inputs: Sequence[CheckInput],
    tolerance: float,
    locate: Callable[[torch.Tensor], str | None] | None = None,
) -> CheckResult:
    """Run the graph at ``path`` on ``inputs`` and compare with ``model``; see the module
    docstring. ``locate(x)`` names the first differing node for a value mismatch."""
    from esr_deploy.backends.onnxruntime import cpu_session  # the CPU runtime's one home

    session = cpu_session(path, optimize=False)
    worst, notes, held = 0.0, [], []
    for label, x in inputs:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        with torch.no_grad():
            ref = model(x).numpy()
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        except Exception as exc:  # onnxruntime raises its own untyped errors
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return CheckResult(worst, CheckFailure(label, "runtime", text, _ort_node(text)))
        if got.shape != ref.shape:
            detail = (
                f"the graph returns shape {tuple(got.shape)} for a {h}×{w} input where PyTorch "
                f"returns {tuple(ref.shape)}"
            )
            return CheckResult(worst, CheckFailure(label, "shape", detail))
        span = max(data_range, float(ref.max() - ref.min()))
        error = float(np.max(np.abs(got - ref))) / span
        if error > tolerance:
            excuse = float32_instability(model, x, ref, got, span, tolerance)
            if excuse is not None:
                notes.append(f"{label}: {excuse}")
                worst = max(worst, error)
                held.append(label)
                continue
            detail = (
                f"differs from PyTorch by {error:.3g} × the output span (allowed {tolerance:g})"
            )
            node = locate(x) if locate is not None else None
            failure = CheckFailure(label, "values", detail, node, tuple(held))
            return CheckResult(worst, failure, tuple(notes))
        worst = max(worst, error)
        held.append(label)
    return CheckResult(worst, None, tuple(notes))


def first_differing_value(program: Any, x: torch.Tensor, tolerance: float) -> str | None:
    """The first intermediate value of a dynamo ``ONNXProgram`` that differs from the exported
    program's by more than ``tolerance`` (relative to its own span), best effort."""
    try:
        from torch.onnx.verification import verify_onnx_program

        infos = verify_onnx_program(program, args=(x,), compare_intermediates=True)
    except Exception as exc:  # the verifier is best effort: it raises on unusual graphs
        log.info("intermediate comparison unavailable: %s", exc)
        return None
    for info in infos:
        if info.max_abs_diff > tolerance and info.max_rel_diff > tolerance:
            return f"{info.name} (max abs difference {info.max_abs_diff:.3g})"
    return None
