"""What a compile is asked to do (:class:`CompileOptions`), what it returns
(:class:`CompileResult`), and the checks that refuse contradictory options before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esr_deploy.errors import EsrDeployError
from esr_deploy.export import EXPORTERS
from esr_deploy.loading.detect import ModelSource
from esr_deploy.precision.apply import PrecisionOptions, check_precision_options

HW = tuple[int, int]
#: Default latency shapes (LR H×W): the NTIRE 256×256 and a 720p LR frame.
DEFAULT_LATENCY_SHAPES: tuple[HW, ...] = ((256, 256), (720, 1280))
DEFAULT_LATENCY_RUNS = 10
#: Shapes with more LR pixels than this are timed with one warm-up and LARGE_SHAPE_RUNS runs
#: (a 720p LR frame at x4 takes seconds per run on a 2-core CPU); ``--latency-runs`` and the
#: warm-up apply in full to the smaller shapes. More runs at large shapes: --large-runs.
LARGE_SHAPE_PIXELS = 512 * 512
LARGE_SHAPE_RUNS = 2
#: Seconds of timed runs per shape after which no more are started (at least 3 runs, 1 at
#: large shapes): the runs asked for are an upper bound, so a slow engine does not make a
#: compile wait minutes for its latency figures (``esr-deploy bench`` times without it).
LATENCY_BUDGET_S = 3.0


@dataclass(frozen=True)
class CompileOptions:
    source: ModelSource
    target: str = "ort-fp32"
    exporter: str = "auto"  # esr_deploy.export.EXPORTERS
    val_dirs: tuple[Path, ...] = ()
    out: Path | None = None
    engines_dir: Path = Path("engines")
    latency_shapes: tuple[HW, ...] = DEFAULT_LATENCY_SHAPES
    latency_runs: int = DEFAULT_LATENCY_RUNS
    latency_warmup: int = 2
    large_runs: int = LARGE_SHAPE_RUNS
    passes: tuple[str, ...] | None = None  # None: DEFAULT_PASSES
    accept_border_drift: bool = False
    prune_ratio: float | None = None  # lossy prune-channels: fraction removed per group
    prune_to: int | None = None  # lossy prune-channels: channels kept per group
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)  # fp16/int8 targets
    auto_candidates: tuple[str, ...] | None = None  # --target auto: None = AUTO_CANDIDATES
    #: --target auto: the peers (esr_deploy.validate.peers) timed beside the candidates;
    #: None = AUTO_PEERS, () = none (--no-peers)
    auto_peers: tuple[str, ...] | None = None
    #: tighter PSNR-Y drop budget than the recipe's for this precision (dB); --target auto
    #: holds every candidate to AUTO_MAX_PSNR_DROP unless given
    max_psnr_drop: float | None = None

    @property
    def lossy_pruning(self) -> bool:
        return self.prune_ratio is not None or self.prune_to is not None


@dataclass(frozen=True)
class CompileResult:
    bundle: Path
    manifest: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: ``sha256:…`` of the canonical manifest (:mod:`esr_deploy.runtime.bundle_reader`)
    digest: str = ""


def check_peers(names: tuple[str, ...]) -> None:
    """Refuse ``--auto-peers`` names that are not peers (:data:`esr_deploy.validate.peers.PEERS`)
    before any work, rather than after every candidate was built."""
    from esr_deploy.validate.peers import PEERS

    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise EsrDeployError(
            f"--auto-peers: unknown peer(s) {', '.join(unknown)} — the peers are "
            f"{', '.join(PEERS)}, or 'none'."
        )


def check_options(options: CompileOptions) -> None:
    """Refuse contradictory or out-of-range options before any work (exit code 2)."""
    src = options.source
    if src.arch and src.recipe:
        raise EsrDeployError(
            "Give --arch or --recipe, not both — --recipe names a recipe that already has an "
            "architecture; --arch describes one that is not in a recipe."
        )
    if not src.arch and (src.scale is not None or src.data_range is not None):
        raise EsrDeployError(
            "--scale and --data-range go with --arch; a recipe (named or detected) states "
            "them — edit a copy of the recipe to change them."
        )
    if options.prune_ratio is not None and options.prune_to is not None:
        raise EsrDeployError("Give --prune-ratio or --prune-to, not both.")
    ratio = options.prune_ratio
    if ratio is not None and not 0.0 < ratio < 1.0:  # also refuses NaN
        raise EsrDeployError(f"--prune-ratio must be between 0 and 1 (exclusive), got {ratio}.")
    if options.max_psnr_drop is not None and not options.max_psnr_drop >= 0.0:
        raise EsrDeployError(f"--max-drop must be 0 dB or more, got {options.max_psnr_drop}.")
    if options.prune_to is not None and options.prune_to < 1:
        raise EsrDeployError(f"--prune-to must be at least 1 channel, got {options.prune_to}.")
    check_precision_options(options.precision)
    check_peers(options.auto_peers or ())
    if options.exporter not in EXPORTERS:
        raise EsrDeployError(
            f"--exporter {options.exporter!r} is not an exporter — choose one of "
            f"{', '.join(EXPORTERS)}."
        )
