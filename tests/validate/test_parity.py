"""Per-image validation (esr_deploy.validate.parity) on Set5: the numbers it reports are the
quality module's own on the real images, and a search that validates many engines against
one reference computes the reference's side once per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esr_deploy.data import load_validation_set, to_uint8
from esr_deploy.recipe import Recipe, Tolerances
from esr_deploy.validate.parity import evaluate_set, model_input
from esr_deploy.validate.quality import psnr_y, ssim_y

RECIPE = Recipe(name="bicubic", arch="none:None", scale=4, data_range=1.0)
TOLERANCE = Tolerances(parity_min_psnr=30.0, max_psnr_drop=0.5)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)


def test_reference_side_is_computed_once_and_equals_a_fresh_computation(
    sr_data_dir: Path,
) -> None:
    vset = load_validation_set(sr_data_dir / "Set5", 4)
    calls: list[tuple[int, ...]] = []

    def reference(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return _bicubic(x)

    def engine(x: np.ndarray) -> np.ndarray:  # the reference plus a small offset
        return _bicubic(torch.from_numpy(x)).numpy() + 0.002

    first = evaluate_set(vset, reference, engine, RECIPE, TOLERANCE)
    assert len(calls) == len(vset.pairs)
    # another engine against the same reference: the reference is not run again
    second = evaluate_set(vset, reference, lambda x: engine(x) - 0.004, RECIPE, TOLERANCE)
    assert len(calls) == len(vset.pairs)
    assert first.reference_psnr_y == second.reference_psnr_y
    assert first.engine_psnr_y != second.engine_psnr_y
    for pair, image in zip(vset.pairs, first.images, strict=True):
        ref = to_uint8(_bicubic(model_input(pair.lr, RECIPE)), 1.0)
        assert image.reference_psnr_y == pytest.approx(psnr_y(ref, pair.hr, 4), abs=1e-12)
        assert image.reference_ssim_y == pytest.approx(ssim_y(ref, pair.hr, 4), abs=1e-12)
        eng = to_uint8(engine(model_input(pair.lr, RECIPE).numpy()), 1.0)
        assert image.engine_psnr_y == pytest.approx(psnr_y(eng, pair.hr, 4), abs=1e-12)
        assert 45.0 < image.parity_psnr < 60.0  # an offset of 0.002 of the range: ~54 dB
    # a different reference (another callable) is computed afresh, not read from the first
    other = evaluate_set(vset, lambda x: reference(x) * 0.5, engine, RECIPE, TOLERANCE)
    assert len(calls) == 2 * len(vset.pairs)
    assert other.reference_psnr_y < first.reference_psnr_y - 3.0
    assert other.failures()  # engine vs a half-bright reference: parity fails
