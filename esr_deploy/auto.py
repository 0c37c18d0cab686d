"""``--target auto``: the fastest CPU target that runs here and passes validation.

Every available candidate of :data:`AUTO_CANDIDATES` is compiled and validated exactly as
``compile --target <candidate>`` would, with one quality budget for all: a PSNR-Y drop of at
most :data:`AUTO_MAX_PSNR_DROP` (the bf16/fp16 budget; ``--max-drop`` changes it) on every
validation set, so that the fastest target is not simply the one allowed to lose most (the
int8 sensitivity search keeps as many layers in float as that budget needs). A candidate
that misses its parity floor or the budget is out, with its failure recorded.

The engines that passed are timed *interleaved* (candidate 1, 2, ..., 1, 2, ...; each timed
call right after an untimed one of the same engine, so that each is timed in its steady
state) at the first latency shape (the NTIRE 256×256 by default), so that machine noise hits
all of them alike, and the one with the lowest median wins. Its bundle is published with the
usual latency measurements and an ``auto`` section in the manifest: the CPU (model and ISA
flags) they were timed on, every candidate, whether it passed (or why not, or why it could
not run here), its latency (median, p10, p90) and PSNR drop, the budget, and the sentence
that says why the winner was chosen.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esr_deploy.bundle import MANIFEST, REPORT, StagedBundle, check_writable
from esr_deploy.errors import EsrDeployError, ValidationError
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.runtime.bundle_reader import DIGEST_FILE, open_bundle
from esr_deploy.targets import availability, get_target, require_available
from esr_deploy.validate.figures import targets_figure
from esr_deploy.validate.latency import measure_interleaved
from esr_deploy.validate.report import write_report

if TYPE_CHECKING:
    from esr_deploy.compiler import CompileOptions, CompileResult

log = logging.getLogger(__name__)

AUTO = "auto"
#: CPU targets ``auto`` considers, most promising first (the order only breaks exact ties).
#: The ``aoti-cpu-*`` targets are not among them: an AOTInductor compile adds about a minute
#: per target on 2 cores, and they were slower than ``ov-bf16`` at 256×256 here (README);
#: ``--auto-candidates`` can name them.
AUTO_CANDIDATES = ("ov-int8", "ort-int8", "ov-bf16", "ov-fp32", "ort-fp32")
AUTO_RUNS = 7
#: PSNR-Y drop budget (dB) every candidate must meet, unless --max-drop says otherwise.
AUTO_MAX_PSNR_DROP = 0.02


def compile_auto(
    options: CompileOptions,
    progress: Progress | None = None,
    on_note: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile every candidate, keep the fastest that passed; see the module docstring."""
    from esr_deploy.compiler import CompileResult, compile_model, measure_engine_latency

    progress = progress or NullProgress()
    if options.out is not None:
        check_writable(options.out)
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
    shape = options.latency_shapes[0] if options.latency_shapes else (256, 256)
    budget = AUTO_MAX_PSNR_DROP if options.max_psnr_drop is None else options.max_psnr_drop
    with tempfile.TemporaryDirectory(prefix="esr-deploy-auto-") as tmp:
        passed: dict[str, Any] = {}
        for name in runnable:
            if on_note is not None:
                on_note(f"auto: compiling {name}")
            try:
                result = compile_model(
                    replace(
                        options,
                        target=name,
                        out=Path(tmp) / name,
                        latency_shapes=(),
                        max_psnr_drop=budget,
                    ),
                    progress,
                    on_note if name == runnable[0] else None,
                )
            except ValidationError as exc:
                report.append({"target": name, "available": True, "passed": False,
                               "failure": str(exc).splitlines()[0]})  # fmt: skip
                continue
            passed[name] = result
        if not passed:
            raise ValidationError(
                "--target auto: no CPU target passed validation — "
                + "; ".join(f"{r['target']}: {r.get('failure', r.get('reason'))}" for r in report)
                + " — see each target's failure above; loosen the recipe's tolerances only "
                "where the loss is understood.",
                details={"auto": {"candidates": report}},
            )
        names = list(passed)
        sessions = []
        for name in names:
            bundle = open_bundle(passed[name].bundle)
            _, backend = require_available(name)
            settings = bundle.manifest["engine"]["settings"]
            sessions.append(backend.load(bundle.engine_path, settings))
        first = passed[names[0]].manifest
        x = np.random.default_rng(0).random((1, 3, *shape), dtype=np.float32)
        x = (x * first["data_range"]).astype(np.float32)
        with progress.task(f"auto: timing {len(names)} engines", 1) as advance:
            stats = measure_interleaved(
                [partial(s.run, x) for s in sessions], warmup=2, rounds=AUTO_RUNS
            )
            advance()
        medians = {n: s.median_ms for n, s in zip(names, stats, strict=True)}
        best = min(names, key=lambda n: medians[n])
        shape_key = f"1x3x{shape[0]}x{shape[1]}"
        for name, stat in zip(names, stats, strict=True):
            drop = max(v["psnr_drop"] for v in passed[name].manifest["validation"].values())
            report.append({"target": name, "available": True, "passed": True,
                           "median_ms": round(medians[name], 3), "psnr_drop": drop,
                           "latency_ms": {shape_key: stat.to_dict()},
                           "backend": passed[name].manifest["backend"],
                           "backend_version": passed[name].manifest["engine"]["backend_version"],
                           })  # fmt: skip
        ranked = sorted(names, key=lambda n: medians[n])
        reason = (
            f"fastest at 1x3x{shape[0]}x{shape[1]} of the targets that passed validation: "
            + ", ".join(f"{n} {medians[n]:.1f} ms" for n in ranked)
            + f" (medians of {AUTO_RUNS} interleaved runs)"
        )
        chosen = passed[best]
        manifest = dict(chosen.manifest)
        chosen_session = sessions[names.index(best)]
        manifest["latency_ms"] = measure_engine_latency(
            chosen_session,
            options.latency_shapes,
            options.latency_runs,
            options.latency_warmup,
            manifest["data_range"],
            progress,
            options.large_runs,
        )
        manifest["auto"] = {
            "chosen": best,
            "reason": reason,
            "max_psnr_drop": budget,
            # every candidate was timed here, interleaved: on this CPU (model and ISA flags)
            "device": first["engine"]["device"],
            "timing": {"shape": shape_key, "rounds": AUTO_RUNS, "warmup": 2, "rewarm": True},
            "candidates": report,
        }
        destination = options.out or options.engines_dir / f"{manifest['name']}-{AUTO}"
        with StagedBundle(destination) as staged:
            for item in chosen.bundle.iterdir():
                if item.name not in (MANIFEST, DIGEST_FILE):
                    shutil.copy2(item, staged.dir / item.name)
            figure = targets_figure(
                staged.dir,
                report,
                chosen=best,
                max_psnr_drop=budget,
                latency_label=f"median latency at 1x3x{shape[0]}x{shape[1]} (ms)",
            )
            if figure is not None:
                manifest["report_figures"] = [*manifest.get("report_figures", []), figure]
            write_report(staged.dir / REPORT, manifest)  # report.md and .html, re-rendered
            full = staged.write_manifest(manifest)
            path = staged.commit()
    log.info("auto chose %s: %s", best, reason)
    notes = (f"auto chose {best}: {reason}",)
    return CompileResult(bundle=path, manifest=full, notes=notes, digest=staged.digest or "")
