"""``esr-deploy compile --matrix``: compile checkpoints × targets, each cell where it can run.

A matrix file (TOML)::

    out = "engines/matrix"            # bundles go to <out>/<checkpoint>-<target>
    [compile]                         # options for every cell (all optional)
    no_latency = true
    val = ["data/Set5"]
    [[checkpoint]]
    name = "rlfn"
    path = "weights/rlfn_x4.pth"      # relative paths are relative to the matrix file
    recipe = "rlfn"                   # optional
    [[target]]
    name = "ov-int8"
    cpu_isa = ["avx512_vnni"]         # CPU flags the node must have
    [[target]]
    name = "trt-fp16"
    label = "trt-fp16-h100"           # optional: names the cell's folder (default: name)
    gpu = "H100"                      # GPU type; the engine is built on that type of GPU
    cpus = 2                          # CPUs the cell takes (default 1)

Resources. A cell needs ``CPU: cpus``, ``GPU: 1`` and ``accelerator_type:<gpu>`` (the
resource Ray nodes advertise for their GPU type) when ``gpu`` is set, and ``cpu_isa:<flag>``
for each CPU flag: start each Ray node with ``--resources`` from :func:`node_resources` (its
``esr_deploy.cpu.flags()``). A cell is **unschedulable** when no alive node of the cluster
has all its resources in total: it is reported and never submitted, so nothing waits forever;
the cells submitted are awaited with ``ray.wait`` and a timeout, after which the unfinished
ones are cancelled and reported as timed out.

Without Ray, a local process pool runs the cells whose resources this machine has (no GPU
type is assumed here: GPU cells need ``--ray``). Bundles are written by the node that
compiles them: on a cluster ``out`` must be a filesystem every node sees.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from esr_deploy.errors import EsrDeployError, RecipeError
from esr_deploy.serving.ray_support import connect, import_ray

#: seconds ``ray.wait`` waits for the cells submitted before reporting the rest as timed out
DEFAULT_TIMEOUT_S = 4 * 3600.0


@dataclass(frozen=True)
class Cell:
    """One checkpoint × target, with the Ray resources it needs."""

    checkpoint: str
    path: Path
    recipe: str | None
    target: str
    label: str  # the target's label in this matrix (its name unless given)
    out: Path
    cpus: float = 1.0
    gpu: str | None = None
    cpu_isa: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def resources(self) -> dict[str, float]:
        """Every resource a node must have (Ray's names: CPU, GPU, custom)."""
        needs: dict[str, float] = {"CPU": self.cpus}
        if self.gpu:
            needs["GPU"] = 1.0
            needs[f"accelerator_type:{self.gpu}"] = 0.001
        needs.update({f"cpu_isa:{flag}": 0.001 for flag in self.cpu_isa})
        return needs


def node_resources(cpu_flags: frozenset[str] | None = None) -> dict[str, float]:
    """The custom resources a node should advertise for its CPU (``ray start --resources``)."""
    from esr_deploy.cpu import RECORDED_FLAGS, flags

    have = flags() if cpu_flags is None else cpu_flags
    return {f"cpu_isa:{flag}": 1.0 for flag in RECORDED_FLAGS if flag in have}


def _bad(path: Path, what: str) -> RecipeError:
    return RecipeError(
        f"matrix {path}: {what} — see the format in esr_deploy/serving/matrix.py or the README."
    )


def load_matrix(path: Path) -> list[Cell]:
    """The cells of a matrix file (checkpoints × targets), checked before anything runs."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _bad(path, f"cannot be read as TOML ({exc})") from None
    checkpoints, targets = data.get("checkpoint"), data.get("target")
    if not isinstance(checkpoints, list) or not isinstance(targets, list):
        raise _bad(path, "needs [[checkpoint]] and [[target]] tables")
    if not checkpoints or not targets:
        raise _bad(path, "lists no checkpoint or no target")
    options = data.get("compile", {})
    if not isinstance(options, dict) or set(options) - {"no_latency", "val"}:
        raise _bad(path, f"[compile] may set no_latency and val, not {sorted(options)}")
    base = path.parent
    out = base / str(data.get("out", "engines/matrix"))
    labels = [str(t.get("label", t.get("name"))) if isinstance(t, dict) else "" for t in targets]
    if len(set(labels)) != len(labels):
        raise _bad(path, f"targets share a label ({labels}) — give each a distinct label")
    cells = []
    for ck in checkpoints:
        if not isinstance(ck, dict) or not isinstance(ck.get("path"), str):
            raise _bad(path, f"checkpoint {ck!r} has no path")
        name = str(ck.get("name", Path(ck["path"]).stem))
        for tg, label in zip(targets, labels, strict=True):
            if not isinstance(tg, dict) or not isinstance(tg.get("name"), str):
                raise _bad(path, f"target {tg!r} has no name")
            isa = tg.get("cpu_isa", [])
            cpus = tg.get("cpus", 1)
            if not isinstance(isa, list) or not isinstance(cpus, int | float) or cpus <= 0:
                raise _bad(path, f"target {tg['name']}: cpu_isa must be a list, cpus > 0")
            cells.append(
                Cell(
                    checkpoint=name,
                    path=base / ck["path"],
                    recipe=ck.get("recipe"),
                    target=tg["name"],
                    label=label,
                    out=out / f"{name}-{label}",
                    cpus=float(cpus),
                    gpu=tg.get("gpu"),
                    cpu_isa=tuple(str(f) for f in isa),
                    options=dict(options),
                )
            )
    return cells


def compile_cell(cell: Cell) -> dict[str, Any]:
    """Compile one cell here; its record (``status`` ok or failed), never raising."""
    from esr_deploy.compiling.options import CompileOptions
    from esr_deploy.compiling.pipeline import compile_model
    from esr_deploy.loading.detect import ModelSource

    start = time.perf_counter()
    record = _record(cell)
    latency: dict[str, Any] = {"latency_shapes": ()} if cell.options.get("no_latency") else {}
    try:
        result = compile_model(
            CompileOptions(
                source=ModelSource(checkpoint=cell.path, recipe=cell.recipe),
                target=cell.target,
                val_dirs=tuple(Path(v) for v in cell.options.get("val", ())),
                out=cell.out,
                **latency,
            )
        )
    except EsrDeployError as exc:
        record.update(status="failed", error=str(exc))
    else:
        record.update(status="ok", bundle=str(result.bundle), digest=result.digest)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _fits(needs: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(key, 0.0) >= amount for key, amount in needs.items())


def _unschedulable(cell: Cell, where: str) -> dict[str, Any]:
    needs = ", ".join(f"{k}={v:g}" for k, v in cell.resources().items())
    return {**_record(cell), "status": "unschedulable", "error": f"no node {where} has {needs}"}


def _record(cell: Cell) -> dict[str, Any]:
    return {"checkpoint": cell.checkpoint, "target": cell.target, "label": cell.label}


def run_local(cells: Sequence[Cell], workers: int | None = None) -> list[dict[str, Any]]:
    """Run the cells this machine can run in a process pool; the others are unschedulable."""
    here = {"CPU": float(os.cpu_count() or 1), **node_resources()}
    runnable = [i for i, c in enumerate(cells) if _fits(c.resources(), here)]
    records = {i: _unschedulable(c, "(this machine)") for i, c in enumerate(cells)}
    if runnable:
        size = workers or max(1, min(len(runnable), int(here["CPU"] // 2) or 1))
        with ProcessPoolExecutor(size, mp_context=get_context("spawn")) as pool:
            done = pool.map(compile_cell, [cells[i] for i in runnable])
            records.update(zip(runnable, done, strict=True))
    return [records[i] for i in range(len(cells))]


def run_on_ray(
    cells: Sequence[Cell], address: str | None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Each schedulable cell as a Ray task on a node that has its resources (module doc)."""
    ray = import_ray()
    connect(ray, address)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    records: dict[int, dict[str, Any]] = {}
    pending: dict[Any, int] = {}
    task = ray.remote(_compile_on_node)
    for i, cell in enumerate(cells):
        needs = cell.resources()
        if not any(_fits(needs, node) for node in nodes):
            records[i] = _unschedulable(cell, "of the cluster")
            continue
        custom = {k: v for k, v in needs.items() if k not in ("CPU", "GPU")}
        ref = task.options(
            num_cpus=needs["CPU"], num_gpus=needs.get("GPU", 0), resources=custom, max_retries=1
        ).remote(cell)
        pending[ref] = i
    deadline = time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, left))
        if not done:
            break
        for ref in done:
            i = pending.pop(ref)
            try:
                records[i] = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the node or worker died twice
                records[i] = {**_record(cells[i]), "status": "failed"}
                records[i]["error"] = f"the task failed on Ray: {exc}"
    for ref, i in pending.items():
        ray.cancel(ref, force=True)
        records[i] = {**_record(cells[i]), "status": "timed out"}
        records[i]["error"] = f"not finished within {timeout_s:g} s; cancelled"
    return [records[i] for i in range(len(cells))]


def _compile_on_node(cell: Cell) -> dict[str, Any]:
    """:func:`compile_cell` on a Ray worker, recording the node it ran on."""
    import ray

    record = compile_cell(cell)
    record["node"] = ray.get_runtime_context().get_node_id()
    return record
