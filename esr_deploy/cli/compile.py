"""``esr-deploy compile``: options → a typed :class:`~esr_deploy.compiling.CompileOptions`
(built by :func:`compile_options`), the compile, and its summary (``--json``: the manifest).

``--profile`` prints the wall seconds of each compile stage that the pipeline records in the
manifest under ``compile_seconds`` ({stage: seconds, ..., "total": seconds}).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from esr_deploy.cli.common import (
    Arch,
    ArchArgs,
    DataRange,
    JsonFlag,
    Ray,
    Recipe,
    Scale,
    command,
    err,
    model_source,
    note,
    out,
    run,
    setup_logging,
    write_json,
)
from esr_deploy.errors import EsrDeployError
from esr_deploy.precision import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from esr_deploy.shapes import parse_shape

if TYPE_CHECKING:
    from esr_deploy.compiling import CompileOptions, CompileResult

#: the compile's default passes and auto candidates, as the help states them (the pipeline's
#: own defaults apply: the CLI passes None)
_DEFAULT_PASSES = "fold-reparam, fold-bn, fold-identity, merge-linear-chains"
_AUTO_CANDIDATES = "ov-int8, ort-int8, ov-bf16, ov-fp32, ort-fp32"

MATRIX_HELP = (
    "A TOML of checkpoints × targets with each cell's resources (instead of CHECKPOINT): "
    "cells run in a local process pool, or as Ray tasks with --ray."
)

Checkpoint = Annotated[
    Path | None,
    typer.Argument(
        metavar="CHECKPOINT",
        help="Checkpoint (.pth/.pt/.ckpt); or none, with --matrix.",
        show_default=False,
    ),
]
Target = Annotated[
    str,
    typer.Option(
        "--target",
        "-t",
        metavar="TARGET",
        help="Target, e.g. ort-fp32, ov-int8, trt-fp16 (`esr-deploy targets` lists them), or "
        "auto: the fastest CPU target that passes validation here.",
    ),
]
Val = Annotated[
    list[Path] | None,
    typer.Option(
        "--val",
        metavar="DIR",
        help="Validation set folder with HR/ and LR_bicubic/X<scale>/ (repeatable; default: "
        "three Set5 crops that ship with esr-deploy).",
    ),
]
OutDir = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", metavar="DIR", help="Bundle folder (default: engines/<name>-<target>)."
    ),
]
LatencyShape = Annotated[
    list[str] | None,
    typer.Option(
        metavar="HxW",
        help="LR shape to time (repeatable; default: 256x256 and 720x1280).",
    ),
]
LatencyRuns = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="Timed runs per shape, at most: none is started after 3 s of timed runs once 3 "
        "ran (esr-deploy bench times without that budget).",
    ),
]
LargeRuns = Annotated[
    int,
    typer.Option(metavar="N", help="Timed runs at shapes above 512x512 LR (after one warm-up)."),
]
NoLatency = Annotated[bool, typer.Option("--no-latency", help="Measure no latency.")]
Passes = Annotated[
    str | None,
    typer.Option(
        metavar="PASS,...",
        help=f"Graph passes to run, comma-separated, or 'none' (default: {_DEFAULT_PASSES}).",
    ),
]
PruneRatio = Annotated[
    float | None,
    typer.Option(
        metavar="FRACTION",
        help="Lossy pruning: remove this fraction of the channels of every prunable group "
        "(lowest L1 first); the cost is reported in the manifest.",
    ),
]
PruneTo = Annotated[
    int | None,
    typer.Option(
        metavar="N", help="Lossy pruning: keep this many channels in every prunable group."
    ),
]
BorderDrift = Annotated[
    bool,
    typer.Option(
        "--accept-border-drift",
        help="Fold regions that are exact only away from the image border (zero padding "
        "where the training form pads with a bias).",
    ),
]
Calib = Annotated[
    Path | None,
    typer.Option(
        metavar="DIR",
        help="fp16/int8: folder of LR calibration images (default: the validation LR "
        "images), each cropped to the profile's opt shape.",
    ),
]
CalibMethod = Annotated[
    str,
    typer.Option(metavar="METHOD", help=f"int8 activation thresholds: {', '.join(METHODS)}."),
]
CalibPercentile = Annotated[
    float,
    typer.Option(metavar="PERCENT", help="Percentile of |x| kept by --calib-method percentile."),
]
KeepFloat = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NODE", help="int8: keep this ONNX node in float (repeatable; its node name)."
    ),
]
NoSearch = Annotated[
    bool,
    typer.Option(
        "--no-search",
        help="int8: quantise every quantisable layer; skip the sensitivity search that keeps "
        "the costliest layers in float until the PSNR budget is met.",
    ),
]
MaxDrop = Annotated[
    float | None,
    typer.Option(
        metavar="DB",
        help="Largest PSNR-Y drop (dB) allowed on any validation set, if tighter than the "
        "recipe's budget for the precision; --target auto holds every candidate to 0.02.",
    ),
]
AutoCandidates = Annotated[
    str | None,
    typer.Option(
        metavar="TARGET,...",
        help="--target auto: the targets to choose from, comma-separated (default: "
        f"{_AUTO_CANDIDATES}; those available here).",
    ),
]
AutoPeers = Annotated[
    str | None,
    typer.Option(
        metavar="PEER,...",
        help="--target auto: what a user would run instead, timed beside the candidates and "
        "recorded in the manifest, comma-separated, or 'none' (default: eager-fp32,eager-bf16,"
        "ort-plain-fp32,ov-plain-fp32; also torch-compile-fp32).",
    ),
]
Exporter = Annotated[
    str,
    typer.Option(
        metavar="auto|dynamo|torchscript",
        help="ONNX exporter: auto tries dynamo, then TorchScript when dynamo fails or its "
        "graph fails the export check.",
    ),
]
Profile = Annotated[
    bool,
    typer.Option("--profile", help="Print the wall time of each compile stage (stderr)."),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log each step (stderr).")]
Matrix = Annotated[Path | None, typer.Option(metavar="TOML", help=MATRIX_HELP)]


@dataclass(frozen=True)
class CompileFlags:
    """The compile options that are not the model: what ``compile_options`` maps."""

    target: str
    val: list[Path] | None
    out: Path | None
    latency_shape: list[str] | None
    latency_runs: int
    large_runs: int
    no_latency: bool
    passes: str | None
    prune_ratio: float | None
    prune_to: int | None
    accept_border_drift: bool
    max_drop: float | None
    auto_candidates: str | None
    exporter: str
    auto_peers: str | None = None


def _peers(text: str | None) -> tuple[str, ...] | None:
    """``--auto-peers``: None = the default peers, 'none' = (), else known peer names."""
    if text is not None and text.strip() == "none":
        return ()
    names = _comma_list(text, "--auto-peers", "peer")
    if names is not None:
        from esr_deploy.compiling.options import check_peers

        check_peers(names)
    return names


def _comma_list(text: str | None, option: str, what: str) -> tuple[str, ...] | None:
    """``"a, b"`` → ("a", "b"); not given → None (the pipeline's defaults)."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise EsrDeployError(
            f"{option} '{text}' names no {what} — list them separated by commas"
            + (", or 'none'." if option == "--passes" else ".")
        )
    return names


def _latency_shapes(flags: CompileFlags) -> dict[str, Any]:
    """``latency_shapes`` for CompileOptions: () with --no-latency, the parsed --latency-shape,
    or nothing (the pipeline's default shapes)."""
    if flags.latency_runs < 1 or flags.large_runs < 1:
        raise EsrDeployError(
            f"--latency-runs {flags.latency_runs} / --large-runs {flags.large_runs}: a run count "
            "below 1 — give at least 1 (or --no-latency to skip timing)."
        )
    if flags.no_latency:
        return {"latency_shapes": ()}
    if flags.latency_shape:
        shapes = tuple(parse_shape(s, "--latency-shape") for s in flags.latency_shape)
        return {"latency_shapes": shapes}
    return {}


def compile_options(source: Any, flags: CompileFlags, precision: Any) -> CompileOptions:
    """The typed compile request: ``source`` a ModelSource, ``precision`` PrecisionOptions."""
    from esr_deploy.compiling import CompileOptions

    passes = _comma_list(flags.passes, "--passes", "pass")
    return CompileOptions(
        source=source,
        target=flags.target,
        exporter=flags.exporter,
        val_dirs=tuple(flags.val or ()),
        out=flags.out,
        latency_runs=flags.latency_runs,
        large_runs=flags.large_runs,
        passes=() if passes == ("none",) else passes,
        accept_border_drift=flags.accept_border_drift,
        prune_ratio=flags.prune_ratio,
        prune_to=flags.prune_to,
        precision=precision,
        max_psnr_drop=flags.max_drop,
        auto_candidates=_comma_list(flags.auto_candidates, "--auto-candidates", "target"),
        auto_peers=_peers(flags.auto_peers),
        **_latency_shapes(flags),
    )


def manifest_mapping(manifest: Any) -> dict[str, Any]:
    """The manifest as the JSON object it is written as: a plain dict, or a typed
    :class:`~esr_deploy.runtime.manifest.Manifest` through its ``to_json()``."""
    to_json = getattr(manifest, "to_json", None)
    return dict(to_json()) if callable(to_json) else dict(manifest)


def show_profile(manifest: Mapping[str, Any]) -> None:
    """``--profile``: the stage times the manifest records, or why there are none."""
    seconds = manifest.get("compile_seconds")
    if not seconds:
        note("--profile: this bundle's manifest records no stage timings (compile_seconds).")
        return
    from esr_deploy.cli.display import profile_table

    err.print(profile_table(seconds))


def show_result(result: CompileResult, json_output: bool, profile: bool) -> None:
    """The summary tables (or the manifest on stdout with --json), then the digest."""
    manifest = manifest_mapping(result.manifest)
    if json_output:
        write_json(manifest)
        if profile:
            show_profile(manifest)
        note(f"digest: {result.digest}")
        return
    from esr_deploy.cli.display import latency_table, summary_table

    out.print(summary_table(manifest, result.bundle))
    if "auto" in manifest:
        auto = manifest["auto"]
        out.print(f"auto chose {auto['chosen']}: {auto['reason']}", highlight=False)
    if manifest.get("latency_ms"):
        out.print(latency_table(manifest))
    if profile:
        show_profile(manifest)
    out.print(f"bundle: {result.bundle}")
    out.print(f"digest: {result.digest}  (pin it: --expect-digest)", highlight=False)


def compile_matrix(
    matrix: Path | None, checkpoint: Path | None, ray: str | None, json_output: bool
) -> None:
    """``compile --matrix``: every cell's record in one table (stderr with --json) and one
    JSON file (``matrix.json`` beside the bundles; stdout with --json)."""
    from rich.table import Table

    from esr_deploy.serving.matrix import load_matrix, run_local, run_on_ray

    if matrix is None or checkpoint is not None:
        raise EsrDeployError(
            "compile needs a CHECKPOINT or --matrix FILE, not both or neither — give one."
        )
    cells = load_matrix(matrix)
    err.print(f"{len(cells)} cells" + (f" on Ray ({ray})" if ray else " in a local pool"))
    records = run_on_ray(cells, ray) if ray else run_local(cells)
    table = Table(title=f"compile matrix {matrix}")
    for column in ("checkpoint", "target", "status", "seconds", "bundle / why"):
        table.add_column(column)
    for r in records:
        what = r.get("bundle", r.get("error", ""))
        table.add_row(r["checkpoint"], r["label"], r["status"], str(r.get("seconds", "")), what)
    (err if json_output else out).print(table)
    report = json.dumps({"matrix": str(matrix), "cells": records}, indent=2)
    summary = cells[0].out.parent / "matrix.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(report + "\n", encoding="utf-8")
    if json_output:
        sys.stdout.write(report + "\n")
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        raise EsrDeployError(f"{len(bad)} of {len(records)} cells did not build — see {summary}.")


@command("compile")
def compile_cmd(
    checkpoint: Checkpoint = None,
    target: Target = "ort-fp32",
    recipe: Recipe = None,
    arch: Arch = None,
    arch_args: ArchArgs = None,
    scale: Scale = None,
    data_range: DataRange = None,
    val: Val = None,
    out_dir: OutDir = None,
    latency_shape: LatencyShape = None,
    latency_runs: LatencyRuns = 10,
    large_runs: LargeRuns = 2,
    no_latency: NoLatency = False,
    passes: Passes = None,
    prune_ratio: PruneRatio = None,
    prune_to: PruneTo = None,
    accept_border_drift: BorderDrift = False,
    calib: Calib = None,
    calib_method: CalibMethod = DEFAULT_METHOD,
    calib_percentile: CalibPercentile = DEFAULT_PERCENTILE,
    keep_float: KeepFloat = None,
    no_search: NoSearch = False,
    max_drop: MaxDrop = None,
    auto_candidates: AutoCandidates = None,
    auto_peers: AutoPeers = None,
    exporter: Exporter = "auto",
    json_output: JsonFlag = False,
    profile: Profile = False,
    verbose: Verbose = False,
    matrix: Matrix = None,
    ray: Ray = None,
) -> None:
    """Compile a checkpoint into a validated engine bundle.

    With --matrix, a TOML of checkpoints × targets, one bundle per cell.
    """
    setup_logging(verbose)
    flags = CompileFlags(
        target, val, out_dir, latency_shape, latency_runs, large_runs, no_latency, passes,
        prune_ratio, prune_to, accept_border_drift, max_drop, auto_candidates, exporter,
        auto_peers,
    )  # fmt: skip

    def body() -> None:
        if matrix is not None or checkpoint is None:
            return compile_matrix(matrix, checkpoint, ray, json_output)
        from esr_deploy.compiling import compile_model
        from esr_deploy.loading.user_code import user_stdout_to_stderr
        from esr_deploy.precision.apply import PrecisionOptions
        from esr_deploy.progress import RichProgress

        source = model_source(checkpoint, recipe, arch, arch_args, scale, data_range)
        precision = PrecisionOptions(
            calib_dir=calib,
            method=calib_method,
            percentile=calib_percentile,
            keep_float=tuple(keep_float or ()),
            search=not no_search,
        )
        options = compile_options(source, flags, precision)
        with user_stdout_to_stderr():  # what model code prints must not corrupt --json
            result = compile_model(options, progress=RichProgress(err), on_note=note)
        show_result(result, json_output, profile)

    run(body, json_output)
