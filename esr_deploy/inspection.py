"""``esr-deploy inspect``: what a checkpoint or a bundle holds, without compiling anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esr_deploy.bundle import load_bundle
from esr_deploy.compiler import ModelSource, load_model, load_sets, metrics_256, run_passes
from esr_deploy.export import derive_input_range


def inspect_checkpoint(source: ModelSource) -> dict[str, Any]:
    """What the checkpoint holds and what each default pass would do (on a copy)."""
    loaded = load_model(source)
    rng = derive_input_range(loaded.model, loaded.recipe.scale)
    _, plan = run_passes(
        loaded.model,
        loaded.recipe,
        rng,
        load_sets((), loaded.recipe.scale),
        None,
        accept_border_drift=False,
    )
    m = metrics_256(loaded.model, plan[0].before if plan else None)  # counted by the passes
    return {
        "checkpoint": str(loaded.checkpoint.path),
        "sha256": loaded.checkpoint.sha256,
        "nested_key": loaded.checkpoint.nested_key,
        "tensors": len(loaded.checkpoint.state_dict),
        "recipe": loaded.recipe.name,
        "how": " ".join(loaded.notes),
        "detection": loaded.detection,
        "arch": loaded.recipe.arch,
        "arch_args": dict(loaded.recipe.arch_args),
        "scale": loaded.recipe.scale,
        "data_range": loaded.recipe.data_range,
        "params": m.params,
        "flops_256": m.flops,
        "activations_256": m.activations,
        "convs": m.convs,
        "min_input_hw": list(rng.min_hw),
        "passes": [
            {
                "name": p.name,
                "would_modify": p.modified,
                "convs": f"{p.convs_before} -> {p.convs_after}",
                "params": f"{p.params_before} -> {p.params_after}",
                "details": list(p.details),
            }
            for p in plan
        ],
    }


def inspect_bundle(path: Path) -> dict[str, Any]:
    bundle = load_bundle(path)
    m = bundle.manifest
    return {
        "name": m["name"],
        "target": m["target"],
        "backend": f"{m['backend']} {m['backend_version']}",
        "built_on": m["engine"]["device"].get("model", m["engine"]["device"].get("kind")),
        "created": m["created"],
        "checkpoint": m["checkpoint"],
        "scale": m["scale"],
        "data_range": m["data_range"],
        "profile": m["profile"],
        "metrics": m["metrics"],
        "validation": {
            k: {kk: v[kk] for kk in ("engine_psnr_y", "psnr_drop", "parity_min_psnr")}
            for k, v in m["validation"].items()
        },
        "latency_ms": {k: v["median"] for k, v in m["latency_ms"].items()},
        "files_verified": len(m["files"]),
    }
