"""Settings of ``esr-deploy bench``: the defaults (one table; the CLI reads them from here)
and the options object. Imports nothing heavy."""

from __future__ import annotations

import math
from dataclasses import dataclass

from esr_deploy.errors import EsrDeployError
from esr_deploy.shapes import HW

#: Defaults of ``esr-deploy bench`` (one table; the CLI reads them from here).
DEFAULT_RUNS = 20
DEFAULT_WARMUP = 1
DEFAULT_MAX_REGRESSION = 0.10
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
#: LR shape timed when neither ``--shape`` nor the manifest's ``profile.opt`` says one.
FALLBACK_SHAPE: HW = (256, 256)
#: Fewest timed rounds accepted: below this a bootstrap interval of a median means nothing.
MIN_RUNS = 3
MIN_RESAMPLES = 100


def parse_max_regression(text: str) -> float:
    """``"10%"`` or ``"0.1"`` → 0.1. A bare number is a fraction and must be at most 1
    (``"10"`` is refused as ambiguous: write ``10%``); more than doubling is ``"150%"``.

    Raises:
        EsrDeployError: not a number, negative, not finite, or a bare number above 1.
    """
    raw = text.strip()
    percent = raw.endswith("%")
    number = raw[:-1].strip() if percent else raw
    try:
        value = float(number)
    except ValueError:
        raise EsrDeployError(
            f"--max-regression '{text}' is not a number — give the allowed slowdown as a "
            "percentage or a fraction, e.g. 10% or 0.1."
        ) from None
    if not math.isfinite(value) or value < 0:
        raise EsrDeployError(
            f"--max-regression '{text}' is {'negative' if value < 0 else 'not finite'} — the "
            "allowed slowdown is 0 or more, e.g. 10% or 0.1 (0 flags any significant slowdown)."
        )
    if percent:
        return value / 100.0
    if value > 1:
        raise EsrDeployError(
            f"--max-regression '{text}' is ambiguous: a bare number is a fraction (0.1 = 10%), "
            f"and {value:g} would allow a {value * 100:g}% slowdown — write {value:g}% if that "
            f"is what you meant, or {value / 100:g}."
        )
    return value


@dataclass(frozen=True)
class BenchOptions:
    """How to time: the LR shape (None: the candidate's ``profile.opt``), rounds, the allowed
    slowdown and the bootstrap's settings."""

    shape: HW | None = None
    runs: int = DEFAULT_RUNS
    warmup: int = DEFAULT_WARMUP
    max_regression: float = DEFAULT_MAX_REGRESSION
    confidence: float = DEFAULT_CONFIDENCE
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    #: Precede each timed call by an untimed call of the same engine (module docstring).
    rewarm: bool = True
    #: the candidate's pinned digest (``--expect-digest``); None: not pinned
    expect_digest: str | None = None

    def check(self) -> None:
        """Raises :class:`EsrDeployError` (exit 2) on settings that cannot give an answer."""
        if self.runs < MIN_RUNS:
            raise EsrDeployError(
                f"--runs {self.runs}: too few timed rounds for a confidence interval — give "
                f"at least {MIN_RUNS} (9 to 20 are advised)."
            )
        if self.warmup < 0:
            raise EsrDeployError(f"--warmup {self.warmup} is negative — give 0 or more.")
        if not (math.isfinite(self.max_regression) and self.max_regression >= 0):
            raise EsrDeployError(
                f"max_regression {self.max_regression} — the allowed slowdown is 0 or more."
            )
        if not 0.0 < self.confidence < 1.0:
            raise EsrDeployError(
                f"confidence {self.confidence} is not in (0, 1) — e.g. 0.95 for 95%."
            )
        if self.resamples < MIN_RESAMPLES:
            raise EsrDeployError(
                f"resamples {self.resamples}: give at least {MIN_RESAMPLES} (default "
                f"{DEFAULT_RESAMPLES})."
            )
