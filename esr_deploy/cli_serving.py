"""The command line's serving half: ``upscale --ray``, ``serve``; kept out of ``cli.py``.

Like ``cli.py`` it only maps options to typed requests and renders results: the work is in
:mod:`esr_deploy.serving`. Nothing here imports Ray; :mod:`esr_deploy.serving.ray_support`
does, when a command needs it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from esr_deploy.errors import EsrDeployError

err = Console(stderr=True)
out = Console()

RAY_HELP = (
    "Run on Ray: 'local' (a Ray started on this machine) or a cluster address "
    "(ray://host:10001); needs the ray extra of esr-deploy."
)


MATRIX_HELP = (
    "A TOML of checkpoints × targets with each cell's resources (instead of CHECKPOINT): "
    "cells run in a local process pool, or as Ray tasks with --ray."
)


def skip_message(message: str) -> None:
    err.print(f"[yellow]skipped:[/] {escape(message)}", highlight=False, soft_wrap=True)


def show_upscale_records(records: list[dict[str, Any]], json_output: bool) -> None:
    """One line (or one JSON record with ``--json``) per image written."""
    for r in records:
        if json_output:
            sys.stdout.write(json.dumps(r) + "\n")
        else:
            out.print(
                f"{r['input']} → {r['output']}: {r['lr'][0]}×{r['lr'][1]} → "
                f"{r['sr'][0]}×{r['sr'][1]} {r['kind']}, {r['plan']}, {r['seconds']:.2f} s",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )


def run_upscale_on_ray(
    args: tuple[Any, ...],
    overlap: int | None,
    max_memory: int | None,
    digest: str | None,
    json_output: bool,
) -> None:
    """``upscale --ray``: images are upscaled by a Ray Data actor pool; failures are listed.

    ``args``: the :class:`RayUpscaleRequest` fields from ``bundle`` to ``tile``, in order."""
    from esr_deploy.errors import DataError
    from esr_deploy.progress import RichProgress
    from esr_deploy.serving.ray_batch import RayUpscaleRequest, pending_jobs, upscale_on_ray
    from esr_deploy.serving.ray_support import import_ray

    import_ray()  # says how to install Ray before any work

    request = dataclasses.replace(
        RayUpscaleRequest(*args), overlap=overlap, max_memory=max_memory, digest=digest
    )
    todo, done = pending_jobs(request)
    err.print(
        f"{len(todo)} images to upscale on Ray ({request.actors} actors); {done} already "
        "written (skipped)",
        highlight=False,
    )
    with RichProgress(err).task("images", len(todo)) as advance:

        def on_record(record: dict[str, Any]) -> None:
            if "error" in record:
                skip_message(f"{record['input']}: {record['error']}")
            advance()

        result = upscale_on_ray(request, on_record=on_record)
    show_upscale_records(result.written, json_output)
    if result.failed:
        raise DataError(
            f"{len(result.failed)} of {len(result.records)} images were skipped (messages "
            f"above); {len(result.written)} written to {request.out_dir}."
        )


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


def register_serving(app: typer.Typer, run: Callable[[Callable[[], Any]], Any]) -> None:
    """Add the ``serve`` command to ``app``; ``run`` turns errors into exit codes."""

    @app.command()
    def serve(
        bundle: Annotated[Path, typer.Argument(help="Engine bundle folder.")],
        replicas: Annotated[int, typer.Option(help="Replicas to start with.")] = 1,
        max_replicas: Annotated[
            int | None, typer.Option(help="Autoscale up to this many (default: --replicas).")
        ] = None,
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
        ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help=RAY_HELP)] = None,
        expect_digest: Annotated[
            str | None, typer.Option(help="Refuse the bundle unless its digest is this.")
        ] = None,
    ) -> None:
        """Serve a bundle over HTTP (Open Inference Protocol v2, as Triton) on Ray Serve.

        Runs until interrupted; clients such as tritonclient.http work unchanged."""

        def body() -> None:
            from esr_deploy.serving.ray_serve import ServeRequest, serve_forever

            request = ServeRequest(
                bundle, replicas, max_replicas or replicas, host, port, ray, expect_digest
            )
            serve_forever(request, lambda url: err.print(f"serving on {url}", highlight=False))

        run(body)
