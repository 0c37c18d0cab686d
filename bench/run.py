"""Side-by-side latency: eager PyTorch fp32 vs the compiled ort-fp32 engine, per zoo model.

Official checkpoints: the eager model vs its engine. Training forms (random weights, BN
statistics calibrated on a real LR image): the eager *training form* vs the engine compiled
from it with the default passes (folded to the deploy form). Runs are interleaved (eager,
engine, eager, engine, ...) so that machine noise hits both alike; the printed ratio is
median(eager) / median(engine) from the same run. Results are also written to
bench/out/latest.json.

    python bench/run.py [--models rlfn_x4 ecbsr_m4c16_x4] [--shape 256x256] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from esr_deploy.compiling.frontend import load_sets, run_passes
from esr_deploy.compiling.publish import scratch_engine
from esr_deploy.export import derive_input_range
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.keys import load_weights
from esr_deploy.recipe import Recipe, find_recipe
from esr_deploy.targets import require_available
from esr_deploy.validate.latency import measure_interleaved
from esr_deploy.zoo.training import calibration_image, randomize

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = {
    "imdn_x4": "imdn_x4.pth",
    "rfdn_x4": "rfdn_aim2020.pth",
    "rlfn_x4": "rlfn_x4.pth",
    "fmen_x4": "fmen_ntire2022.pth",
    "dipnet_x4": "dipnet_ntire2023.pth",
}
TRAINING_FORMS = ("ecbsr_m4c16_x4", "fmen_train_x4", "rlfn_rep_x4", "repvgg_sr_x4", "dbb_sr_x4")


def _model(name: str, weights: Path | None) -> tuple[Recipe, torch.nn.Module]:
    recipe = find_recipe(name)
    model = recipe.build_model()
    if weights is not None:
        load_weights(model, load_checkpoint(weights))
    else:  # a training form: random weights, BN statistics from a real LR image
        randomize(model, seed=0, calibration=calibration_image(recipe.data_range))
    return recipe, model.eval()


def bench_model(name: str, weights: Path | None, hw: tuple[int, int], runs: int) -> dict:
    recipe, model = _model(name, weights)
    rng = derive_input_range(model, recipe.scale)
    deploy, passes = run_passes(model, recipe, rng, load_sets((), recipe.scale), None, False)
    _, backend = require_available("ort-fp32")
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)) * recipe.data_range
    xn = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        session, exported = scratch_engine(deploy, Path(tmp), backend, recipe, rng)
        with torch.inference_mode():
            eager, engine = measure_interleaved(
                [partial(model, x), partial(session.run, xn)], warmup=1, rounds=runs
            )
    e, g = eager.median_ms, engine.median_ms
    return {
        "model": name,
        "form": "training" if weights is None else "official",
        "shape": f"1x3x{hw[0]}x{hw[1]}",
        "eager_fp32_ms": e,
        "ort_fp32_ms": g,
        "ratio_eager_over_ort": e / g,
        "runs": runs,
        "threads": torch.get_num_threads(),
        "convs_eager": passes[0].convs_before if passes else None,
        "convs_engine": exported.stats.convs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[*CHECKPOINTS, *TRAINING_FORMS])
    parser.add_argument("--shape", default="256x256")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared" / "weights")
    args = parser.parse_args()
    h, w = (int(v) for v in args.shape.split("x"))
    rows: list[dict] = []
    print(
        f"{'model':<15} {'form':<9} {'shape':<12} {'convs':>9} {'eager fp32 ms':>14} "
        f"{'ort-fp32 ms':>12} {'eager/ort':>10}"
    )
    for name in args.models:
        weights: Path | None = None
        if name in CHECKPOINTS:
            weights = args.weights / CHECKPOINTS[name]
            if not weights.is_file():
                if name != "rlfn_x4":
                    print(f"{name:<15} skipped: {weights} not found", file=sys.stderr)
                    continue
                weights = REPO / "esr_deploy" / "assets" / "rlfn_x4.pth"
        row = bench_model(name, weights, (h, w), args.runs)
        rows.append(row)
        convs = f"{row['convs_eager']}->{row['convs_engine']}"
        print(
            f"{name:<15} {row['form']:<9} {row['shape']:<12} {convs:>9} "
            f"{row['eager_fp32_ms']:>14.1f} {row['ort_fp32_ms']:>12.1f} "
            f"{row['ratio_eager_over_ort']:>9.2f}x",
            flush=True,
        )
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
