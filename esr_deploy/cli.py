"""The ``esr-deploy`` command line: the only place errors become messages and exit codes.

Exit codes: 0 ok, 1 internal error, 2 bad input, 3 validation failed, 4 target unavailable
(:mod:`esr_deploy.errors`). Progress bars and messages go to stderr; with ``--json`` stdout
carries the manifest and nothing else.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from esr_deploy import __version__
from esr_deploy import cli_serving as cs
from esr_deploy.errors import EXIT_BAD_INPUT, EsrDeployError
from esr_deploy.gate.options import DEFAULT_MAX_REGRESSION
from esr_deploy.gate.options import DEFAULT_RUNS as DEFAULT_BENCH_RUNS
from esr_deploy.gate.options import DEFAULT_WARMUP as DEFAULT_BENCH_WARMUP
from esr_deploy.precision import DEFAULT_METHOD, DEFAULT_PERCENTILE, METHODS
from esr_deploy.shapes import parse_shape

app = typer.Typer(
    name="esr-deploy",
    help="Deployment compiler for efficient super-resolution networks: checkpoint → validated "
    "engine bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

T = TypeVar("T")

ExpectDigest = Annotated[
    str | None,
    typer.Option(
        "--expect-digest",
        help="Refuse the bundle unless its digest is this sha256:… (as `compile` printed it).",
    ),
]


def _run(fn: Callable[[], T], json_output: bool = False) -> T:
    """Run a command body; turn EsrDeployError into a message and its exit code."""
    try:
        return fn()
    except EsrDeployError as exc:
        if json_output and exc.details is not None:
            sys.stdout.write(json.dumps(exc.details, indent=2) + "\n")
        # The message is plain text: escape it so that "[tolerances.fp32]" or a pip extra
        # like "esr-deploy[tensorrt]" is printed, not taken for rich markup and dropped.
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except Exception as exc:  # the user's model code may raise anything, anywhere
        from esr_deploy.targets import missing_compile_side

        if missing_compile_side(exc):
            raise  # a runtime-only install: main() says what to install
        from esr_deploy.loading.user_code import user_code_error

        user_error = user_code_error(exc)
        if user_error is None:
            raise  # esr-deploy's own bug: exit 1 with the traceback
        err.print(f"[bold red]error:[/] {escape(str(user_error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(user_error.exit_code) from None


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False, show_time=False)],
        force=True,
    )


def _parse_passes(text: str | None) -> tuple[str, ...] | None:
    """``--passes a,b`` → ("a", "b"); "none" → (); not given → None (the defaults)."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("none",):
        return ()
    if not names:
        raise EsrDeployError(
            f"--passes '{text}' names no pass — list passes separated by commas, or 'none'."
        )
    return names


def _cell(key: str, value: Any) -> str:
    """One inspect value as text: pass plans one line per pass, the rest as JSON."""
    if isinstance(value, str):
        return value
    if key == "passes" and isinstance(value, list):
        lines = []
        for p in value:
            verb = "would fold" if p["would_modify"] else "nothing to do"
            lines.append(f"{p['name']}: {verb}; convs {p['convs']}, params {p['params']}")
            lines += [f"  {d}" for d in p["details"]]
        return "\n".join(lines)
    return json.dumps(value, ensure_ascii=False)


def _version(value: bool) -> None:
    if value:
        out.print(f"esr-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """esr-deploy."""


def _summary(manifest: dict[str, Any], bundle: Path) -> Table:
    table = Table(title=f"{manifest['name']} → {manifest['target']}  ({bundle})")
    for col in ("set", "images", "ref PSNR-Y", "engine PSNR-Y", "drop", "min parity", "ok"):
        table.add_column(col, justify="right" if col != "set" else "left")
    for name, v in manifest["validation"].items():
        table.add_row(
            name,
            str(v["images"]),
            f"{v['reference_psnr_y']:.4f}",
            f"{v['engine_psnr_y']:.4f}",
            f"{v['psnr_drop']:+.4f}",
            f"{v['parity_min_psnr']:.1f} dB",
            "yes" if v["passed"] else "NO",
        )
    return table


def _latency_table(manifest: dict[str, Any]) -> Table:
    table = Table(title="latency (ms)")
    for col in ("input", "median", "p10", "p90", "runs"):
        table.add_column(col, justify="right")
    for shape, lat in manifest.get("latency_ms", {}).items():
        table.add_row(
            shape,
            f"{lat['median']:.2f}",
            f"{lat['p10']:.2f}",
            f"{lat['p90']:.2f}",
            str(lat["runs"]),
        )
    return table


@app.command("compile")
def compile_cmd(
    checkpoint: Annotated[Path | None, typer.Argument(help="Checkpoint (.pth/.pt/.ckpt).")] = None,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "-t",
            help="Target, e.g. ort-fp32, ov-int8, trt-fp16, or auto (the fastest CPU target "
            "that passes validation here).",
        ),
    ] = "ort-fp32",
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", "-r", help="Zoo recipe name or path to a recipe .toml."),
    ] = None,
    arch: Annotated[str | None, typer.Option(help="User architecture, pkg.module:Class.")] = None,
    arch_args: Annotated[str | None, typer.Option(help="JSON constructor arguments.")] = None,
    scale: Annotated[int | None, typer.Option(help="Upscaling factor (with --arch).")] = None,
    data_range: Annotated[
        float | None,
        typer.Option(help="Input range the network was trained with: 1 or 255 (with --arch)."),
    ] = None,
    val: Annotated[
        list[Path] | None,
        typer.Option(
            "--val",
            help="Validation set folder with HR/ and LR_bicubic/X<scale>/ "
            "(repeatable; default: a small set that ships with esr-deploy).",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Bundle folder (default engines/<name>-<target>)."),
    ] = None,
    latency_shape: Annotated[
        list[str] | None,
        typer.Option(help="LR shape HxW to time (repeatable; default 256x256 and 720x1280)."),
    ] = None,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per shape.")] = 10,
    large_runs: Annotated[
        int, typer.Option(help="Timed runs at shapes above 512x512 LR (after one warm-up).")
    ] = 2,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip latency.")] = False,
    passes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated graph passes to run, or 'none' (default: fold-reparam,fold-bn,"
            "fold-identity,merge-linear-chains)."
        ),
    ] = None,
    prune_ratio: Annotated[
        float | None,
        typer.Option(
            help="Lossy pruning: remove this fraction of the channels of every prunable group "
            "(lowest L1 first); the cost is reported in the manifest."
        ),
    ] = None,
    prune_to: Annotated[
        int | None,
        typer.Option(help="Lossy pruning: keep this many channels in every prunable group."),
    ] = None,
    accept_border_drift: Annotated[
        bool,
        typer.Option(
            "--accept-border-drift",
            help="Fold regions that are exact only away from the image "
            "border (zero padding where the training form pads with a bias).",
        ),
    ] = False,
    calib: Annotated[
        Path | None,
        typer.Option(
            help="fp16/int8: folder of LR calibration images (default: the validation LR "
            "images), each cropped to the profile's opt shape."
        ),
    ] = None,
    calib_method: Annotated[
        str, typer.Option(help=f"int8 activation thresholds: {', '.join(METHODS)}.")
    ] = DEFAULT_METHOD,
    calib_percentile: Annotated[
        float, typer.Option(help="Percentile of |x| kept by --calib-method percentile.")
    ] = DEFAULT_PERCENTILE,
    keep_float: Annotated[
        list[str] | None,
        typer.Option(help="int8: keep this node in float (repeatable; ONNX node name)."),
    ] = None,
    no_search: Annotated[
        bool,
        typer.Option(
            "--no-search",
            help="int8: quantise every quantisable layer; skip the sensitivity search that "
            "keeps the costliest layers in float until the PSNR budget is met.",
        ),
    ] = False,
    max_drop: Annotated[
        float | None,
        typer.Option(
            help="Largest PSNR-Y drop (dB) allowed on any validation set, if tighter than the "
            "recipe's budget for the precision; --target auto holds every candidate to 0.02."
        ),
    ] = None,
    auto_candidates: Annotated[
        str | None,
        typer.Option(
            help="--target auto: comma-separated targets to choose from (default: "
            "ov-int8,ort-int8,ov-bf16,ov-fp32,ort-fp32, those available here)."
        ),
    ] = None,
    exporter: Annotated[
        str,
        typer.Option(
            help="ONNX exporter: auto (dynamo, then TorchScript when dynamo fails or its graph "
            "fails the export check), dynamo or torchscript."
        ),
    ] = "auto",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the manifest on stdout and nothing else.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    matrix: Annotated[Path | None, typer.Option(help=cs.MATRIX_HELP)] = None,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=cs.RAY_HELP)] = None,
) -> None:
    """Compile a checkpoint into a validated engine bundle (or a --matrix of them)."""
    _setup_logging(verbose)

    def body() -> None:
        if matrix is not None or checkpoint is None:
            return cs.compile_matrix(matrix, checkpoint, ray, json_output)
        from esr_deploy.compiler import (
            DEFAULT_LATENCY_SHAPES,
            CompileOptions,
            ModelSource,
            compile_model,
        )
        from esr_deploy.precision.apply import PrecisionOptions
        from esr_deploy.progress import RichProgress

        if latency_runs < 1 or large_runs < 1:
            raise EsrDeployError(
                f"--latency-runs {latency_runs} / --large-runs {large_runs}: a run count below "
                "1 — give at least 1 (or --no-latency to skip timing)."
            )
        shapes = (
            ()
            if no_latency
            else tuple(parse_shape(s, "--latency-shape") for s in latency_shape)
            if latency_shape
            else DEFAULT_LATENCY_SHAPES
        )
        options = CompileOptions(
            source=ModelSource(
                checkpoint=checkpoint,
                recipe=recipe,
                arch=arch,
                arch_args=arch_args,
                scale=scale,
                data_range=data_range,
            ),
            target=target,
            exporter=exporter,
            val_dirs=tuple(val or ()),
            out=out_dir,
            latency_shapes=shapes,
            latency_runs=latency_runs,
            large_runs=large_runs,
            passes=_parse_passes(passes),
            accept_border_drift=accept_border_drift,
            prune_ratio=prune_ratio,
            prune_to=prune_to,
            precision=PrecisionOptions(
                calib_dir=calib,
                method=calib_method,
                percentile=calib_percentile,
                keep_float=tuple(keep_float or ()),
                search=not no_search,
            ),
            max_psnr_drop=max_drop,
            auto_candidates=(
                tuple(t.strip() for t in auto_candidates.split(",") if t.strip())
                if auto_candidates
                else None
            ),
        )
        from esr_deploy.loading.user_code import user_stdout_to_stderr

        with user_stdout_to_stderr():  # what model code prints must not corrupt --json
            result = compile_model(
                options,
                progress=RichProgress(err),
                on_note=lambda note: err.print(note, highlight=False, markup=False),
            )
        if json_output:
            sys.stdout.write(json.dumps(result.manifest, indent=2) + "\n")
            err.print(f"digest: {result.digest}", highlight=False, markup=False)
            return
        out.print(_summary(result.manifest, result.bundle))
        if "auto" in result.manifest:
            auto = result.manifest["auto"]
            out.print(f"auto chose {auto['chosen']}: {auto['reason']}", highlight=False)
        if result.manifest["latency_ms"]:
            out.print(_latency_table(result.manifest))
        out.print(f"bundle: {result.bundle}")
        out.print(f"digest: {result.digest}  (pin it: --expect-digest)", highlight=False)

    _run(body, json_output)


@app.command()
def targets(
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List targets and whether each can run on this machine (and why not)."""
    from esr_deploy.targets import TARGETS, availability

    rows = [(t, availability(t)) for t in TARGETS]
    if json_output:
        sys.stdout.write(
            json.dumps(
                [
                    {
                        "target": t.name,
                        "available": a.ok,
                        "reason": a.reason,
                        "description": t.description,
                    }
                    for t, a in rows
                ],
                indent=2,
            )
            + "\n"
        )
        return
    table = Table(title="targets")
    for col in ("target", "available", "description / why not"):
        table.add_column(col)
    for t, a in rows:
        table.add_row(
            t.name,
            "[green]yes[/]" if a.ok else "[red]no[/]",
            escape(t.description if a.ok else a.reason),
        )
    out.print(table)


@app.command()
def recipes() -> None:
    """List the zoo's recipes and the architectures spandrel recognises from a state dict."""

    def body() -> None:
        from esr_deploy.loading.spandrel import INSTALL_HINT, spandrel_architectures
        from esr_deploy.recipe import zoo_recipes

        table = Table(title="recipes")
        for col in ("name", "scale", "range", "arch", "description"):
            table.add_column(col)
        for r in zoo_recipes():
            table.add_row(r.name, f"x{r.scale}", f"0..{r.data_range:g}", r.arch, r.description)
        out.print(table)
        found = spandrel_architectures()
        if not found:
            out.print(f"spandrel is not installed ({INSTALL_HINT}): no detection beyond the zoo")
            return
        table = Table(title="detected by spandrel when no recipe matches (RGB, 0..1)")
        for col in ("architecture", "name", "usable here"):
            table.add_column(col)
        for a in found:
            table.add_row(a.id, a.name, "yes" if a.usable else f"no: {a.why_not}")
        out.print(table)

    _run(body)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A checkpoint or an engine bundle folder.")],
    recipe: Annotated[str | None, typer.Option("--recipe", "-r")] = None,
    arch: Annotated[str | None, typer.Option()] = None,
    arch_args: Annotated[str | None, typer.Option()] = None,
    scale: Annotated[int | None, typer.Option()] = None,
    data_range: Annotated[float | None, typer.Option()] = None,
    expect_digest: ExpectDigest = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show what a checkpoint holds (architecture, metrics, input range) or a bundle's manifest."""
    _setup_logging(False)

    def body() -> None:
        from esr_deploy.inspection import inspect_bundle, inspect_checkpoint

        if path.is_dir():
            info = inspect_bundle(path, expect_digest)
        else:
            from esr_deploy.compiler import ModelSource
            from esr_deploy.loading.user_code import user_stdout_to_stderr

            with user_stdout_to_stderr():
                info = inspect_checkpoint(
                    ModelSource(
                        checkpoint=path,
                        recipe=recipe,
                        arch=arch,
                        arch_args=arch_args,
                        scale=scale,
                        data_range=data_range,
                    )
                )
        if json_output:
            sys.stdout.write(json.dumps(info, indent=2) + "\n")
            return
        table = Table(title=str(path), show_header=False)
        table.add_column("key")
        table.add_column("value")
        for key, value in info.items():
            table.add_row(key, escape(_cell(key, value)))
        out.print(table)

    _run(body, json_output)


@app.command()
def validate(
    bundle: Annotated[Path, typer.Argument(help="Engine bundle folder.")],
    val: Annotated[
        list[Path] | None,
        typer.Option(
            "--val",
            help="Validation set folder "
            "(repeatable; default: the small set packaged with esr-deploy).",
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint for the PyTorch reference (default: the bundle's fp32 ONNX is the "
            "reference; nothing the bundle names is imported or read)."
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", "-r", help="With --checkpoint: zoo recipe name or .toml path."),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="With --checkpoint: user architecture, pkg.module:Class.")
    ] = None,
    arch_args: Annotated[str | None, typer.Option(help="JSON constructor arguments.")] = None,
    expect_digest: ExpectDigest = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-run parity and task-quality validation of a bundle on this machine."""
    _setup_logging(False)

    def body() -> None:
        from esr_deploy.compiler import ModelSource
        from esr_deploy.errors import ValidationError
        from esr_deploy.loading.user_code import user_stdout_to_stderr
        from esr_deploy.progress import RichProgress
        from esr_deploy.validate.rerun import validate_bundle

        if checkpoint is None and (recipe or arch or arch_args):
            raise EsrDeployError(
                "--recipe, --arch and --arch-args name the model of --checkpoint — give the "
                "checkpoint too, or none of them to compare with the bundle's fp32 ONNX."
            )
        named = ModelSource(checkpoint, recipe, arch, arch_args) if checkpoint else None
        with user_stdout_to_stderr():  # what model code prints must not corrupt --json
            report = validate_bundle(
                bundle, tuple(val or ()), named, RichProgress(err), digest=expect_digest
            )
        if json_output:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            err.print(f"reference: {report['reference']}", highlight=False, markup=False)
            out.print(_summary(report, bundle))
        if report["failures"]:
            raise ValidationError("Validation failed — " + "; ".join(report["failures"]))

    _run(body, json_output=False)


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Engine bundle folder to time (the candidate).")],
    shape: Annotated[
        str | None,
        typer.Option(help="LR shape HxW to time (default: the bundle profile's opt, 256x256)."),
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            help="Reference bundle (e.g. the last release's engine), timed interleaved with "
            "the candidate on the same input."
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="manifest.json of an earlier build: compare with the median it recorded at "
            "this shape (meaningful only on the same machine type)."
        ),
    ] = None,
    max_regression: Annotated[
        str,
        typer.Option(
            help="Allowed slowdown, e.g. 10% or 0.1: exit 3 when the lower end of the ratio's "
            "confidence interval exceeds 1 + this."
        ),
    ] = f"{DEFAULT_MAX_REGRESSION:.0%}",
    runs: Annotated[int, typer.Option(help="Timed rounds.")] = DEFAULT_BENCH_RUNS,
    warmup: Annotated[int, typer.Option(help="Untimed rounds first.")] = DEFAULT_BENCH_WARMUP,
    expect_digest: ExpectDigest = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON on stdout and nothing else.")
    ] = False,
) -> None:
    """Time a bundle; with --against or --baseline, gate on a latency regression (exit 3)."""
    _setup_logging(False)

    def body() -> None:
        from esr_deploy.gate.bench import bench_bundle, compare_bundles, compare_to_baseline
        from esr_deploy.gate.options import BenchOptions, parse_max_regression

        if against is not None and baseline is not None:
            raise EsrDeployError(
                "--against and --baseline both given — compare with one reference: another "
                "bundle (--against) or a recorded manifest (--baseline)."
            )
        options = BenchOptions(
            shape=parse_shape(shape) if shape is not None else None,
            runs=runs,
            warmup=warmup,
            max_regression=parse_max_regression(max_regression),
            expect_digest=expect_digest,
        )
        options.check()
        if against is not None:
            report = compare_bundles(bundle, against, options)
        elif baseline is not None:
            report = compare_to_baseline(bundle, baseline, options)
        else:
            report = bench_bundle(bundle, options)
        for warning in report.warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        for note in report.notes:
            err.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        if not json_output:
            kind = "interleaved rounds" if report.reference_kind == "bundle" else "runs"
            table = Table(title=f"latency at {report.input_key} (ms), {report.runs} {kind}")
            for col in ("", "engine", "median", "p10", "p90", "runs"):
                table.add_column(col, justify="left" if col in ("", "engine") else "right")
            sides = [report.candidate] + ([report.reference] if report.reference else [])
            for side in sides:
                role = side.role if side.measured else f"{side.role} (recorded)"
                table.add_row(
                    role,
                    escape(f"{side.name} ({side.target})"),
                    f"{side.stats.median_ms:.2f}",
                    f"{side.stats.p10_ms:.2f}",
                    f"{side.stats.p90_ms:.2f}",
                    str(side.stats.runs),
                )
            out.print(table)
            for side in sides:
                out.print(f"{side.role}: {side.source}", highlight=False, markup=False)
            out.print(report.verdict(), highlight=False, markup=False, soft_wrap=True)
        report.raise_for_regression()  # with --json, _run prints the report as its details
        if json_output:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")

    _run(body, json_output)


@app.command()
def upscale(
    bundle: Annotated[Path, typer.Argument(help="Engine bundle folder.")],
    inputs: Annotated[
        list[str],
        typer.Argument(help="Images (PNG, JPEG, BMP, WebP, TIFF), folders (or URIs: --ray)."),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the upscaled images (PNG).")
    ],
    tile: Annotated[
        int | None,
        typer.Option(
            help="Tile size in LR pixels (default: untiled when the image fits the engine's "
            "profile and --max-memory, else the largest tile that does)."
        ),
    ] = None,
    overlap: Annotated[
        int | None,
        typer.Option(
            help="Tile overlap in LR pixels per side (default: the receptive field computed "
            "from the bundle's graph)."
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(help="GiB one engine call may use (default: half the available memory)."),
    ] = None,
    expect_digest: ExpectDigest = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON record per image on stdout.")
    ] = False,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=cs.RAY_HELP)] = None,
    actors: Annotated[int, typer.Option(help="With --ray: actors in the pool.")] = 2,
    actor_cpus: Annotated[float, typer.Option(help="With --ray: CPUs per actor.")] = 1.0,
    actor_gpus: Annotated[float, typer.Option(help="With --ray: GPUs per actor.")] = 0.0,
) -> None:
    """Upscale images with an engine bundle, tiled where they exceed its profile or memory.

    Grey images stay grey, alpha is upscaled with bicubic interpolation and re-attached,
    16-bit greyscale PNGs keep 16 bits. Unreadable files are skipped with a message; the exit
    code is then 2.
    """
    _setup_logging(False)

    def body() -> None:
        from esr_deploy.errors import DataError
        from esr_deploy.progress import RichProgress
        from esr_deploy.runtime.upscaler import load, upscale_jobs

        if tile is not None and tile < 1:
            raise EsrDeployError(f"--tile {tile} is not a positive number of LR pixels.")
        if overlap is not None and overlap < 0:
            raise EsrDeployError(f"--overlap {overlap} is negative — give 0 or more.")
        budget = None if max_memory is None else int(max_memory * 2**30)
        if ray is not None:
            args = (bundle, tuple(inputs), out_dir, ray, actors, actor_cpus, actor_gpus, tile)
            return cs.run_upscale_on_ray(args, overlap, budget, expect_digest, json_output)
        jobs = upscale_jobs([Path(i) for i in inputs], out_dir)
        upscaler = load(bundle, max_memory=budget, digest=expect_digest)
        err.print(
            f"{upscaler.name}: x{upscaler.scale}; {upscaler.describe_tiling()}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        records, failed = upscaler.upscale_files(
            jobs, tile, overlap, RichProgress(err), on_skip=cs.skip_message
        )
        cs.show_upscale_records(records, json_output)
        if failed:
            raise DataError(
                f"{failed} of {len(jobs)} images were skipped (messages above); "
                f"{len(records)} written to {out_dir}."
            )

    _run(body)


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="Engine bundle folder.")],
    triton: Annotated[Path, typer.Option("--triton", help="Triton model repository folder.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: <name>-<target>).")] = None,
    version: Annotated[int, typer.Option(help="Model version folder (integer ≥ 1).")] = 1,
    max_batch_size: Annotated[int | None, typer.Option(help="Default: engine's, ≤ 8.")] = None,
    instances: Annotated[int, typer.Option(help="Instances in the instance group.")] = 1,
    expect_digest: ExpectDigest = None,
) -> None:
    """Write a Triton model repository entry (config.pbtxt, model, manifest, digest)."""
    _setup_logging(False)

    def body() -> None:
        from esr_deploy.serving.triton import TritonRequest, export_triton

        request = TritonRequest(bundle, triton, name, version, max_batch_size, instances,
                                expect_digest)  # fmt: skip
        entry = export_triton(request)
        text = f"{entry.version_dir}: {entry.plan.note}; max_batch_size {entry.max_batch_size}"
        out.print(f"{text}; bundle {entry.digest}", markup=False, soft_wrap=True)

    _run(body)


cs.register_serving(app, _run)  # serve, compile --matrix


def main() -> None:
    try:
        app()
    except SystemExit as exc:  # keep typer's own exit codes (usage errors are 2)
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        raise SystemExit(code) from None
    except ModuleNotFoundError as exc:
        from esr_deploy.targets import missing_compile_side

        missing = missing_compile_side(exc)
        if missing is None:
            raise
        err.print(
            f"[bold red]error:[/] this command needs the compile side of esr-deploy, and "
            f"{missing} is not installed (a runtime-only install runs bundles: upscale, "
            "inspect BUNDLE, bench, targets) — pip install 'esr-deploy\\[compile]' (install "
            "torch==2.13.0 first for the CPU build; see the README).",
            highlight=False,
            soft_wrap=True,
        )
        raise SystemExit(EXIT_BAD_INPUT) from None


if __name__ == "__main__":  # pragma: no cover
    main()
