"""Where a compile's model comes from, and which frontend it takes: a checkpoint (loaded
safely), a model the caller already holds (:func:`esr_deploy.compile`), or an ONNX file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from esr_deploy.compiling.frontend import Frontend, run_frontend
from esr_deploy.compiling.onnx_source import OnnxModel, onnx_frontend
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.loading.detect import LoadedModel, load_model

log = logging.getLogger(__name__)

Notes = Callable[[str], None] | None


def load_source(
    options: CompileOptions, timer: StageTimer, on_note: Notes, loaded: LoadedModel | None
) -> LoadedModel:
    """``loaded`` when the caller already has the model (:func:`esr_deploy.compile`), else
    the checkpoint of ``options.source``, loaded safely; its notes are logged and passed on."""
    with timer.stage("load"):
        if loaded is None:
            loaded = load_model(options.source)
    for note in loaded.notes:
        log.info("%s", note)
        if on_note is not None:
            on_note(note)
    return loaded


def frontend_of(
    loaded: LoadedModel, options: CompileOptions, workdir: Path, timer: StageTimer
) -> Frontend:
    """The frontend of a PyTorch model, or of an ONNX source (the ONNX itself)."""
    if isinstance(loaded.model, OnnxModel):
        return onnx_frontend(loaded, options, workdir, timer)
    return run_frontend(loaded, options, workdir, timer)
