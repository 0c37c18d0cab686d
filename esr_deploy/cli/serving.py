"""The command line's serving half: ``upscale`` (locally or ``--ray``), ``export --triton``
and ``serve``.

Like the other command modules it only maps options to typed requests and renders results:
the work is in :mod:`esr_deploy.runtime` and :mod:`esr_deploy.serving`. Nothing here imports
Ray; :mod:`esr_deploy.serving.ray_support` does, when a command needs it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from esr_deploy.cli.common import (
    BundleArg,
    ExpectDigest,
    Ray,
    command,
    err,
    note,
    out,
    run,
    setup_logging,
)
from esr_deploy.errors import DataError, EsrDeployError

Inputs = Annotated[
    list[str],
    typer.Argument(
        metavar="IMAGE|DIR",
        help="One or more images (PNG, JPEG, BMP, WebP, TIFF) or folders of them (or URIs, "
        "with --ray).",
        show_default=False,
    ),
]
UpscaleOut = Annotated[
    Path,
    typer.Option("--out", "-o", metavar="DIR", help="Folder for the upscaled images (PNG)."),
]
Tile = Annotated[
    int | None,
    typer.Option(
        metavar="PIXELS",
        help="Tile size in LR pixels (default: untiled when the image fits the engine's "
        "profile and --max-memory, else the largest tile that does).",
    ),
]
Overlap = Annotated[
    int | None,
    typer.Option(
        metavar="PIXELS",
        help="Tile overlap in LR pixels per side (default: the receptive field computed from "
        "the bundle's graph).",
    ),
]
MaxMemory = Annotated[
    float | None,
    typer.Option(
        metavar="GIB", help="GiB one engine call may use (default: half the available memory)."
    ),
]
UpscaleJson = Annotated[
    bool, typer.Option("--json", help="Print one JSON record per image on stdout.")
]
Actors = Annotated[int, typer.Option(metavar="N", help="With --ray: actors in the pool.")]
ActorCpus = Annotated[float, typer.Option(metavar="CPUS", help="With --ray: CPUs per actor.")]
ActorGpus = Annotated[float, typer.Option(metavar="GPUS", help="With --ray: GPUs per actor.")]


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


@command()
def upscale(
    bundle: BundleArg,
    inputs: Inputs,
    out_dir: UpscaleOut,
    tile: Tile = None,
    overlap: Overlap = None,
    max_memory: MaxMemory = None,
    expect_digest: ExpectDigest = None,
    json_output: UpscaleJson = False,
    ray: Ray = None,
    actors: Actors = 2,
    actor_cpus: ActorCpus = 1.0,
    actor_gpus: ActorGpus = 0.0,
) -> None:
    """Upscale images with a bundle, tiled where they are too large.

    Tiled where an image exceeds the engine's profile or --max-memory.

    Grey images stay grey, alpha is upscaled with bicubic interpolation and re-attached,
    16-bit greyscale PNGs keep 16 bits. Unreadable files are skipped with a message; the exit
    code is then 2.
    """
    setup_logging()

    def body() -> None:
        from esr_deploy.progress import RichProgress
        from esr_deploy.runtime.upscaler import load, upscale_jobs

        if tile is not None and tile < 1:
            raise EsrDeployError(f"--tile {tile} is not a positive number of LR pixels.")
        if overlap is not None and overlap < 0:
            raise EsrDeployError(f"--overlap {overlap} is negative — give 0 or more.")
        budget = None if max_memory is None else int(max_memory * 2**30)
        if ray is not None:
            args = (bundle, tuple(inputs), out_dir, ray, actors, actor_cpus, actor_gpus, tile)
            return run_upscale_on_ray(args, overlap, budget, expect_digest, json_output)
        jobs = upscale_jobs([Path(i) for i in inputs], out_dir)
        upscaler = load(bundle, max_memory=budget, digest=expect_digest)
        note(f"{upscaler.name}: x{upscaler.scale}; {upscaler.describe_tiling()}")
        records, failed = upscaler.upscale_files(
            jobs, tile, overlap, RichProgress(err), on_skip=skip_message
        )
        show_upscale_records(records, json_output)
        if failed:
            raise DataError(
                f"{failed} of {len(jobs)} images were skipped (messages above); "
                f"{len(records)} written to {out_dir}."
            )

    run(body)


Triton = Annotated[
    Path, typer.Option("--triton", metavar="DIR", help="Triton model repository folder.")
]
ModelName = Annotated[
    str | None, typer.Option(metavar="NAME", help="Model name (default: <name>-<target>).")
]
ModelVersion = Annotated[
    int, typer.Option("--version", metavar="N", help="Model version folder (integer ≥ 1).")
]
MaxBatch = Annotated[
    int | None,
    typer.Option(metavar="N", help="max_batch_size (default: the engine's, at most 8)."),
]
Instances = Annotated[int, typer.Option(metavar="N", help="Instances in the instance group.")]


@command()
def export(
    bundle: BundleArg,
    triton: Triton,
    name: ModelName = None,
    version: ModelVersion = 1,
    max_batch_size: MaxBatch = None,
    instances: Instances = 1,
    expect_digest: ExpectDigest = None,
) -> None:
    """Write a Triton model repository entry for a bundle.

    The entry holds config.pbtxt, the model, the manifest and the digest.
    """
    setup_logging()

    def body() -> None:
        from esr_deploy.serving.triton import TritonRequest, export_triton

        request = TritonRequest(bundle, triton, name, version, max_batch_size, instances,
                                expect_digest)  # fmt: skip
        entry = export_triton(request)
        text = f"{entry.version_dir}: {entry.plan.note}; max_batch_size {entry.max_batch_size}"
        out.print(f"{text}; bundle {entry.digest}", markup=False, soft_wrap=True)

    run(body)


Replicas = Annotated[int, typer.Option(metavar="N", help="Replicas to start with.")]
MaxReplicas = Annotated[
    int | None, typer.Option(metavar="N", help="Autoscale up to this many (default: --replicas).")
]
Host = Annotated[str, typer.Option(metavar="ADDRESS", help="Address to listen on.")]
Port = Annotated[int, typer.Option(metavar="PORT", help="HTTP port.")]


@command()
def serve(
    bundle: BundleArg,
    replicas: Replicas = 1,
    max_replicas: MaxReplicas = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    ray: Ray = None,
    expect_digest: ExpectDigest = None,
) -> None:
    """Serve a bundle over HTTP (Open Inference Protocol v2) on Ray.

    The protocol is Triton's, on Ray Serve; runs until interrupted; clients such as
    tritonclient.http work unchanged.
    """

    def body() -> None:
        from esr_deploy.serving.ray_serve import ServeRequest, serve_forever

        request = ServeRequest(
            bundle, replicas, max_replicas or replicas, host, port, ray, expect_digest
        )
        serve_forever(request, lambda url: err.print(f"serving on {url}", highlight=False))

    run(body)
