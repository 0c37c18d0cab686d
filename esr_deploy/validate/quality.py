"""Image-quality metrics: task PSNR/SSIM on the Y channel, and parity metrics on raw outputs.

Task protocol (``/work/shared/weights/README.md``, the common SR evaluation): SR output
and HR as ``uint8`` RGB, HR mod-cropped, both cropped by ``border`` (= scale) pixels at
every side, compared on the ITU-R BT.601 luma

    Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255          (R, G, B in 0..255)

computed in float64 (``round_y=True`` rounds Y to integers first, as MATLAB's
``rgb2ycbcr`` on uint8 images does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from esr_deploy.errors import DataError

__all__ = [
    "gaussian_window",
    "max_abs_error",
    "psnr",
    "psnr_y",
    "rgb_to_y",
    "ssim_y",
]

_BT601 = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of a ``uint8`` (or 0..255 float) H×W×3 RGB image, float64 in [16, 235].

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``.
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(f"rgb_to_y expects an H×W×3 RGB image, got shape {img.shape}")
    x = img.astype(np.float64)
    return 16.0 + (x[..., 0] * _BT601[0] + x[..., 1] * _BT601[1] + x[..., 2] * _BT601[2]) / 255.0


def _check_pair(sr: np.ndarray, hr: np.ndarray, border: int) -> None:
    if sr.shape != hr.shape:
        raise DataError(
            f"SR and HR sizes differ: SR {sr.shape}, HR {hr.shape} — "
            "mod-crop the HR to a multiple of the scale"
        )
    if border < 0 or 2 * border >= min(sr.shape[0], sr.shape[1]):
        raise DataError(f"border {border} leaves nothing of a {sr.shape[1]}×{sr.shape[0]} image")


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    if border == 0:
        return y
    return y[border:-border, border:-border]


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int, round_y: bool = False) -> float:
    """Y-channel PSNR (dB) of two ``uint8`` H×W×3 images, ``border`` px cropped per side.

    ``PSNR = 10 log10(255² / mean((Y_sr − Y_hr)²))``; ``inf`` for identical crops.
    """
    _check_pair(sr, hr, border)
    ys, yh = rgb_to_y(sr), rgb_to_y(hr)
    if round_y:
        ys, yh = np.round(ys), np.round(yh)
    diff = _crop(ys, border) - _crop(yh, border)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian ``g_i ∝ exp(−(i − (size−1)/2)² / (2σ²))``, summing to 1."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with the window ``g gᵀ`` (output shrinks by len(g)−1)."""
    k = g.size
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i in range(k):
        rows += g[i] * img[i : i + h - k + 1, :]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for j in range(k):
        out += g[j] * rows[:, j : j + w - k + 1]
    return out


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int, round_y: bool = False) -> float:
    """Y-channel SSIM (Wang et al. 2004) of two ``uint8`` H×W×3 images, float64.

    With Gaussian-weighted local statistics (window 11×11, σ = 1.5), evaluated only where
    the window fits inside the ``border``-cropped image ('valid' filtering):

        SSIM = mean( (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)) ),
        C1 = (0.01 · 255)², C2 = (0.03 · 255)²,

    where μ = G∗x, σx² = G∗x² − μx², σxy = G∗(xy) − μx μy. ``round_y`` rounds Y to
    integers first (MATLAB-style evaluation).
    """
    _check_pair(sr, hr, border)
    ys, yh = rgb_to_y(sr), rgb_to_y(hr)
    if round_y:
        ys, yh = np.round(ys), np.round(yh)
    x = _crop(ys, border)
    y = _crop(yh, border)
    g = gaussian_window(11, 1.5)
    if min(x.shape) < g.size:
        raise DataError(
            f"SSIM needs at least {g.size}×{g.size} pixels after cropping {border} px, "
            f"got {x.shape[1]}×{x.shape[0]}"
        )
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    mu_x = _filter_valid(x, g)
    mu_y = _filter_valid(y, g)
    mu_x2, mu_y2, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_x2 = _filter_valid(x * x, g) - mu_x2
    sigma_y2 = _filter_valid(y * y, g) - mu_y2
    sigma_xy = _filter_valid(x * y, g) - mu_xy
    ssim_map = ((2.0 * mu_xy + c1) * (2.0 * sigma_xy + c2)) / (
        (mu_x2 + mu_y2 + c1) * (sigma_x2 + sigma_y2 + c2)
    )
    return float(ssim_map.mean())


def _as_float64(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, peak: float) -> float:
    """PSNR (dB) between two float arrays/tensors: ``10 log10(peak² / mean((a − b)²))``.

    Computed in float64. Identical inputs give ``float('inf')``: callers comparing it with a
    threshold get the right answer, but must handle it before writing JSON (``inf`` is not
    valid JSON) or averaging.
    """
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise DataError(f"psnr: shapes differ, {x.shape} vs {y.shape}")
    d = x - y
    mse = float(np.mean(d * d))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(float(peak) ** 2 / mse)


def max_abs_error(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """``max |a − b|`` over all elements, in float64 (0.0 for empty inputs)."""
    x, y = _as_float64(a), _as_float64(b)
    if x.shape != y.shape:
        raise DataError(f"max_abs_error: shapes differ, {x.shape} vs {y.shape}")
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x - y)))
