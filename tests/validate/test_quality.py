"""Tests of esr_deploy.validate.quality: the Y-channel PSNR/SSIM protocol and parity metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esr_deploy.data import imresize, load_validation_set
from esr_deploy.errors import DataError
from esr_deploy.validate.quality import (
    gaussian_window,
    max_abs_error,
    psnr,
    psnr_y,
    rgb_to_y,
    ssim_y,
)

RNG = np.random.default_rng(1)


def _img(h: int = 40, w: int = 48) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_to_y_known_values() -> None:
    px = np.array(
        [[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8
    )
    y = rgb_to_y(px)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966])


def test_psnr_y_constructed_pair() -> None:
    hr = np.full((32, 32, 3), 100, dtype=np.uint8)
    sr = hr + np.uint8(3)
    # Y difference = 3 · (65.481 + 128.553 + 24.966) / 255 = 3 · 219 / 255 everywhere.
    dy = 3 * 219 / 255
    expected = 10 * math.log10(255**2 / dy**2)
    assert psnr_y(sr, hr, border=4) == pytest.approx(expected, abs=1e-9)


def test_psnr_y_border_is_cropped_and_identical_is_inf() -> None:
    hr = _img()
    sr = hr.copy()
    sr[:4] = 0
    sr[:, -4:] = 255
    assert psnr_y(sr, hr, border=4) == float("inf")
    assert math.isfinite(psnr_y(sr, hr, border=3))


def test_psnr_y_rounded() -> None:
    hr = _img()
    sr = np.clip(hr.astype(int) + RNG.integers(-5, 6, size=hr.shape), 0, 255).astype(np.uint8)
    yr = np.round(rgb_to_y(sr))[2:-2, 2:-2] - np.round(rgb_to_y(hr))[2:-2, 2:-2]
    expected = 10 * math.log10(255**2 / np.mean(yr**2))
    assert psnr_y(sr, hr, 2, round_y=True) == pytest.approx(expected, abs=1e-9)


def test_shape_mismatch_and_bad_border() -> None:
    with pytest.raises(DataError, match="differ"):
        psnr_y(_img(40, 48), _img(40, 44), 4)
    with pytest.raises(DataError, match="border"):
        ssim_y(_img(8, 8), _img(8, 8), 4)


def test_ssim_self_is_one_and_symmetric() -> None:
    a = _img()
    assert ssim_y(a, a, 4) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a.astype(int) + RNG.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
    s = ssim_y(a, b, 4)
    assert 0.0 < s < 1.0
    assert ssim_y(b, a, 4) == pytest.approx(s, abs=1e-12)


def test_ssim_matches_independent_conv2d_implementation() -> None:
    """The numpy separable 'valid' filtering equals a torch conv2d with the 2-D window."""
    a, b = _img(50, 45), _img(50, 45)
    g = gaussian_window(11, 1.5)
    assert g.sum() == pytest.approx(1.0) and g[5] == g.max()
    w = torch.from_numpy(np.outer(g, g))[None, None]

    def filt(x: np.ndarray) -> torch.Tensor:
        return F.conv2d(torch.from_numpy(x)[None, None], w)[0, 0]

    x = rgb_to_y(a)[3:-3, 3:-3]
    y = rgb_to_y(b)[3:-3, 3:-3]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    ref = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    assert ssim_y(a, b, 3) == pytest.approx(float(ref.mean()), abs=1e-12)


def test_bicubic_baseline_set5(sr_data_dir: Path) -> None:
    """MATLAB bicubic x4 upscaling of Set5 LR: the classic 28.42 dB / 0.8104 baseline."""
    vs = load_validation_set(sr_data_dir / "Set5", 4)
    p, pr, s = [], [], []
    for pair in vs.pairs:
        sr = imresize(pair.lr, 4)
        p.append(psnr_y(sr, pair.hr, 4))
        pr.append(psnr_y(sr, pair.hr, 4, round_y=True))
        s.append(ssim_y(sr, pair.hr, 4))
    # Measured: 28.4290 dB (float Y), 28.4164 dB (rounded Y), SSIM 0.81114 (float Y).
    assert np.mean(p) == pytest.approx(28.4290, abs=1e-3)
    assert np.mean(pr) == pytest.approx(28.4164, abs=1e-3)
    assert np.mean(s) == pytest.approx(0.81114, abs=1e-4)
    assert abs(np.mean(pr) - 28.42) < 0.01 and abs(np.mean(s) - 0.8104) < 0.001


def test_psnr_float_known_and_inf() -> None:
    a = np.zeros((2, 3, 4, 4), dtype=np.float32)
    b = a + 0.1
    assert psnr(a, b, peak=1.0) == pytest.approx(20.0, abs=1e-5)
    assert psnr(torch.from_numpy(a), torch.from_numpy(b), peak=1.0) == pytest.approx(
        psnr(a, b, 1.0)
    )
    assert psnr(a, a, 1.0) == float("inf")
    assert psnr(a, b * 255, peak=255.0) == pytest.approx(20.0, abs=1e-4)


def test_max_abs_error() -> None:
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[0, 1, 2, 3] = -0.25
    assert max_abs_error(a, b) == pytest.approx(0.25)
    assert max_abs_error(a.numpy(), a) == 0.0
    with pytest.raises(DataError):
        max_abs_error(a, torch.zeros(1, 3, 4, 5))
