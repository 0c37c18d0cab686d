"""TensorRT optimisation profiles: which input shapes an engine accepts and is tuned for.

An engine with dynamic H×W accepts only the shapes of its optimisation profiles, each a box
``min ≤ shape ≤ max`` (per dimension) tuned for ``opt``. With the recipe's LR profile (opt,
max, min), :func:`optimization_profiles` makes one profile with ``max = (H_max, W_max)`` and,
when ``H_max ≠ W_max``, a second with ``max = (W_max, H_max)``: every landscape frame up to
the max fits the first, every portrait frame the second; both take one image. A graph with a
dynamic batch gets one more profile for batches: ``min`` batch 1, ``opt`` batch
:data:`OPT_BATCH` at the recipe's opt H×W, ``max`` batch :data:`MAX_BATCH` at that same H×W
(so a batch never needs more memory than one frame at the profile's max). At run time
:func:`select_profile` picks the first profile whose box contains the input shape.

Pure Python: no TensorRT needed, so the arithmetic is tested on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from esr_deploy.errors import EsrDeployError, RecipeError
from esr_deploy.shapes import ShapeProfile

#: batch profile of a graph with a dynamic batch: opt and max batch (at the recipe's opt H×W)
OPT_BATCH = 4
MAX_BATCH = 8
#: Smallest LR size used when the exporter has not derived the graph's minimum.
FALLBACK_MIN_HW = (1, 1)

NCHW = tuple[int, int, int, int]


@dataclass(frozen=True)
class ProfileShapes:
    """One optimisation profile of the engine's input: NCHW ``min ≤ opt ≤ max``."""

    min: NCHW
    opt: NCHW
    max: NCHW

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == 4 and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> ProfileShapes:
        return cls(nchw(data["min"]), nchw(data["opt"]), nchw(data["max"]))

    def describe(self) -> str:
        return f"{fmt_shape(self.min)} to {fmt_shape(self.max)} (opt {fmt_shape(self.opt)})"


def nchw(values: Sequence[int]) -> NCHW:
    n, c, h, w = (int(v) for v in values)
    return (n, c, h, w)


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def _clip(value: int, lo: int, hi: int) -> int:
    return max(lo, min(value, hi))


def optimization_profiles(
    profile: ShapeProfile, batch: int = 1, channels: int = 3, max_batch: int = 1
) -> list[ProfileShapes]:
    """The engine's optimisation profiles for the LR ``profile`` (see the module docstring).

    Profile 1: ``max = (N, C, H_max, W_max)``; profile 2, only when ``H_max ≠ W_max``:
    ``max = (N, C, W_max, H_max)``. ``min`` is the exporter's derived minimum
    (:data:`FALLBACK_MIN_HW` when none was derived), the same in both: it is a property of
    the graph, per axis, not of the frame's orientation. ``opt`` is the recipe's opt
    (transposed for the transposed profile, so a portrait profile is tuned for the portrait
    form of the same frame) clipped into ``[min, max]`` per axis. ``max_batch`` > 1 (a graph
    with a dynamic batch) adds the batch profile: ``(1..min(OPT_BATCH, max_batch)..max_batch,
    C, min..opt..opt)``.
    """
    h_max, w_max = profile.max
    h_min, w_min = profile.min or FALLBACK_MIN_HW
    maxima = [(h_max, w_max)] + ([(w_max, h_max)] if h_max != w_max else [])
    profiles = []
    for index, (hi_h, hi_w) in enumerate(maxima):
        if h_min > hi_h or w_min > hi_w:
            raise RecipeError(
                f"The shape profile cannot hold a TensorRT optimisation profile: the smallest "
                f"input the graph accepts, {h_min}x{w_min}, exceeds the largest, "
                f"{hi_h}x{hi_w} — raise [profile] max in the recipe."
            )
        opt_h, opt_w = profile.opt if index == 0 else (profile.opt[1], profile.opt[0])
        profiles.append(
            ProfileShapes(
                min=(batch, channels, h_min, w_min),
                opt=(batch, channels, _clip(opt_h, h_min, hi_h), _clip(opt_w, w_min, hi_w)),
                max=(batch, channels, hi_h, hi_w),
            )
        )
    if max_batch > 1:
        first = profiles[0]
        opt_hw = first.opt[2:]
        profiles.append(
            ProfileShapes(
                min=(1, channels, h_min, w_min),
                opt=(min(OPT_BATCH, max_batch), channels, *opt_hw),
                max=(max_batch, channels, *opt_hw),
            )
        )
    return profiles


def select_profile(profiles: Sequence[ProfileShapes], shape: Sequence[int]) -> int:
    """Index of the first profile whose ``[min, max]`` box contains ``shape``."""
    for index, candidate in enumerate(profiles):
        if candidate.contains(shape):
            return index
    ranges = "; ".join(p.describe() for p in profiles) or "none"
    raise EsrDeployError(
        f"The TensorRT engine cannot run an input of shape {fmt_shape(shape)} — its "
        f"optimisation profiles accept {ranges} — tile the image into pieces that fit, or "
        "recompile with a larger [profile] max in the recipe."
    )
