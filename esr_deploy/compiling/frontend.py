"""The target-independent half of a compile, run once per compile (``--target auto``
included): load → passes → export → reference.

What it produces, a :class:`Frontend`, is everything the per-target backend step needs: the
recipe, the validation sets, the deploy form and its pass results, the fp32 ONNX (written
into a work folder the caller owns; each backend copies it into its bundle), the fp32
reference the engines are validated against (memoized: each input is run once however many
targets are validated), and the NTIRE metrics. The reference is the *training* form of the
model (the passes are verified against it), or, for an ONNX source, that ONNX run in ONNX
Runtime (:mod:`esr_deploy.compiling.onnx_source`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.stages import StageTimer
from esr_deploy.data import ValidationSet, load_validation_set
from esr_deploy.export import ExportResult, InputRange, derive_input_range, export_onnx
from esr_deploy.export_check import export_check_inputs
from esr_deploy.loading.checkpoint import LoadedCheckpoint
from esr_deploy.loading.detect import LoadedModel
from esr_deploy.passes import DEFAULT_PASSES, build_passes
from esr_deploy.passes.base import METRICS_HW, PassContext, PassManager, PassResult, copy_model
from esr_deploy.paths import default_val_dir
from esr_deploy.recipe import Recipe
from esr_deploy.validate.metrics import ModelMetrics, model_metrics
from esr_deploy.validate.parity import ReferenceRun, model_input

#: The fp32 ONNX the frontend writes into its work folder.
FRONTEND_ONNX = "frontend.onnx"


@dataclass(frozen=True)
class DeployModels:
    """The deploy form, and for lossy pruning the same before pruning (for its report)."""

    model: nn.Module
    passes: list[PassResult]
    unpruned: nn.Module | None = None


@dataclass(frozen=True)
class Frontend:
    """What every target of one compile starts from (see the module docstring)."""

    loaded: LoadedModel
    sets: list[ValidationSet]
    input_range: InputRange
    #: the fp32 ONNX every engine is built from; ``export.path`` lies in the work folder
    export: ExportResult
    #: the fp32 reference (training form, or the source ONNX), memoized per input
    reference: ReferenceRun
    #: set when the engine is meant to differ from ``reference`` (lossy pruning)
    parity_reference: ReferenceRun | None
    #: the PyTorch deploy form and its passes; ``None`` for an ONNX source
    deployed: DeployModels | None
    #: the manifest's ``metrics`` section
    metrics: dict[str, Any]

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe

    @property
    def passes(self) -> list[PassResult]:
        return self.deployed.passes if self.deployed is not None else []


def load_sets(val_dirs: Sequence[Path], scale: int) -> list[ValidationSet]:
    dirs = list(val_dirs) or [default_val_dir()]
    return [load_validation_set(d, scale) for d in dirs]


def checkpoint_section(ckpt: LoadedCheckpoint) -> dict[str, Any]:
    """The manifest's ``checkpoint`` section. A source that is not a file (an ``nn.Module``
    given to :func:`esr_deploy.compile`) is named by its path as given, not resolved."""
    path = ckpt.path
    return {
        "path": str(path.resolve()) if path.is_file() else path.as_posix(),
        "sha256": ckpt.sha256,
        "nested_key": ckpt.nested_key,
        "placeholders": list(ckpt.placeholders),
    }


def verification_inputs(
    recipe: Recipe, input_range: InputRange, sets: Sequence[ValidationSet]
) -> list[torch.Tensor]:
    """Fixed inputs the pass manager compares models on: odd-sized random tensors (seeded),
    the smallest accepted size, and a real LR image (a crop of the first validation image)."""
    gen = torch.Generator().manual_seed(0)
    min_h, min_w = input_range.min_hw
    sizes = [(max(min_h, 37), max(min_w, 53)), (min_h, min_w)]
    inputs = [torch.rand(1, 3, h, w, generator=gen) * recipe.data_range for h, w in sizes]
    for vset in sets[:1]:
        for pair in vset.pairs[:1]:
            lr = pair.lr[:64, :64]
            if lr.shape[0] >= min_h and lr.shape[1] >= min_w:
                inputs.append(model_input(np.ascontiguousarray(lr), recipe))
    return inputs


def run_passes(
    model: nn.Module,
    recipe: Recipe,
    input_range: InputRange,
    sets: Sequence[ValidationSet],
    names: Sequence[str] | None,
    accept_border_drift: bool,
    prune_ratio: float | None = None,
    prune_to: int | None = None,
) -> tuple[nn.Module, list[PassResult]]:
    """The deploy form of ``model`` (a copy; the training form is kept as the reference)."""
    names = DEFAULT_PASSES if names is None else tuple(names)
    if not names:
        return model, []
    min_h, min_w = input_range.min_hw
    context = PassContext(
        data_range=recipe.data_range,
        sample_hw=(max(min_h, 32), max(min_w, 32)),
        accept_border_drift=accept_border_drift,
    )
    manager = PassManager(
        build_passes(names, prune_ratio, prune_to),
        context,
        verification_inputs(recipe, input_range, sets),
    )
    return manager.run(copy_model(model))


def deploy_form(
    loaded: LoadedModel,
    options: CompileOptions,
    input_range: InputRange,
    sets: Sequence[ValidationSet],
) -> DeployModels:
    """Run the passes; lossy pruning runs alone after the others so its cost can be shown."""
    names = DEFAULT_PASSES if options.passes is None else tuple(options.passes)
    args = (loaded.recipe, input_range, sets)
    if not options.lossy_pruning:
        model, results = run_passes(loaded.model, *args, names, options.accept_border_drift)
        return DeployModels(model, results)
    if "prune-channels" not in names:
        build_passes(names, options.prune_ratio, options.prune_to)  # raises the clear error
    others = [n for n in names if n != "prune-channels"]
    unpruned, results = run_passes(loaded.model, *args, others, options.accept_border_drift)
    pruned, prune = run_passes(
        unpruned,
        *args,
        ("prune-channels",),
        options.accept_border_drift,
        options.prune_ratio,
        options.prune_to,
    )
    return DeployModels(pruned, results + prune, unpruned)


def metrics_256(model: nn.Module, known: ModelMetrics | None) -> ModelMetrics:
    """NTIRE metrics at 256×256 LR: ``known`` when it was counted at that size."""
    if known is not None and tuple(known.input_hw) == METRICS_HW:
        return known
    return model_metrics(model, input_hw=METRICS_HW)


def model_metrics_section(
    loaded: LoadedModel, deployed: DeployModels, export: ExportResult
) -> dict[str, Any]:
    """The manifest's ``metrics``: the deploy form's, its ONNX's and the training form's."""
    results = deployed.passes
    # the pass manager already counted both ends; count here only what it did not
    mm = metrics_256(deployed.model, results[-1].after if results else None)
    trained = metrics_256(loaded.model, results[0].before) if results else mm
    return {
        "params": mm.params,
        "flops_256": mm.flops,
        "activations_256": mm.activations,
        "convs": mm.convs,
        "onnx_convs": export.stats.convs,
        "onnx_params": export.stats.params,
        "training_form": {
            "params": trained.params,
            "flops_256": trained.flops,
            "convs": trained.convs,
        },
    }


def memoized(reference: ReferenceRun) -> ReferenceRun:
    """``reference`` computed once per distinct input (searches validate many candidates)."""
    cache: dict[tuple[tuple[int, ...], bytes], Any] = {}

    def run(x: torch.Tensor) -> Any:
        key = (tuple(x.shape), hashlib.sha1(x.numpy().tobytes()).digest())
        if key not in cache:
            cache[key] = reference(x)
        return cache[key]

    return run


def sets_and_input_range(
    loaded: LoadedModel, options: CompileOptions, timer: StageTimer
) -> tuple[list[ValidationSet], InputRange]:
    """The first stages of every frontend: the validation sets (``load``) and the input sizes
    the model accepts (``probe``)."""
    with timer.stage("load"):
        sets = load_sets(options.val_dirs, loaded.recipe.scale)
    with timer.stage("probe"):
        input_range = derive_input_range(loaded.model, loaded.recipe.scale)
    return sets, input_range


def run_frontend(
    loaded: LoadedModel,
    options: CompileOptions,
    workdir: Path,
    timer: StageTimer,
) -> Frontend:
    """Validation sets, passes, export and reference of a loaded PyTorch model, once.

    ``workdir``: a folder the caller owns and removes; the fp32 ONNX is written there.
    """
    recipe = loaded.recipe
    sets, input_range = sets_and_input_range(loaded, options, timer)
    with timer.stage("passes"):
        deployed = deploy_form(loaded, options, input_range, sets)
    with timer.stage("export"):
        export = export_onnx(
            deployed.model,
            workdir / FRONTEND_ONNX,
            recipe.scale,
            recipe.data_range,
            max_hw=recipe.profile.max,
            input_range=input_range,
            check_inputs=export_check_inputs(
                [(p.name, p.lr) for p in sets[0].pairs],
                partial(model_input, recipe=recipe),
                input_range.min_hw,
                recipe.data_range,
            ),
            exporter=options.exporter,
        )
    with timer.stage("metrics"):
        metrics = model_metrics_section(loaded, deployed, export)
    return Frontend(
        loaded=loaded,
        sets=sets,
        input_range=input_range,
        export=export,
        reference=memoized(loaded.model),
        parity_reference=deployed.model if deployed.unpruned is not None else None,
        deployed=deployed,
        metrics=metrics,
    )
