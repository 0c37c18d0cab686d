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
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from esr_deploy.serving.ray_batch import RayUpscaleRequest

err = Console(stderr=True)
out = Console()

RAY_HELP = (
    "Run on Ray: 'local' (a Ray started on this machine) or a cluster address "
    "(ray://host:10001); needs the ray extra of esr-deploy."
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
    request: RayUpscaleRequest,
    overlap: int | None,
    max_memory: int | None,
    digest: str | None,
    json_output: bool,
) -> None:
    """``upscale --ray``: images are upscaled by a Ray Data actor pool; failures are listed."""
    from esr_deploy.errors import DataError
    from esr_deploy.progress import RichProgress
    from esr_deploy.serving.ray_batch import pending_jobs, upscale_on_ray

    request = dataclasses.replace(request, overlap=overlap, max_memory=max_memory, digest=digest)
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
        """Serve a bundle over HTTP with the Open Inference Protocol v2 (Triton, KServe) on
        Ray Serve, until interrupted."""

        def body() -> None:
            from esr_deploy.serving.ray_serve import ServeRequest, serve_forever

            request = ServeRequest(
                bundle, replicas, max_replicas or replicas, host, port, ray, expect_digest
            )
            serve_forever(request, lambda url: err.print(f"serving on {url}", highlight=False))

        run(body)
