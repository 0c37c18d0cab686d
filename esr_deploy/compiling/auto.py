"""``--target auto``: the fastest CPU target that runs here and passes validation.

The frontend (load → passes → export → reference) runs once; every available candidate of
:data:`AUTO_CANDIDATES` then goes through the backend step alone (precision → build →
validate, :func:`~esr_deploy.compiling.backend.build_target`), exactly as
``compile --target <candidate>`` would, with one quality budget for all: a PSNR-Y drop of at
most :data:`AUTO_MAX_PSNR_DROP` (the bf16/fp16 budget; ``--max-drop`` changes it) on every
validation set, so that the fastest target is not simply the one allowed to lose most (the
int8 sensitivity search keeps as many layers in float as that budget needs). A candidate
that misses its parity floor or the budget is out, with its failure recorded.

The engines that passed are timed *interleaved* (candidate 1, 2, ..., 1, 2, ...; each timed
call right after an untimed one of the same engine, so that each is timed in its steady
state) at the first latency shape (the NTIRE 256×256 by default), so that machine noise hits
all of them alike, and the one with the lowest median wins. In the same interleaving run the
peers a user would otherwise run (:data:`AUTO_PEERS`, :mod:`esr_deploy.validate.peers`: eager
PyTorch, and ONNX Runtime / OpenVINO on a plain export of the trained model), so the bundle
says how much faster it is than each on the CPU it was built on (``auto.peers``,
``auto.vs_best_peer`` = best peer's median / chosen engine's median). Its bundle is
published with the usual latency measurements and an ``auto`` section in the manifest: the
CPU (model and ISA flags) they were timed on, every candidate, whether it passed (or why
not, or why it could not run here), its latency (median, p10, p90), PSNR drop and compile
seconds, the budget, and the sentence that says why the winner was chosen.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from esr_deploy.bundle import StagedBundle, check_writable
from esr_deploy.compiling.backend import TargetBuild, build_target
from esr_deploy.compiling.frontend import Frontend
from esr_deploy.compiling.onnx_source import OnnxModel
from esr_deploy.compiling.options import HW, CompileOptions, CompileResult
from esr_deploy.compiling.publish import publish, validation_failure
from esr_deploy.compiling.source import Notes, frontend_of, load_source
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.errors import EsrDeployError, ValidationError
from esr_deploy.loading.detect import LoadedModel
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.targets import availability, get_target, require_available
from esr_deploy.validate.figures import targets_figure
from esr_deploy.validate.latency import LatencyStats
from esr_deploy.validate.peers import Loader, measure_peers, shape_key, vs_best_peer

log = logging.getLogger(__name__)

AUTO = "auto"
#: CPU targets ``auto`` considers, most promising first (the order only breaks exact ties).
#: The ``aoti-cpu-*`` targets are not among them: an AOTInductor compile adds about a minute
#: per target on 2 cores, and they were slower than ``ov-bf16`` at 256×256 here (README);
#: ``--auto-candidates`` can name them.
AUTO_CANDIDATES = ("ov-int8", "ort-int8", "ov-bf16", "ov-fp32", "ort-fp32")
AUTO_RUNS = 7
#: Peers timed beside the candidates (``torch.compile`` is left out: it compiles for minutes
#: on 2 cores; ``bench/cpu.py`` times it).
AUTO_PEERS = ("eager-fp32", "eager-bf16", "ort-plain-fp32", "ov-plain-fp32")
#: PSNR-Y drop budget (dB) every candidate must meet, unless --max-drop says otherwise.
AUTO_MAX_PSNR_DROP = 0.02


def runnable_candidates(options: CompileOptions) -> tuple[list[str], list[dict[str, Any]]]:
    """The candidates available here, and a report entry for each one that is not."""
    report: list[dict[str, Any]] = []
    runnable = []
    for name in options.auto_candidates or AUTO_CANDIDATES:
        status = availability(get_target(name))
        if status.ok:
            runnable.append(name)
        else:
            report.append({"target": name, "available": False, "reason": status.reason})
    if not runnable:
        raise EsrDeployError("No CPU target is available here for --target auto.")
    return runnable, report


def build_candidates(
    frontend: Frontend,
    names: list[str],
    options: CompileOptions,
    scratch: Path,
    progress: Progress,
    on_note: Notes,
    report: list[dict[str, Any]],
) -> dict[str, TargetBuild]:
    """Build and validate each candidate in ``scratch/<name>``; those that failed are
    recorded in ``report``, those that passed returned (in ``names`` order)."""
    passed: dict[str, TargetBuild] = {}
    for name in names:
        if on_note is not None:
            on_note(f"auto: compiling {name}")
        target, backend = require_available(name)
        folder = scratch / name
        folder.mkdir()
        try:
            build = build_target(frontend, target, backend, folder, options, progress)
            if build.failures():
                raise validation_failure(frontend, build, folder)
        except ValidationError as exc:
            report.append({"target": name, "available": True, "passed": False,
                           "failure": str(exc).splitlines()[0]})  # fmt: skip
            continue
        passed[name] = build
    return passed


def time_candidates(
    passed: dict[str, TargetBuild],
    shape: HW,
    frontend: Frontend,
    peers: tuple[str, ...],
    progress: Progress,
) -> tuple[list[LatencyStats], list[dict[str, Any]]]:
    """Every engine that passed, and the ``peers``, timed interleaved at ``shape`` (see the
    module docstring). Peers need the trained ``nn.Module``: none for an ONNX source."""
    # an ONNX source's model is an nn.Module in form only (it runs ONNX Runtime): no peers
    onnx_source = isinstance(frontend.loaded.model, OnnxModel)
    model = None if onnx_source else frontend.loaded.model
    peers = () if onnx_source else peers
    what = f"{len(passed)} engines" + (f" and {len(peers)} peers" if peers else "")
    with progress.task(f"auto: timing {what}", 1) as done:
        engines = {name: _loaded(b) for name, b in passed.items()}
        rows = measure_peers(
            model, frontend.recipe.data_range, [shape], AUTO_RUNS, peers=peers, engines=engines
        )
        done()
    key = shape_key(shape)
    stats = [LatencyStats.from_dict(r["latency_ms"][key]) for r in rows if "engine" in r]
    return stats, [r for r in rows if "peer" in r]


def _loaded(build: TargetBuild) -> Loader:
    """The loader of a candidate's session, already built (it is kept for publishing)."""
    return lambda: build.session.run


def auto_section(
    passed: dict[str, TargetBuild],
    stats: list[LatencyStats],
    report: list[dict[str, Any]],
    shape: HW,
    budget: float,
    peers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The manifest's ``auto`` section: the winner, why, and every candidate."""
    names = list(passed)
    medians = {n: s.median_ms for n, s in zip(names, stats, strict=True)}
    key = shape_key(shape)
    for name, stat in zip(names, stats, strict=True):
        build = passed[name]
        report.append({"target": name, "available": True, "passed": True,
                       "median_ms": round(medians[name], 3),
                       "psnr_drop": max(round(r.psnr_drop, 4) for r in build.results),
                       "latency_ms": {key: stat.to_dict()},
                       "backend": build.backend.name,
                       "backend_version": build.engine["backend_version"],
                       "compile_seconds": build.seconds,
                       })  # fmt: skip
    ranked = sorted(names, key=lambda n: medians[n])
    reason = (
        f"fastest at {key} of the targets that passed validation: "
        + ", ".join(f"{n} {medians[n]:.1f} ms" for n in ranked)
        + f" (medians of {AUTO_RUNS} interleaved runs)"
    )
    best = vs_best_peer(peers or [], shape_key(shape), medians[ranked[0]])
    if best:
        reason += (f"; {best['ratio']:.2f}× the fastest peer here ({best['peer']}, "
                   f"{best['median_ms']:.1f} ms)")  # fmt: skip
    return {
        "chosen": ranked[0],
        "reason": reason,
        "peers": peers or [],
        "vs_best_peer": best,
        "max_psnr_drop": budget,
        # every candidate was timed here, interleaved: on this CPU (model and ISA flags)
        "device": passed[names[0]].engine["device"],
        "timing": {"shape": key, "rounds": AUTO_RUNS, "warmup": 2, "rewarm": True},
        "candidates": report,
    }


def _add_auto(section: dict[str, Any], shape: HW, manifest: dict[str, Any], folder: Path) -> None:
    """Put the ``auto`` section and the candidates figure into the chosen bundle."""
    manifest["auto"] = section
    figure = targets_figure(
        folder,
        section["candidates"],
        chosen=section["chosen"],
        max_psnr_drop=section["max_psnr_drop"],
        latency_label=f"median latency at 1x3x{shape[0]}x{shape[1]} (ms)",
    )
    if figure is not None:
        manifest["report_figures"] = [*manifest.get("report_figures", []), figure]


def compile_auto(
    options: CompileOptions,
    progress: Progress | None = None,
    on_note: Notes = None,
    loaded: LoadedModel | None = None,
) -> CompileResult:
    """Build every candidate from one frontend, keep the fastest that passed; see the module
    docstring. ``loaded``: the model, already loaded (then ``options.source`` is not read)."""
    progress = progress or NullProgress()
    timer = StageTimer()
    if options.out is not None:
        check_writable(options.out)
    runnable, report = runnable_candidates(options)
    shape = options.latency_shapes[0] if options.latency_shapes else (256, 256)
    budget = AUTO_MAX_PSNR_DROP if options.max_psnr_drop is None else options.max_psnr_drop
    loaded = load_source(options, timer, on_note, loaded)
    destination = options.out or options.engines_dir / f"{loaded.recipe.name}-{AUTO}"
    check_writable(destination)
    with tempfile.TemporaryDirectory(prefix="esr-deploy-auto-") as tmp:
        frontend = frontend_of(loaded, options, Path(tmp), timer)
        with timer.stage("candidates"):
            candidates = replace(options, max_psnr_drop=budget)
            passed = build_candidates(
                frontend, runnable, candidates, Path(tmp), progress, on_note, report
            )
        if not passed:
            raise ValidationError(
                "--target auto: no CPU target passed validation — "
                + "; ".join(f"{r['target']}: {r.get('failure', r.get('reason'))}" for r in report)
                + " — see each target's failure above; loosen the recipe's tolerances only "
                "where the loss is understood.",
                details={"auto": {"candidates": report}},
            )
        with timer.stage("timing"):
            peers = AUTO_PEERS if options.auto_peers is None else options.auto_peers
            stats, peer_rows = time_candidates(passed, shape, frontend, peers, progress)
        section = auto_section(passed, stats, report, shape, budget, peer_rows)
        chosen = passed[section["chosen"]]
        with StagedBundle(destination) as staged:
            for item in chosen.folder.iterdir():
                if item.is_dir():
                    shutil.copytree(item, staged.dir / item.name)
                else:
                    shutil.copy2(item, staged.dir / item.name)
            finish = partial(_add_auto, section, shape)
            manifest = publish(frontend, chosen, staged, options, progress, timer, finish)
            path = staged.commit()
    log.info("auto chose %s: %s", section["chosen"], section["reason"])
    notes = (f"auto chose {section['chosen']}: {section['reason']}",)
    return CompileResult(bundle=path, manifest=manifest, notes=notes, digest=staged.digest or "")
