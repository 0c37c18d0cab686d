"""Batches: an engine run on N different images at once must give, image by image, what N
single runs give; and what a batch buys in throughput.

**Parity.** ``N`` (= :data:`CHECK_BATCH`, fewer when the validation sets hold fewer images)
different validation LR images, centre-cropped to one common size ``s × s`` (the smallest
image side, at most :data:`CHECK_SIDE` and at least the graph's minimum input), are stacked
into one ``N×3×s×s`` call; image ``i`` of the batch output is compared with the engine's
output for image ``i`` alone, by PSNR (RGB, outputs clipped to ``0..data_range`` and scaled to
0..1, as :mod:`esr_deploy.validate.parity` does), and the lowest must reach the target's
parity floor. Kernels may differ between batch sizes (another blocking, another reduction
order), so exact equality is not required; a batch that mixes images up fails by tens of dB.

**Throughput.** At one LR shape ``h × w`` the engine runs batch 1 and batch ``N`` alternately
(:func:`esr_deploy.validate.latency.measure_interleaved` after one warm-up round), at least
3 rounds and at most ``runs``, fewer once the timed calls reach :data:`THROUGHPUT_BUDGET_S`;
recorded per batch size: the median latency of one call, ``images/s = N / median`` and the
rounds timed. Timed calls are not re-warmed (unlike the latency's): a whole-image call lasts
hundreds of milliseconds on a CPU, far longer than the caches the other batch size
disturbed take to refill, and re-warming doubled the calls of this stage (the RLFN compile's
latency stage, which holds it, went from 40.7 s to 30.0 s on 2 cores without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from esr_deploy.backends.base import EngineSession
from esr_deploy.data import ValidationSet
from esr_deploy.errors import ValidationError
from esr_deploy.recipe import Recipe
from esr_deploy.validate.latency import measure_interleaved
from esr_deploy.validate.parity import _parity, model_input

#: the batch validated and timed (the TensorRT batch profile's opt batch)
CHECK_BATCH = 4
CHECK_SIDE = 64
#: Seconds of timed calls after which the throughput rounds stop (at least 3 rounds): at
#: 256×256 on 2 cores a round of batch 1 and batch 4, each re-warmed, takes seconds.
THROUGHPUT_BUDGET_S = 4.0


def _crops(sets: Sequence[ValidationSet], min_hw: Sequence[int], recipe: Recipe) -> np.ndarray:
    images = [p.lr for s in sets for p in s.pairs][:CHECK_BATCH]
    side = min(CHECK_SIDE, *(min(i.shape[:2]) for i in images))
    side = max(side, *min_hw)
    crops = []
    for img in images:
        if min(img.shape[:2]) < side:  # mirrored up to the graph's minimum
            pad = ((0, max(0, side - img.shape[0])), (0, max(0, side - img.shape[1])), (0, 0))
            img = np.pad(img, pad, mode="symmetric")
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        crop = np.ascontiguousarray(img[top : top + side, left : left + side])
        crops.append(model_input(crop, recipe).numpy())
    return np.concatenate(crops).astype(np.float32)


def check_batch(
    session: EngineSession,
    sets: Sequence[ValidationSet],
    recipe: Recipe,
    min_hw: Sequence[int],
    floor_db: float,
) -> dict[str, Any]:
    """Batch-vs-single parity (see the module docstring); raises :class:`ValidationError`
    below ``floor_db``. Returns the manifest's ``batch.parity`` record."""
    x = _crops(sets, min_hw, recipe)
    n = x.shape[0]
    batched = np.asarray(session.run(x))
    if batched.shape[0] != n:
        raise ValidationError(
            f"The engine returned {batched.shape[0]} images for a batch of {n} — it does not "
            "keep the batch dimension; recompile (the export must have a dynamic batch)."
        )
    worst, worst_abs = float("inf"), 0.0
    for i in range(n):
        single = np.asarray(session.run(x[i : i + 1]))[0]
        value, abs_error = _parity(batched[i], single, recipe.data_range)
        worst, worst_abs = min(worst, value), max(worst_abs, abs_error)
    record = {
        "shape": "x".join(str(d) for d in x.shape),
        "min_psnr_vs_single": round(worst, 2),
        "max_abs_error_vs_single": worst_abs,
        "required_psnr": floor_db,
    }
    if worst < floor_db:
        raise ValidationError(
            f"A batch of {n} different images differs from {n} single runs: {worst:.1f} dB, "
            f"required {floor_db} dB (shape {record['shape']}) — the engine mixes images up "
            "in a batch; report the model and target, or serve it with batch 1.",
            details=record,
        )
    return record


def measure_throughput(
    session: EngineSession, hw: tuple[int, int], data_range: float, runs: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median latency and images/s at batch 1 and :data:`CHECK_BATCH`, keyed ``Nx3xHxW``."""
    gen = np.random.default_rng(0)
    x = (gen.random((CHECK_BATCH, 3, *hw), dtype=np.float32) * data_range).astype(np.float32)
    one, many = x[:1], x
    stats = measure_interleaved(
        [lambda: session.run(one), lambda: session.run(many)],
        warmup=min(warmup, 1),
        rounds=runs,
        rewarm=False,
        budget_s=THROUGHPUT_BUDGET_S,
    )
    return {
        f"{n}x3x{hw[0]}x{hw[1]}": {
            "median_ms": s.median_ms,
            "images_per_s": 1000.0 * n / s.median_ms,
            "runs": s.runs,
        }
        for n, s in ((1, stats[0]), (CHECK_BATCH, stats[1]))
    }
