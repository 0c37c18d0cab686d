"""``esr-deploy upscale --ray``: upscale an image collection with a Ray Data actor pool.

Contract:

- the jobs (input file → output PNG) are planned on the driver by the local path's
  :func:`~esr_deploy.runtime.upscaler.upscale_jobs`, so folders map to the same output names;
  an input given as a URI that pyarrow can read (``file://``, ``s3://``, ``gs://``, …) is
  listed recursively the same way, and each actor copies an image to a local temporary file
  and reads it with the same decoder;
- **resumable**: a job whose output file exists is not run again (outputs are written
  atomically by :func:`~esr_deploy.data.write_image`, so an existing file is a whole one);
- the bundle is opened once on the driver through the one strict reader to learn its digest,
  and each actor opens it once more through :func:`esr_deploy.runtime.upscaler.load` pinned
  to that digest: an actor never runs a bundle other than the one the driver checked;
- each image goes through :meth:`Upscaler.upscale_files`, the local path's own reading,
  planning, upscaling and writing, so outputs are bit for bit those of ``upscale`` without
  ``--ray``;
- a failing image is reported (its record has ``error``) and skipped, never losing others;
  an actor that dies mid-job has its images retried on another actor (Ray Data restarts
  actors and retries their tasks), so none are lost.

Outputs are written by the actors to local paths: on a multi-node cluster ``--out`` must be a
filesystem every node sees (a shared mount).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from esr_deploy.data import IMAGE_EXTENSIONS
from esr_deploy.errors import DataError, EsrDeployError
from esr_deploy.runtime.upscaler import UpscaleJob, upscale_jobs
from esr_deploy.serving.ray_support import connect, import_ray


@dataclass(frozen=True)
class RayUpscaleRequest:
    """What ``upscale --ray`` was asked to do (the CLI maps its options to this)."""

    bundle: Path
    inputs: tuple[str | Path, ...]  # local files/folders, or URIs (scheme://…) of folders/files
    out_dir: Path
    address: str | None = None  # None or "local": start a local Ray; else a cluster address
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    tile: int | None = None
    overlap: int | None = None
    max_memory: int | None = None
    digest: str | None = None


@dataclass(frozen=True)
class RayUpscaleResult:
    records: list[dict[str, Any]]  # one per image run: the local path's record, or "error"
    resumed: int  # images skipped because their output already existed

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" in r]

    @property
    def written(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" not in r]


class UpscaleActor:
    """One Ray Data actor: opens the bundle once (digest pinned), upscales a batch of jobs."""

    def __init__(
        self,
        bundle: str,
        digest: str,
        max_memory: int | None,
        tile: int | None,
        overlap: int | None,
    ) -> None:
        from esr_deploy.runtime.upscaler import load

        self.upscaler = load(bundle, max_memory=max_memory, digest=digest)
        self.tile, self.overlap = tile, overlap

    def upscale_one(self, job: UpscaleJob) -> dict[str, Any]:
        """The local path's record for ``job``, or ``{"input", "output", "error"}``."""
        messages: list[str] = []
        try:
            records, _ = self.upscaler.upscale_files(
                [job], self.tile, self.overlap, on_skip=messages.append
            )
        except EsrDeployError as exc:  # e.g. an output that cannot be written
            messages.append(str(exc))
            records = []
        except Exception as exc:  # an engine error on one image must not fail the whole job
            messages.append(f"{type(exc).__name__}: {exc}")
            records = []
        if records:
            return records[0]
        return {"input": str(job.input), "output": str(job.output), "error": "; ".join(messages)}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import json

        rows = [
            self.upscale_uri(str(i), Path(o))
            if is_uri(str(i))
            else self.upscale_one(UpscaleJob(Path(i), Path(o)))
            for i, o in zip(batch["input"], batch["output"], strict=True)
        ]
        return {"record": [json.dumps(r) for r in rows]}

    def upscale_uri(self, uri: str, output: Path) -> dict[str, Any]:
        """Copy ``uri`` to a local temporary file, upscale it, report it under its URI."""
        import tempfile

        from pyarrow import fs as pafs

        with tempfile.TemporaryDirectory(prefix="esr-ray-") as tmp:
            local = Path(tmp) / f"image{Path(uri).suffix.lower()}"
            try:
                filesystem, path = pafs.FileSystem.from_uri(uri)
                with filesystem.open_input_stream(path) as src:
                    local.write_bytes(src.read())
            except (OSError, ValueError) as exc:
                return {"input": uri, "output": str(output), "error": f"cannot read {uri}: {exc}"}
            record = self.upscale_one(UpscaleJob(local, output))
        if "error" in record:
            record["error"] = record["error"].replace(str(local), uri)
        return {**record, "input": uri}


def is_uri(text: str) -> bool:
    return "://" in text


def uri_jobs(uri: str, out_dir: Path) -> list[tuple[str, Path]]:
    """(file URI, output PNG) for each image under ``uri`` (a folder, searched recursively,
    or one file), named as :func:`upscale_jobs` names a local folder's or file's outputs."""
    from urllib.parse import urlparse

    from pyarrow import fs as pafs

    scheme = urlparse(uri).scheme
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [(uri, out_dir / f"{PurePosixPath(root).stem}.png")]
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot list {uri} — {exc} — check the URI and credentials.") from None
    files = sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File and PurePosixPath(f.path).suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(f"no images under {uri} — it has no {', '.join(IMAGE_EXTENSIONS)} files")
    base = PurePosixPath(root)
    return [
        (
            f"{scheme}://{f}",
            out_dir / base.name / PurePosixPath(f).relative_to(base).with_suffix(".png"),
        )
        for f in files
    ]


def pending_jobs(request: RayUpscaleRequest) -> tuple[list[tuple[str, Path]], int]:
    """(input, output) of the jobs whose output does not exist yet, and how many are done."""
    local = [Path(i) for i in request.inputs if not is_uri(str(i))]
    jobs = [(str(j.input), j.output) for j in upscale_jobs(local, request.out_dir)] if local else []
    for uri in (str(i) for i in request.inputs if is_uri(str(i))):
        jobs += uri_jobs(uri, request.out_dir)
    seen: dict[Path, str] = {}
    for given, output in jobs:
        if output.resolve() in seen:
            raise EsrDeployError(
                f"{seen[output.resolve()]} and {given} would both be written to {output} — "
                "upscale them into different --out folders."
            )
        seen[output.resolve()] = given
    todo = [(i, o) for i, o in jobs if not o.exists()]
    return todo, len(jobs) - len(todo)


def upscale_on_ray(
    request: RayUpscaleRequest,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    actor_cls: type[UpscaleActor] = UpscaleActor,
) -> RayUpscaleResult:
    """Run ``request`` on Ray (see the module docstring); ``on_record`` sees each record as
    it arrives (progress). ``actor_cls``: the actor class (a subclass, in tests)."""
    from esr_deploy.runtime.bundle_reader import open_bundle

    if request.actors < 1:
        raise EsrDeployError(f"--actors {request.actors} — give 1 or more actors.")
    bundle = open_bundle(request.bundle, digest=request.digest)  # fail early, on the driver
    todo, resumed = pending_jobs(request)
    if not todo:
        return RayUpscaleResult([], resumed)
    ray = import_ray()
    connect(ray, request.address)
    records = []
    for record in _run_pipeline(ray, request, str(bundle.path), bundle.digest, todo, actor_cls):
        records.append(record)
        if on_record is not None:
            on_record(record)
    return RayUpscaleResult(records, resumed)


def _run_pipeline(
    ray: Any,
    request: RayUpscaleRequest,
    bundle: str,
    digest: str,
    jobs: list[tuple[str, Path]],
    actor_cls: type[UpscaleActor],
) -> Iterator[dict[str, Any]]:
    import json

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI shows one bar of images instead
    items = [{"input": i, "output": str(o)} for i, o in jobs]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * request.actors))
    ds = ds.map_batches(
        actor_cls,
        fn_constructor_args=(bundle, digest, request.max_memory, request.tile, request.overlap),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=request.actors),
        num_cpus=request.cpus_per_actor,
        num_gpus=request.gpus_per_actor,
    )  # Ray Data restarts a dead actor and retries its batches (max_restarts=-1 by default)
    for row in ds.iter_rows():
        yield json.loads(row["record"])
