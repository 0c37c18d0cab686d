"""``esr-deploy validate``: re-run parity and task quality of a received bundle here.

Nothing in the bundle is executed: the manifest's recipe is data. The PyTorch reference is
built only from what the user names on the command line (``--checkpoint`` with a zoo recipe,
detected or named with ``--recipe``, or ``--arch``), and the recipe the manifest records is
compared with it (architecture, its arguments, scale, input range) and with the checkpoint's
SHA-256, never imported. Without ``--checkpoint`` the reference is the bundle's own fp32 ONNX,
and the report says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esr_deploy.compiling.frontend import load_sets
from esr_deploy.errors import BundleError
from esr_deploy.export import INPUT_NAME, OUTPUT_NAME
from esr_deploy.loading.detect import ModelSource, load_model
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.recipe import DEFAULT_TOLERANCES, Recipe, Tolerances, parse_recipe
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.runtime.manifest import Manifest
from esr_deploy.targets import require_available
from esr_deploy.validate.parity import ReferenceRun, evaluate_set

#: recipe fields a bundle's manifest and the user's model must agree on
COMPARED = ("arch", "arch_args", "scale", "data_range")


def onnx_reference(path: Path) -> ReferenceRun:
    """A reference that runs an fp32 ONNX graph on the CPU runtime."""
    from esr_deploy.backends.onnxruntime import cpu_session

    session = cpu_session(path)

    def run(x: torch.Tensor) -> np.ndarray:
        return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

    return run


def recipe_from_manifest(manifest: Manifest) -> Recipe:
    """The manifest's recipe as data (scale, range, colour order); never built or imported."""
    r = manifest.recipe
    if r is None:
        raise BundleError("The bundle's manifest has no 'recipe' table — recompile the bundle.")
    return parse_recipe({k: r[k] for k in ("name", "arch", "arch_args", "scale", "data_range",
                                           "color_order") if k in r})  # fmt: skip


def check_same_model(manifest: Manifest, recipe: Recipe, sha256: str) -> None:
    """Refuse a named model that is not the one the bundle says it was built from."""
    recorded = manifest.checkpoint.sha256
    if recorded != sha256:
        raise BundleError(
            f"The checkpoint given with --checkpoint has SHA-256 {sha256}, the bundle was built "
            f"from {recorded} — pass the checkpoint the bundle was compiled from."
        )
    built = manifest.recipe or {}
    named = recipe.to_dict()
    for key in COMPARED:
        if json.dumps(built.get(key), sort_keys=True) != json.dumps(named[key], sort_keys=True):
            raise BundleError(
                f"The bundle says its model has {key} {built.get(key)!r}, the model you named "
                f"has {named[key]!r} — name the architecture the bundle was compiled with "
                "(--recipe or --arch/--arch-args)."
            )


def reference_for(
    manifest: Manifest, reference_onnx: Path, source: ModelSource | None
) -> tuple[ReferenceRun, Recipe, str]:
    """The reference to compare the engine with, the recipe to evaluate with, and what it is."""
    if source is None:
        return (
            onnx_reference(reference_onnx),
            recipe_from_manifest(manifest),
            (
                f"the bundle's fp32 ONNX ({reference_onnx.name}): no --checkpoint given (pass "
                "--checkpoint, with --recipe or --arch for a model outside the zoo, for the "
                "PyTorch reference)"
            ),
        )
    if source.arch:
        source = replace(
            source,
            scale=source.scale or manifest.scale,
            data_range=source.data_range or manifest.data_range,
        )
    loaded = load_model(source)
    check_same_model(manifest, loaded.recipe, loaded.checkpoint.sha256)
    return loaded.model, loaded.recipe, f"PyTorch fp32 model from {source.checkpoint}"


def validate_bundle(
    bundle_path: Path,
    val_dirs: Sequence[Path],
    source: ModelSource | None,
    progress: Progress | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """Re-run parity and task quality of a bundle here; returns a report dict with failures."""
    progress = progress or NullProgress()
    bundle = open_bundle(bundle_path, digest=digest)
    manifest = bundle.manifest
    target, backend = require_available(manifest.target)
    backend.check_engine(manifest)
    fp32_onnx = bundle.file(manifest.reference_onnx)
    reference, recipe, reference_kind = reference_for(manifest, fp32_onnx, source)
    session = backend.load(bundle.engine_path, manifest.engine.settings)
    sets = load_sets(val_dirs, recipe.scale)
    tolerance = recipe_tolerance(manifest, target.precision)
    parity_reference = None
    if (manifest.pruning or {}).get("mode") == "lossy":
        # the engine is meant to differ from the unpruned model: parity against the pruned
        # fp32 ONNX it was built from; the PSNR drop is reported, not gated (as in compile)
        parity_reference = onnx_reference(fp32_onnx)
        reference_kind += "; parity against the pruned fp32 ONNX in the bundle"
    results = [
        evaluate_set(s, reference, session.run, recipe, tolerance, progress, parity_reference)
        for s in sets
    ]
    return {
        "name": manifest.name,
        "target": manifest.target,
        "digest": bundle.digest,
        "reference": reference_kind,
        "validation": {r.name: r.to_dict() for r in results},
        "failures": [f for r in results for f in r.failures()],
    }


def recipe_tolerance(manifest: Manifest, precision: str) -> Tolerances:
    """The tolerance the bundle was validated with (recorded per set), else the default."""
    for v in manifest.validation.values():
        req = v.required
        if req is not None:
            try:
                return Tolerances(**req)
            except TypeError as exc:
                raise BundleError(
                    f"The manifest's validation tolerances {req!r} are malformed — recompile."
                ) from exc
    return DEFAULT_TOLERANCES[precision]
