"""Sensitivity search: which layers stay in float so the int8 engine meets its PSNR budget.

Quantising every conv of an SR network usually costs more than the 0.15 dB budget, and a
few layers carry most of the loss: the first conv (it sees the 0..255 image, whose int8 step
is 2 grey levels), the conv before the pixel shuffle (its error is the output's error) and
attention paths whose sigmoid gates multiply everything after them. The search:

1. **Ranking** on probe images ``x``: :data:`RANK_IMAGES` calibration images spread evenly
   over the set, each centre-cropped to at most :data:`RANK_CROP` and run in one batch per
   crop shape. With ``y`` the fp32 output, ``q_S`` the output with every candidate quantised
   except the set ``S``, each candidate ``n`` scores ``gain(n) = mse(q_∅, y) - mse(q_{n}, y)``:
   the error removed by keeping ``n`` alone in float. One probe model per candidate (Q/DQ
   graphs built without the final shape inference and checker, which the chosen model gets),
   each run by a plain ONNX Runtime session on the few probe crops: the ranking is an
   ordering, the decision is (2).
2. **Choice**: the smallest ``k`` such that keeping the ``k`` highest-ranked candidates in
   float passes ``accept`` (the compile's own validation gate: parity floor and PSNR-Y drop
   on every validation set, full sets). The drop is close to monotone in ``k`` and the
   answer is usually a handful of layers, so ``k`` is found by a galloping search: ``k =
   1, 2, 4, …`` until one passes (``k = N`` last), then bisection between the last failing
   and the first passing ``k``; about ``2 log2(k)`` gate runs instead of ``log2(N)`` plus
   the two ends. The chosen ``k`` is always one that ``accept`` passed.

Candidates are the nodes whose quantisation adds error of their own: weighted layers
(Conv, ConvTranspose) and element-wise ops (the sigmoid gates and products of attention
blocks are often the costliest). Keeping one in float keeps its weights in float, feeds it
the float tensors and leaves its outputs unquantised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from esr_deploy.precision.calibration import centre_crop
from esr_deploy.precision.int8 import Int8Result
from esr_deploy.progress import NullProgress, Progress

log = logging.getLogger(__name__)

#: Probe images of the ranking: at most this many calibration images, spread over the set...
RANK_IMAGES = 8
#: ...each centre-cropped to at most this LR size (48×48 crops chose, on Set5 alone, layers
#: kept float that left too few convs between Q/DQ pairs for ONNX Runtime to fuse).
RANK_CROP = (96, 96)


class Quantize(Protocol):
    """The Q/DQ model with ``exclude`` kept in float; ``check=False`` may skip the final
    shape inference and ONNX checker (the ranking's throwaway probes)."""

    def __call__(self, exclude: Sequence[str], check: bool = True) -> Int8Result: ...


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


def probe_batches(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The ranking's probe inputs (see the module docstring): N×3×h×w batches, one per crop
    shape, in the order of ``inputs``."""
    if not inputs:
        return []
    picks = sorted({round(i) for i in np.linspace(0, len(inputs) - 1, RANK_IMAGES)})
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i in picks:
        crop = centre_crop(inputs[i][0].transpose(1, 2, 0), RANK_CROP).transpose(2, 0, 1)
        by_shape.setdefault(crop.shape, []).append(crop)
    return [np.ascontiguousarray(np.stack(crops), dtype=np.float32) for crops in by_shape.values()]


def _outputs(model: onnx.ModelProto, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    from esr_deploy.backends.onnxruntime import cpu_session

    session = cpu_session(model.SerializeToString())
    name = session.get_inputs()[0].name
    return [np.asarray(session.run(None, {name: x})[0], dtype=np.float64) for x in batches]


def _mse(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean over images of each image's mean squared difference."""
    per_image = [np.mean((x - y) ** 2, axis=(1, 2, 3)) for x, y in zip(a, b, strict=True)]
    return float(np.mean(np.concatenate(per_image)))


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
    batches = probe_batches(inputs)
    reference = _outputs(fp32, batches)
    base = _mse(_outputs((full or quantize(())).model, batches), reference)
    gains: list[tuple[str, float]] = []
    with progress.task("int8 sensitivity ranking", len(candidates)) as advance:
        for node in candidates:
            probe = quantize((node,), check=False).model
            gains.append((node, base - _mse(_outputs(probe, batches), reference)))
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
    if n == 0:
        return SensitivityResult(tried[0][0], (), tuple(steps), False)
    lo, hi = 0, n  # lo failed; hi passes once tried (k = n is tried only when all below fail)
    k = 1
    while k < n:  # galloping: 1, 2, 4, ...
        if attempt(k, ranking):
            hi = k
            break
        lo, k = k, 2 * k
    if hi == n and not attempt(n, ranking):
        return SensitivityResult(tried[n][0], tuple(ranking), tuple(steps), False)
    while hi - lo > 1:  # bisection: lo fails, hi passes
        mid = (lo + hi) // 2
        if attempt(mid, ranking):
            hi = mid
        else:
            lo = mid
    return SensitivityResult(tried[hi][0], tuple(ranking), tuple(steps))
