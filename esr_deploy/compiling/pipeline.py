"""The compile pipeline: checkpoint → model → ONNX → engine → validation → bundle.

Cheap checks that can fail on user input run first (target available here, output writable,
checkpoint safe and complete, recipe, validation images readable), so a mistake is reported
in seconds and before anything is written. The target-independent frontend
(:mod:`~esr_deploy.compiling.frontend`) runs once into a scratch folder; the backend step
(:mod:`~esr_deploy.compiling.backend`) builds and validates the engine in a hidden staging
folder, which is moved into place only after every validation check passed
(:mod:`esr_deploy.bundle`). ``--target auto`` is :mod:`esr_deploy.compiling.auto`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from esr_deploy.bundle import StagedBundle, check_writable
from esr_deploy.compiling.auto import AUTO, compile_auto
from esr_deploy.compiling.backend import build_target
from esr_deploy.compiling.options import CompileOptions, CompileResult, check_options
from esr_deploy.compiling.publish import publish, validation_failure
from esr_deploy.compiling.source import Notes, frontend_of, load_source
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.loading.detect import LoadedModel
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.targets import require_available


def compile_model(
    options: CompileOptions,
    progress: Progress | None = None,
    on_note: Notes = None,
    loaded: LoadedModel | None = None,
) -> CompileResult:
    """Run the whole pipeline; see the module docstring. Raises EsrDeployError subclasses.

    ``on_note`` receives sentences a user should see as they happen (which recipe was
    chosen, what was skipped); the CLI prints them. ``loaded``: the model, already loaded
    (then ``options.source`` is not read).
    """
    progress = progress or NullProgress()
    timer = StageTimer()
    torch.manual_seed(0)
    check_options(options)
    if options.target == AUTO:
        return compile_auto(options, progress, on_note, loaded)
    target, backend = require_available(options.target)
    if options.out is not None:
        check_writable(options.out)
    loaded = load_source(options, timer, on_note, loaded)
    destination = options.out or options.engines_dir / f"{loaded.recipe.name}-{target.name}"
    check_writable(destination)
    with tempfile.TemporaryDirectory(prefix="esr-deploy-frontend-") as work:
        frontend = frontend_of(loaded, options, Path(work), timer)
        with StagedBundle(destination) as staged:
            build = build_target(frontend, target, backend, staged.dir, options, progress)
            timer.merge(build.seconds)
            if build.failures():
                raise validation_failure(frontend, build, destination)
            manifest = publish(frontend, build, staged, options, progress, timer)
            bundle = staged.commit()
    return CompileResult(
        bundle=bundle, manifest=manifest, notes=loaded.notes, digest=staged.digest or ""
    )
