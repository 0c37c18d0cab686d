"""``esr-deploy inspect``: what a checkpoint or a bundle holds, without compiling anything.

Inspecting a bundle needs only the runtime (no torch); a checkpoint, the compile side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from esr_deploy.runtime.bundle_reader import open_bundle

if TYPE_CHECKING:
    from esr_deploy.loading.detect import ModelSource


def inspect_checkpoint(source: ModelSource) -> dict[str, Any]:
    """What the checkpoint holds and what each default pass would do (on a copy).

    It analyses, it does not compile: the smallest input is probed on one thread (the probes
    are at most 64×64, where a thread pool that wakes up for each conv costs more than it
    saves), and each pass is verified on the pass manager's seeded random inputs only, not
    on validation images (``compile`` verifies on a real LR crop too).
    """
    # the compile side (torch), imported only here: inspecting a bundle runs without it
    from esr_deploy.compiling.frontend import metrics_256, run_passes
    from esr_deploy.export import derive_input_range
    from esr_deploy.loading.detect import load_model

    loaded = load_model(source)
    rng = derive_input_range(loaded.model, loaded.recipe.scale, sweep=False)  # one thread
    _, plan = run_passes(loaded.model, loaded.recipe, rng, (), None, accept_border_drift=False)
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


def inspect_bundle(path: Path, digest: str | None = None) -> dict[str, Any]:
    """What a bundle is, opened through the strict reader (``digest``: the pinned one)."""
    bundle = open_bundle(path, digest=digest)
    m = bundle.manifest
    device = m["engine"]["device"]
    return {
        "name": m["name"],
        "target": m["target"],
        "digest": bundle.digest,
        "backend": f"{m['backend']} {m['engine']['backend_version']}",
        "built_on": device.get("model", device.get("kind")),
        "created": m.get("created"),
        "checkpoint": m["checkpoint"],
        "scale": m["scale"],
        "data_range": m["data_range"],
        "profile": m.get("profile"),
        "metrics": m["metrics"],
        "validation": {
            k: {kk: v.get(kk) for kk in ("engine_psnr_y", "psnr_drop", "parity_min_psnr")}
            for k, v in m["validation"].items()
            if isinstance(v, dict)
        },
        "latency_ms": {
            k: v.get("median") for k, v in m["latency_ms"].items() if isinstance(v, dict)
        },
        "files_verified": len(m["files"]),
    }
