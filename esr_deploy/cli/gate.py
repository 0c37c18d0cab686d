"""``esr-deploy bench``: time a bundle, and gate on a latency regression against another
bundle (timed interleaved) or a recorded manifest (exit 3 when slower beyond the allowance).
The statistics and the verdict are :mod:`esr_deploy.gate`'s; this maps options onto a
:class:`~esr_deploy.gate.options.BenchOptions` and prints the report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from esr_deploy.cli.common import (
    ExpectDigest,
    command,
    err,
    note,
    out,
    run,
    setup_logging,
    write_json,
)
from esr_deploy.errors import EsrDeployError
from esr_deploy.gate.options import DEFAULT_MAX_REGRESSION, DEFAULT_RUNS, DEFAULT_WARMUP

Candidate = Annotated[
    Path,
    typer.Argument(
        metavar="BUNDLE", help="Engine bundle folder to time (the candidate).", show_default=False
    ),
]
Shape = Annotated[
    str | None,
    typer.Option(
        metavar="HxW", help="LR shape to time (default: the bundle profile's opt, 256x256)."
    ),
]
Against = Annotated[
    Path | None,
    typer.Option(
        metavar="BUNDLE",
        help="Reference bundle (e.g. the last release's engine), timed interleaved with the "
        "candidate on the same input.",
    ),
]
Baseline = Annotated[
    Path | None,
    typer.Option(
        metavar="MANIFEST",
        help="manifest.json of an earlier build: compare with the median it recorded at this "
        "shape (meaningful only on the same machine type).",
    ),
]
MaxRegression = Annotated[
    str,
    typer.Option(
        metavar="PERCENT",
        help="Allowed slowdown, e.g. 10% or 0.1: exit 3 when the lower end of the ratio's "
        "confidence interval exceeds 1 + this.",
    ),
]
Runs = Annotated[int, typer.Option(metavar="N", help="Timed rounds.")]
Warmup = Annotated[int, typer.Option(metavar="N", help="Untimed rounds first.")]
BenchJson = Annotated[
    bool, typer.Option("--json", help="Print the report as JSON on stdout and nothing else.")
]


@command()
def bench(
    bundle: Candidate,
    shape: Shape = None,
    against: Against = None,
    baseline: Baseline = None,
    max_regression: MaxRegression = f"{DEFAULT_MAX_REGRESSION:.0%}",
    runs: Runs = DEFAULT_RUNS,
    warmup: Warmup = DEFAULT_WARMUP,
    expect_digest: ExpectDigest = None,
    json_output: BenchJson = False,
) -> None:
    """Time a bundle; gate on a latency regression (exit 3).

    With --against (a reference bundle, timed interleaved) or --baseline (a recorded
    manifest), exit 3 when the candidate is slower beyond --max-regression.
    """
    setup_logging()

    def body() -> None:
        from esr_deploy.gate.bench import bench_bundle, compare_bundles, compare_to_baseline
        from esr_deploy.gate.options import BenchOptions, parse_max_regression
        from esr_deploy.shapes import parse_shape

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
        for text in report.notes:
            note(f"note: {text}")
        if not json_output:
            from esr_deploy.cli.display import bench_table

            out.print(bench_table(report))
            for side in [report.candidate] + ([report.reference] if report.reference else []):
                out.print(f"{side.role}: {side.source}", highlight=False, markup=False)
            out.print(report.verdict(), highlight=False, markup=False, soft_wrap=True)
        report.raise_for_regression()  # with --json, run() prints the report as its details
        if json_output:
            write_json(report.to_dict())

    run(body, json_output)
