"""The fastest way to run a model on this CPU: eager PyTorch variants and every esr-deploy CPU
target, side by side in one run.

Per model (official checkpoint): eager training form fp32, eager deploy form fp32 (after the
default passes), eager deploy form with bf16 autocast and channels_last, ``torch.compile``
of the same (bf16, channels_last), and the engine of every CPU target available here
(the ``aoti-cpu-*`` targets are the AOTInductor packages a serving process loads without the
model code)
(compiled and validated on Set5 as ``esr-deploy compile --target auto`` does each candidate:
every target held to auto's 0.02 dB PSNR-Y budget), plus what ``--target auto`` picks among
them. All are timed interleaved (one run of each in turn, repeated) at 256×256
and 720×1280 LR, so machine noise hits all alike; ratios are of medians from the same run.
Set5 PSNR-Y and its drop against the fp32 model are measured for every variant. Results also
go to bench/out/cpu.json.

    python bench/cpu.py [--models rlfn_x4] [--targets ov-bf16 ...] [--runs 7] [--large-runs 3]
                         [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from esr_deploy.auto import AUTO_CANDIDATES, AUTO_MAX_PSNR_DROP
from esr_deploy.compiler import CompileOptions, ModelSource, compile_model, load_sets, run_passes
from esr_deploy.export import derive_input_range
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.keys import load_weights
from esr_deploy.recipe import Recipe, find_recipe
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.targets import availability, get_target, require_available
from esr_deploy.validate.latency import measure_interleaved
from esr_deploy.validate.parity import evaluate_set

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ESR_SHARED", REPO.parent / "shared"))
CHECKPOINTS = {"rlfn_x4": "rlfn_x4.pth", "imdn_x4": "imdn_x4.pth", "fmen_x4": "fmen_ntire2022.pth"}
SHAPES = ((256, 256), (720, 1280))


def _bf16(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x.contiguous(memory_format=torch.channels_last)).float()

    return run


def _fp32(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def load_models(name: str) -> tuple[Path, Recipe, torch.nn.Module, torch.nn.Module]:
    """The official checkpoint of zoo model ``name``, its recipe, the training form and the
    deploy form after the default passes (verified on Set5)."""
    weights = SHARED / "weights" / CHECKPOINTS[name]
    recipe = find_recipe(name)
    model = recipe.build_model()
    load_weights(model, load_checkpoint(weights))
    model.eval()
    set5 = load_sets([SHARED / "data" / "sr" / "Set5"], recipe.scale)
    deploy, _ = run_passes(
        model, recipe, derive_input_range(model, recipe.scale), set5, None, False
    )
    return weights, recipe, model, deploy


def bench_model(
    name: str, runs: int, large_runs: int, compiled: bool, targets: tuple[str, ...]
) -> list[dict]:
    weights, recipe, model, deploy = load_models(name)
    set5 = load_sets([SHARED / "data" / "sr" / "Set5"], recipe.scale)
    # Module.to(memory_format=...) converts the parameters in place: copy first, so that the
    # fp32 rows keep the contiguous weights they would have
    deploy_cl = copy.deepcopy(deploy).to(memory_format=torch.channels_last)
    torch_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager training form fp32": _fp32(model),
        "eager deploy form fp32": _fp32(deploy),
        "eager bf16 channels_last": _bf16(deploy_cl),
    }
    if compiled:
        torch_fns["torch.compile bf16 channels_last"] = _bf16(
            torch.compile(deploy_cl, dynamic=True)  # type: ignore[arg-type]
        )
    rows: list[dict] = []
    runners: dict[str, Callable[[np.ndarray], object]] = {}
    for label, fn in torch_fns.items():
        tol = recipe.tolerance("fp32")
        result = evaluate_set(set5[0], model, lambda a, f=fn: f(torch.from_numpy(a)), recipe, tol)
        rows.append({"variant": label, "set5_psnr_y": result.engine_psnr_y,
                     "set5_drop": result.psnr_drop, "passed": None})  # fmt: skip
        runners[label] = lambda a, f=fn: f(torch.from_numpy(a))
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            status = availability(get_target(target))
            if not status.ok:
                rows.append({"variant": target, "skipped": status.reason})
                continue
            try:
                result = compile_model(
                    CompileOptions(
                        source=ModelSource(checkpoint=weights),
                        target=target,
                        val_dirs=(SHARED / "data" / "sr" / "Set5",),
                        out=Path(tmp) / target,
                        latency_shapes=(),
                        max_psnr_drop=AUTO_MAX_PSNR_DROP,
                    )
                )
            except Exception as exc:  # a failed target is a row, not the end of the bench
                rows.append({"variant": target, "failed": str(exc).splitlines()[0]})
                continue
            v = result.manifest["validation"]["Set5"]
            rows.append({"variant": target, "set5_psnr_y": v["engine_psnr_y"],
                         "set5_drop": v["psnr_drop"], "passed": v["passed"]})  # fmt: skip
            bundle = open_bundle(result.bundle)
            _, backend = require_available(target)
            session = backend.load(bundle.engine_path, bundle.manifest["engine"]["settings"])
            runners[target] = session.run
        timed = [r for r in rows if r["variant"] in runners]
        for h, w in SHAPES:
            x = np.random.default_rng(0).random((1, 3, h, w), dtype=np.float32)
            x = (x * recipe.data_range).astype(np.float32)
            n = runs if h * w <= 512 * 512 else large_runs
            stats = measure_interleaved(
                [partial(runners[r["variant"]], x) for r in timed], warmup=1, rounds=n
            )
            key = f"1x3x{h}x{w}"
            for r, s in zip(timed, stats, strict=True):
                r.setdefault("ms", {})[key] = s.median_ms
    engines = [r for r in rows if "ms" in r and r["variant"] in AUTO_CANDIDATES and r["passed"]]
    if engines:
        auto = min(engines, key=lambda r: r["ms"]["1x3x256x256"])
        rows.append({"variant": "auto", "chosen": auto["variant"]})
    for r in rows:
        r["model"] = name
    return rows


def _ms(rows: list[dict], variant: str) -> dict[str, float]:
    return next(dict(r["ms"]) for r in rows if r["variant"] == variant)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["rlfn_x4"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--targets",
        nargs="*",
        default=[*AUTO_CANDIDATES, "aoti-cpu-bf16", "aoti-cpu-fp32"],
        help="esr-deploy targets to time",
    )
    parser.add_argument("--large-runs", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    everything = []
    for name in args.models:
        rows = bench_model(
            name, args.runs, args.large_runs, not args.no_compile, tuple(args.targets)
        )
        everything += rows
        ref = _ms(rows, "eager deploy form fp32")
        bf16 = _ms(rows, "eager bf16 channels_last")
        print(f"\n{name}  (ratios: eager deploy fp32 / variant, eager bf16 channels_last / it)")
        header = " ".join(f"{k + ' ms':>18} {'vs fp32':>8} {'vs bf16':>8}" for k in ref)
        print(f"{'variant':<34} {'Set5 PSNR-Y':>11} {'drop dB':>8} {header}")
        for r in rows:
            if "ms" not in r:
                why = r.get("chosen") or r.get("skipped") or r.get("failed")
                print(f"{r['variant']:<34} {why}")
                continue
            cells = " ".join(
                f"{r['ms'][k]:>18.1f} {ref[k] / r['ms'][k]:>7.2f}x {bf16[k] / r['ms'][k]:>7.2f}x"
                for k in ref
            )
            print(f"{r['variant']:<34} {r['set5_psnr_y']:>11.4f} {r['set5_drop']:>8.4f} {cells}",
                  flush=True)  # fmt: skip
    (out / "cpu.json").write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
