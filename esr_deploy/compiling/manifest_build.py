"""The bundle's manifest, built from what the frontend and the backend step produced.

One function, :func:`build_manifest`; its keys are the manifest schema
(:data:`esr_deploy.bundle.SCHEMA_VERSION`) the runtime and the serving tools read.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch

from esr_deploy import __version__
from esr_deploy.backends.base import Backend
from esr_deploy.bundle import REFERENCE_ONNX, SCHEMA_VERSION
from esr_deploy.compiling.frontend import Frontend, checkpoint_section
from esr_deploy.export import INPUT_NAME, OUTPUT_NAME
from esr_deploy.targets import Target
from esr_deploy.validate.parity import SetResult


def build_manifest(
    frontend: Frontend,
    target: Target,
    backend: Backend,
    engine_info: Mapping[str, Any],
    sets: Sequence[SetResult],
    latency: dict[str, Any],
    compile_seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The manifest of ``target``'s bundle; ``compile_seconds``: the wall time of each
    compile stage and ``total`` (:mod:`esr_deploy.compiling.stages`)."""
    loaded, export = frontend.loaded, frontend.export
    recipe = loaded.recipe
    profile = recipe.profile.to_dict()
    profile["min"] = list(export.input_range.min_hw)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": recipe.name,
        "target": target.name,
        "precision": target.precision,
        "backend": backend.name,
        "backend_version": backend.version(),
        "scale": recipe.scale,
        "data_range": recipe.data_range,
        "color_order": recipe.color_order,
        "layout": "NCHW",
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 3, "H", "W"]}],
        "outputs": [
            {
                "name": OUTPUT_NAME,
                "dtype": "float32",
                "shape": ["N", 3, f"H*{recipe.scale}", f"W*{recipe.scale}"],
            }
        ],
        "profile": profile,
        "checkpoint": checkpoint_section(loaded.checkpoint),
        "recipe": recipe.to_dict(),
        "detection": loaded.detection,
        "arch": recipe.arch,
        "arch_args": dict(recipe.arch_args),
        "engine": dict(engine_info),
        "reference_onnx": REFERENCE_ONNX,
        "export": export.to_dict(),
        "passes": [p.to_dict() for p in frontend.passes],
        "metrics": frontend.metrics,
        "validation": {s.name: s.to_dict() for s in sets},
        "latency_ms": latency,
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "esr_deploy_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if compile_seconds is not None:
        manifest["compile_seconds"] = dict(compile_seconds)
    return manifest
