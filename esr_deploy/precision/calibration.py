"""Calibration: real LR images in, per-tensor activation statistics out (cached).

The fp16 pass needs, for every float tensor of the fp32 graph, the largest magnitude it
reaches; the int8 pass needs a clipping threshold ``amax`` per activation tensor, from which
the symmetric int8 scale is ``s = amax / 127`` (zero point 0, as TensorRT requires).

**Data.** The calibration images are LR images (``--calib DIR``, default: the LR images of
the validation sets), each centre-cropped to at most the profile's ``opt`` shape (256×256
by default) and converted exactly as at inference (:func:`esr_deploy.validate.parity.model_input`).

**Statistics.** Every float tensor of the graph (its input and every node output) is made a
graph output and the graph is run by ONNX Runtime on each image, twice:

1. ``min``, ``max`` and ``absmax = max |x|`` over all images;
2. a histogram ``h`` of ``|x|`` with :data:`HIST_BINS` equal bins on ``[0, absmax]``.

**Thresholds** (:func:`threshold`), all on the histogram of ``|x|`` (bin width ``w``):

- ``minmax``: ``amax = absmax`` (nothing is clipped; outliers cost resolution);
- ``percentile``: the smallest ``t`` with ``sum(h[|x| <= t]) >= p / 100 · sum(h)``;
- ``entropy``: TensorRT's KL-divergence method. For each candidate ``i`` (bins kept), the
  reference ``P = h[:i]`` with the clipped mass ``sum(h[i:])`` added to its last bin, and
  ``Q`` = ``h[:i]`` merged into 128 levels, each level's mass spread evenly over its
  non-empty bins; ``amax = i · w`` for the ``i`` minimising ``KL(P || Q)``.

**Cache.** Statistics are stored under ``<cache>/calibration/<key>.npz``, ``key`` the
SHA-256 of the serialized graph, of every calibration image (bytes and shape) and of
:data:`CACHE_VERSION`, so a second compile of the same model on the same data reads them
back instead of recalibrating; any change to the model or the images is a new key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from esr_deploy.data import IMAGE_EXTENSIONS, ValidationSet, read_image
from esr_deploy.errors import DataError
from esr_deploy.paths import cache_root
from esr_deploy.precision import DEFAULT_PERCENTILE, METHODS
from esr_deploy.precision.int8 import float_tensors
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.recipe import Recipe
from esr_deploy.validate.parity import model_input

log = logging.getLogger(__name__)

HIST_BINS = 2048
CACHE_VERSION = "calibration-v1"
#: Quantised levels on one side of zero for symmetric int8.
INT8_LEVELS = 127
_ENTROPY_LEVELS = 128
#: Candidate thresholds of the entropy method are tried every this many bins.
_ENTROPY_STRIDE = 8
#: Candidate thresholds of the mse method are tried every this many bins.
_MSE_STRIDE = 4


@dataclass(frozen=True)
class CalibrationSet:
    """Model inputs (float32 1×3×H×W, the recipe's range and colour order) and their origin."""

    inputs: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    source: str

    def digest(self) -> str:
        h = hashlib.sha256()
        for x in self.inputs:
            h.update(str(x.shape).encode())
            h.update(np.ascontiguousarray(x).tobytes())
        return h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": len(self.inputs),
            "shapes": sorted({f"{x.shape[2]}x{x.shape[3]}" for x in self.inputs}),
            "sha256": self.digest(),
        }


def centre_crop(img: np.ndarray, hw: Sequence[int]) -> np.ndarray:
    """The centre ``min(H, h) × min(W, w)`` window of an H×W×C image."""
    h, w = min(img.shape[0], hw[0]), min(img.shape[1], hw[1])
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return np.ascontiguousarray(img[top : top + h, left : left + w])


def calibration_set(
    calib_dir: Path | None,
    sets: Sequence[ValidationSet],
    recipe: Recipe,
    min_hw: Sequence[int] = (1, 1),
) -> CalibrationSet:
    """LR images of ``calib_dir`` (or of the validation sets), cropped to the opt shape."""
    opt = recipe.profile.opt
    named: list[tuple[str, np.ndarray]] = []
    if calib_dir is not None:
        if not calib_dir.is_dir():
            raise DataError(
                f"Calibration folder {calib_dir} does not exist or is not a folder — pass "
                "--calib a folder of LR images (png, jpg, ...)."
            )
        files = sorted(
            p for p in calib_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"No images in calibration folder {calib_dir} — it needs LR images with one "
                f"of the extensions {', '.join(IMAGE_EXTENSIONS)}."
            )
        named = [(p.name, read_image(p)) for p in files]
        source = str(calib_dir)
    else:
        named = [(f"{s.name}/{pair.name}", pair.lr) for s in sets for pair in s.pairs]
        source = "LR images of the validation sets: " + ", ".join(s.name for s in sets)
    inputs, names = [], []
    for name, img in named:
        crop = centre_crop(img, opt)
        if crop.shape[0] < min_hw[0] or crop.shape[1] < min_hw[1]:
            log.warning("calibration image %s is smaller than the model's minimum input", name)
            continue
        inputs.append(model_input(crop, recipe).numpy())
        names.append(name)
    if not inputs:
        raise DataError(
            f"No usable calibration image in {source} — every image is smaller than the "
            f"model's minimum input {tuple(min_hw)}; give --calib larger LR images."
        )
    return CalibrationSet(tuple(inputs), tuple(names), source)


@dataclass(frozen=True)
class TensorStats:
    minimum: float
    maximum: float
    absmax: float
    hist: np.ndarray  # HIST_BINS counts of |x| on [0, absmax]


@dataclass(frozen=True)
class ActivationStats:
    """Statistics of every float tensor of one graph on one calibration set.

    :meth:`amax` is computed once per tensor, method and percentile (the sensitivity search
    quantises the graph a hundred times; the ``mse`` and ``entropy`` searches over the
    histogram took most of that time)."""

    tensors: Mapping[str, TensorStats]
    key: str
    from_cache: bool = False
    _thresholds: dict[tuple[str, str, float], float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def absmax(self) -> dict[str, float]:
        return {name: t.absmax for name, t in self.tensors.items()}

    def amax(self, name: str, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
        key = (name, method, percentile)
        if key not in self._thresholds:
            self._thresholds[key] = threshold(self.tensors[name], method, percentile)
        return self._thresholds[key]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe.SerializeToString()


def _cache_key(model: onnx.ModelProto, calib: CalibrationSet) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(str(HIST_BINS).encode())
    h.update(model.SerializeToString(deterministic=True))
    h.update(calib.digest().encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> ActivationStats | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            stats = {
                n: TensorStats(float(lo), float(hi), float(a), h.copy())
                for n, lo, hi, a, h in zip(
                    names,
                    data["minimum"],
                    data["maximum"],
                    data["absmax"],
                    data["hist"],
                    strict=True,
                )
            }
    except (OSError, KeyError, ValueError) as exc:
        log.warning("calibration cache %s unreadable (%s); recalibrating", path, exc)
        return None
    return ActivationStats(stats, key, from_cache=True)


def _write_cache(path: Path, stats: ActivationStats) -> None:
    """Write atomically (a temporary file renamed into place); a failure only logs."""
    names = list(stats.tensors)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                names=np.array(names),
                minimum=np.array([stats.tensors[n].minimum for n in names]),
                maximum=np.array([stats.tensors[n].maximum for n in names]),
                absmax=np.array([stats.tensors[n].absmax for n in names]),
                hist=np.stack([stats.tensors[n].hist for n in names]),
            )
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the calibration cache %s: %s", path, exc)


def collect_stats(
    model: onnx.ModelProto,
    calib: CalibrationSet,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> ActivationStats:
    """Min, max, absmax and |x| histogram of every float tensor of ``model`` on ``calib``."""
    from esr_deploy.backends.onnxruntime import cpu_session

    progress = progress or NullProgress()
    key = _cache_key(model, calib)
    cache_file = (cache_dir or cache_root()) / "calibration" / f"{key}.npz"
    if cache_file.is_file():
        cached = _read_cache(cache_file, key)
        if cached is not None:
            log.info("calibration statistics read from %s", cache_file)
            return cached
    names = float_tensors(model)
    session = cpu_session(_with_outputs(model, names))
    input_name = session.get_inputs()[0].name
    out_names = [o.name for o in session.get_outputs()]
    wanted = [out_names.index(n) for n in names]
    lo = np.full(len(names), np.inf)
    hi = np.full(len(names), -np.inf)
    hist = np.zeros((len(names), HIST_BINS), dtype=np.int64)
    with progress.task("calibrating: ranges", len(calib.inputs)) as advance:
        for x in calib.inputs:
            outs = session.run(None, {input_name: x})
            for k, i in enumerate(wanted):
                lo[k] = min(lo[k], float(outs[i].min()))
                hi[k] = max(hi[k], float(outs[i].max()))
            advance()
    absmax = np.maximum(np.abs(lo), np.abs(hi))
    with progress.task("calibrating: histograms", len(calib.inputs)) as advance:
        for x in calib.inputs:
            outs = session.run(None, {input_name: x})
            for k, i in enumerate(wanted):
                top = absmax[k] if absmax[k] > 0 else 1.0
                hist[k] += np.histogram(np.abs(outs[i]), bins=HIST_BINS, range=(0.0, top))[0]
            advance()
    if not np.all(np.isfinite(absmax)):
        bad = [n for n, a in zip(names, absmax, strict=True) if not np.isfinite(a)]
        raise DataError(
            f"Calibration produced non-finite values in {', '.join(bad[:5])} — the fp32 model "
            "overflows on the calibration images; check the checkpoint and the data range."
        )
    stats = ActivationStats(
        {
            n: TensorStats(float(lo[k]), float(hi[k]), float(absmax[k]), hist[k])
            for k, n in enumerate(names)
        },
        key,
    )
    _write_cache(cache_file, stats)
    return stats


def threshold(stats: TensorStats, method: str, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The clipping threshold ``amax`` of one tensor; see the module docstring."""
    if stats.absmax <= 0.0:
        return 0.0
    if method == "minmax":
        return stats.absmax
    width = stats.absmax / HIST_BINS
    if method == "percentile":
        cdf = np.cumsum(stats.hist) / max(1, int(stats.hist.sum()))
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        return min(stats.absmax, (idx + 1) * width)
    if method == "entropy":
        return (_entropy_bins(stats.hist) or HIST_BINS) * width
    if method == "mse":
        return _mse_threshold(stats.hist, width)
    raise DataError(f"Unknown calibration method '{method}' — choose one of {', '.join(METHODS)}.")


def _mse_threshold(hist: np.ndarray, width: float) -> float:
    h = hist.astype(np.float64)
    total = h.sum()
    if total == 0:
        return width * len(h)
    centres = (np.arange(len(h)) + 0.5) * width
    candidates = np.arange(_MSE_STRIDE, len(h) + 1, _MSE_STRIDE) * width
    inside = centres[None, :] <= candidates[:, None]
    step = candidates / INT8_LEVELS
    rounding = (step**2 / 12.0) * (inside * h).sum(axis=1)
    clipping = (((centres[None, :] - candidates[:, None]) ** 2) * ~inside * h).sum(axis=1)
    return float(candidates[int(np.argmin(rounding + clipping))])


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """A probability vector with ``eps`` moved onto its empty bins (so KL stays finite)."""
    d = d / d.sum()
    zero = d == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_zero == 0 or n_nonzero == 0:
        return d
    return d + eps * zero - (eps * n_zero / n_nonzero) * ~zero


def _entropy_bins(hist: np.ndarray) -> int | None:
    """Bins kept by the KL-divergence threshold search (None: keep all)."""
    h = hist.astype(np.float64)
    if h.sum() == 0:
        return None
    best, best_i = float("inf"), None
    for i in range(_ENTROPY_LEVELS, len(h) + 1, _ENTROPY_STRIDE):
        kept = h[:i]
        p = kept.copy()
        p[-1] += h[i:].sum()  # clipped values land in the last bin
        present = p > 0
        # merge the i bins into 128 levels, spread each level over its non-empty bins
        edges = np.linspace(0, i, _ENTROPY_LEVELS + 1).astype(int)
        mass = np.add.reduceat(kept, edges[:-1])
        count = np.add.reduceat(present.astype(np.float64), edges[:-1])
        level = np.repeat(np.arange(_ENTROPY_LEVELS), np.diff(edges))
        q = np.where(present, (mass / np.maximum(count, 1.0))[level], 0.0)
        if q.sum() == 0:
            continue
        ps, qs = _smooth(p), _smooth(q)
        nz = ps > 0
        kl = float(np.sum(ps[nz] * np.log(ps[nz] / np.maximum(qs[nz], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i
