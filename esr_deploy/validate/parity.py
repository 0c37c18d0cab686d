"""Per-image validation of an engine against the PyTorch reference and the HR images.

For every LR/HR pair of a validation set:

- **parity**: engine output ``e`` vs reference output ``r`` of the fp32 *training-form*
  PyTorch model, both divided by ``data_range`` and clamped to [0, 1]:
  ``PSNR = 10 log10(1 / mean((e - r)^2))`` over all RGB values, and ``max |e - r|``.
  Identical outputs give an infinite PSNR, stored as :data:`PSNR_CAP` so the manifest stays
  valid JSON.
- **task quality**: PSNR and SSIM on the Y channel (BT.601) against HR, border = scale, output
  clamped and rounded to uint8, for the reference and the engine; ``drop = ref - engine``.

A set passes when every image's parity PSNR reaches the precision's floor and the set's mean
PSNR drop stays within its budget (:class:`esr_deploy.recipe.Tolerances`).

**Reference side computed once.** Searches validate many candidate engines against the same
reference (the int8 sensitivity search, ``--target auto``), so the reference's part of every
image — its output in RGB, that output as ``uint8`` and its PSNR-Y/SSIM-Y against HR — is
kept per reference callable (weakly: it goes when the reference goes) and per image (set
and image name, LR bytes, recipe range and colour order). The numbers are the ones a fresh
computation gives: the same functions on the same arrays.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from esr_deploy.data import ImagePair, ValidationSet, to_tensor, to_uint8
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.recipe import PARITY_PSNR_CAP, Recipe, Tolerances
from esr_deploy.validate.quality import max_abs_error, psnr, psnr_y, ssim_y

#: Parity PSNR reported for outputs identical to float precision (dB).
PSNR_CAP = PARITY_PSNR_CAP

EngineRun = Callable[[np.ndarray], np.ndarray]
#: The PyTorch reference: the training-form model, or any callable with its signature.
ReferenceRun = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class ImageResult:
    name: str
    parity_psnr: float
    parity_max_abs_error: float
    reference_psnr_y: float
    engine_psnr_y: float
    reference_ssim_y: float
    engine_ssim_y: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class SetResult:
    name: str
    images: tuple[ImageResult, ...]
    tolerance: Tolerances
    lr_generated: bool = False
    #: False when the drop is an accepted cost (lossy pruning): reported, not a failure
    gate_drop: bool = True

    def _mean(self, attr: str) -> float:
        return float(np.mean([getattr(i, attr) for i in self.images]))

    @property
    def reference_psnr_y(self) -> float:
        return self._mean("reference_psnr_y")

    @property
    def engine_psnr_y(self) -> float:
        return self._mean("engine_psnr_y")

    @property
    def psnr_drop(self) -> float:
        return self.reference_psnr_y - self.engine_psnr_y

    @property
    def parity_min_psnr(self) -> float:
        return min(i.parity_psnr for i in self.images)

    def failures(self) -> list[str]:
        """Each failed check as 'which image, which metric, measured, required'."""
        out = [
            f"{self.name}/{i.name}: parity PSNR {i.parity_psnr:.2f} dB < required "
            f"{self.tolerance.parity_min_psnr:.2f} dB (max abs error "
            f"{i.parity_max_abs_error:.3g})"
            for i in self.images
            if i.parity_psnr < self.tolerance.parity_min_psnr
        ]
        if self.gate_drop and self.psnr_drop > self.tolerance.max_psnr_drop:
            out.append(
                f"{self.name}: PSNR-Y drop {self.psnr_drop:.4f} dB > allowed "
                f"{self.tolerance.max_psnr_drop:.4f} dB (reference {self.reference_psnr_y:.4f}, "
                f"engine {self.engine_psnr_y:.4f})"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": len(self.images),
            "lr_generated": self.lr_generated,
            "reference_psnr_y": round(self.reference_psnr_y, 4),
            "engine_psnr_y": round(self.engine_psnr_y, 4),
            "psnr_drop": round(self.psnr_drop, 4),
            "reference_ssim_y": round(self._mean("reference_ssim_y"), 4),
            "engine_ssim_y": round(self._mean("engine_ssim_y"), 4),
            "parity_min_psnr": round(self.parity_min_psnr, 2),
            "parity_max_abs_error": max(i.parity_max_abs_error for i in self.images),
            "required": {
                "parity_min_psnr": self.tolerance.parity_min_psnr,
                "max_psnr_drop": self.tolerance.max_psnr_drop,
            },
            "drop_gated": self.gate_drop,
            "passed": not self.failures(),
            "per_image": [i.to_dict() for i in self.images],
        }


def model_input(img: np.ndarray, recipe: Recipe) -> torch.Tensor:
    """uint8 RGB H×W×3 → 1×3×H×W float32 in the recipe's range and colour order."""
    x = to_tensor(img, recipe.data_range)
    return x.flip(1) if recipe.color_order == "BGR" else x


def model_output(out: np.ndarray | torch.Tensor, recipe: Recipe) -> np.ndarray:
    """Network output → float32 1×3×H×W array in RGB order, same range."""
    arr = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    arr = arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(arr[:, ::-1]) if recipe.color_order == "BGR" else arr


def _parity(engine: np.ndarray, reference: np.ndarray, data_range: float) -> tuple[float, float]:
    e = np.clip(engine.astype(np.float64) / data_range, 0.0, 1.0)
    r = np.clip(reference.astype(np.float64) / data_range, 0.0, 1.0)
    value = psnr(e, r, peak=1.0)
    return (PSNR_CAP if math.isinf(value) else min(value, PSNR_CAP)), max_abs_error(e, r)


@dataclass(frozen=True)
class ReferenceImage:
    """The reference's part of one validation image (see the module docstring)."""

    output: np.ndarray  # float32 1×3×sH×sW, RGB, the recipe's range
    image: np.ndarray  # ``output`` as uint8 H×W×3
    psnr_y: float
    ssim_y: float


_ImageKey = tuple[str, str, bytes, float, str, int]
#: reference callable → image key → its ReferenceImage
_REFERENCE_CACHE: weakref.WeakKeyDictionary[Any, dict[_ImageKey, ReferenceImage]] = (
    weakref.WeakKeyDictionary()
)


def _image_key(set_name: str, pair: ImagePair, recipe: Recipe) -> _ImageKey:
    digest = hashlib.sha1(np.ascontiguousarray(pair.lr).tobytes())
    digest.update(str(pair.lr.shape).encode())
    digest.update(np.ascontiguousarray(pair.hr).tobytes())
    digest.update(str(pair.hr.shape).encode())
    ranges = (recipe.data_range, recipe.color_order, recipe.scale)
    return (set_name, pair.name, digest.digest(), *ranges)


def reference_image(
    set_name: str, pair: ImagePair, x: torch.Tensor, reference: ReferenceRun, recipe: Recipe
) -> ReferenceImage:
    """The reference's output and metrics for ``pair`` (input ``x``), computed once per
    reference callable; a callable that cannot be weakly referenced is not cached."""
    try:
        per_image = _REFERENCE_CACHE.setdefault(reference, {})
    except TypeError:  # not weakly referenceable: compute every time
        per_image = {}
    key = _image_key(set_name, pair, recipe)
    if key not in per_image:
        with torch.no_grad():
            out = model_output(reference(x), recipe)
        img = to_uint8(out, recipe.data_range)
        border = recipe.scale
        per_image[key] = ReferenceImage(
            out, img, psnr_y(img, pair.hr, border), ssim_y(img, pair.hr, border)
        )
    return per_image[key]


def evaluate_set(
    vset: ValidationSet,
    reference: ReferenceRun,
    engine: EngineRun,
    recipe: Recipe,
    tolerance: Tolerances,
    progress: Progress | None = None,
    parity_reference: ReferenceRun | None = None,
) -> SetResult:
    """Run reference and engine on every image of ``vset``; see the module docstring.

    ``parity_reference``: when the engine is *meant* to differ from ``reference`` (lossy
    pruning), parity is measured against the model it was built from, and the PSNR drop
    against ``reference`` is reported but not a failure.
    """
    progress = progress or NullProgress()
    results: list[ImageResult] = []
    border = recipe.scale
    with progress.task(f"validating on {vset.name}", len(vset.pairs)) as advance:
        for pair in vset.pairs:
            x = model_input(pair.lr, recipe)
            ref = reference_image(vset.name, pair, x, reference, recipe)
            if parity_reference is None:
                base = ref.output
            else:
                with torch.no_grad():
                    base = model_output(parity_reference(x), recipe)
            eng = model_output(engine(x.numpy()), recipe)
            p, err = _parity(eng, base, recipe.data_range)
            eng_img = to_uint8(eng, recipe.data_range)
            results.append(
                ImageResult(
                    name=pair.name,
                    parity_psnr=p,
                    parity_max_abs_error=err,
                    reference_psnr_y=ref.psnr_y,
                    engine_psnr_y=psnr_y(eng_img, pair.hr, border),
                    reference_ssim_y=ref.ssim_y,
                    engine_ssim_y=ssim_y(eng_img, pair.hr, border),
                )
            )
            advance()
    return SetResult(
        name=vset.name,
        images=tuple(results),
        tolerance=tolerance,
        lr_generated=vset.lr_generated,
        gate_drop=parity_reference is None,
    )
