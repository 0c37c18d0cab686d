"""Sensitivity search: which layers stay in float so the int8 engine meets its PSNR budget.

Quantising every conv of an SR network usually costs more than the 0.15 dB budget, and a
few layers carry most of the loss: the first conv (it sees the 0..255 image, whose int8 step
is 2 grey levels), the conv before the pixel shuffle (its error is the output's error) and
attention paths whose sigmoid gates multiply everything after them. The search:

1. **Ranking** on the calibration images ``x`` (cropped to at most :data:`RANK_CROP`): with
   ``y`` the fp32 output, ``q_S`` the output with every candidate quantised except the set
   ``S``, each candidate ``n`` scores ``gain(n) = mse(q_∅, y) - mse(q_{n}, y)``: the error
   removed by keeping ``n`` alone in float.
2. **Choice**: the smallest ``k`` such that keeping the ``k`` highest-ranked candidates in
   float passes ``accept`` (the compile's own validation gate: parity floor and PSNR-Y drop
   on every validation set). The drop is close to monotone in ``k``, so ``k`` is found by
   bisection over ``[0, N]`` after checking ``k = 0`` and ``k = N``; the chosen ``k`` is
   always one that ``accept`` passed.

Candidates are the nodes whose quantisation adds error of their own: weighted layers
(Conv, ConvTranspose) and element-wise ops (the sigmoid gates and products of attention
blocks are often the costliest). Keeping one in float keeps its weights in float, feeds it
the float tensors and leaves its outputs unquantised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from esr_deploy.precision.calibration import centre_crop
from esr_deploy.precision.int8 import Int8Result
from esr_deploy.progress import NullProgress, Progress

log = logging.getLogger(__name__)

#: Calibration images are cropped to at most this LR size for the ranking runs.
RANK_CROP = (96, 96)

Quantize = Callable[[Sequence[str]], Int8Result]
Accept = Callable[[Int8Result], tuple[bool, str]]


@dataclass(frozen=True)
class SearchStep:
    kept_float: int
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kept_float": self.kept_float, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class SensitivityResult:
    result: Int8Result
    ranking: tuple[tuple[str, float], ...]
    steps: tuple[SearchStep, ...] = field(default_factory=tuple)
    passed: bool = True

    def to_dict(self) -> dict[str, Any]:
        kept = set(self.result.excluded)
        return {
            "candidates": len(self.ranking),
            "kept_float": [{"node": n, "mse_gain": g} for n, g in self.ranking if n in kept],
            "steps": [s.to_dict() for s in self.steps],
            "passed": self.passed,
        }


def _outputs(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    from esr_deploy.backends.onnxruntime import cpu_session

    session = cpu_session(model.SerializeToString())
    name = session.get_inputs()[0].name
    return [np.asarray(session.run(None, {name: x})[0], dtype=np.float64) for x in inputs]


def _mse(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return float(np.mean([np.mean((x - y) ** 2) for x, y in zip(a, b, strict=True)]))


def rank_candidates(
    fp32: onnx.ModelProto,
    quantize: Quantize,
    candidates: Sequence[str],
    inputs: Sequence[np.ndarray],
    progress: Progress | None = None,
    full: Int8Result | None = None,
) -> list[tuple[str, float]]:
    """``(node, gain)`` for each candidate, highest gain first (see the module docstring);
    ``full``: ``quantize(())`` when the caller already has it."""
    progress = progress or NullProgress()
    crops = [
        np.ascontiguousarray(centre_crop(x[0].transpose(1, 2, 0), RANK_CROP).transpose(2, 0, 1))[
            None
        ]
        for x in inputs
    ]
    reference = _outputs(fp32, crops)
    base = _mse(_outputs((full or quantize(())).model, crops), reference)
    gains: list[tuple[str, float]] = []
    with progress.task("int8 sensitivity ranking", len(candidates)) as advance:
        for node in candidates:
            gains.append((node, base - _mse(_outputs(quantize((node,)).model, crops), reference)))
            advance()
    gains.sort(key=lambda g: -g[1])
    return gains


def search(
    fp32: onnx.ModelProto,
    quantize: Quantize,
    candidates: Sequence[str],
    inputs: Sequence[np.ndarray],
    accept: Accept,
    progress: Progress | None = None,
) -> SensitivityResult:
    """The int8 model with the fewest layers in float that ``accept`` passes.

    When even keeping every candidate in float fails, the result with all of them in float
    is returned with ``passed=False`` (the caller's validation then reports the failure).
    """
    steps: list[SearchStep] = []
    tried: dict[int, tuple[Int8Result, bool]] = {}

    def attempt(k: int, ranking: Sequence[tuple[str, float]]) -> bool:
        result = quantize([n for n, _ in ranking[:k]])
        ok, detail = accept(result)
        steps.append(SearchStep(k, ok, detail))
        log.info("int8 search: %d layers in float: %s (%s)", k, "pass" if ok else "fail", detail)
        tried[k] = (result, ok)
        return ok

    if attempt(0, ()):
        return SensitivityResult(tried[0][0], (), tuple(steps))
    ranking = rank_candidates(fp32, quantize, candidates, inputs, progress, tried[0][0])
    n = len(ranking)
    if n == 0 or not attempt(n, ranking):
        return SensitivityResult(
            tried[n][0] if n else tried[0][0], tuple(ranking), tuple(steps), False
        )
    lo, hi = 0, n  # lo fails, hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid, ranking):
            hi = mid
        else:
            lo = mid
    return SensitivityResult(tried[hi][0], tuple(ranking), tuple(steps))
