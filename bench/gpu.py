"""The AOTInductor CUDA targets on this GPU against PyTorch eager and torch.compile, one run.

Per model (official checkpoint; default RLFN and IMDN):

1. ``compile --target aoti-cuda-fp16`` (``--fp32``: also ``aoti-cuda-fp32``) validated on
   Set5 and Set14 exactly as the CLI does: parity against the fp32 PyTorch reference and the
   PSNR-Y drop (fp16 budget 0.02 dB), read from the manifest, with the compile time.
2. Latency with CUDA events (input already on the GPU, no copies timed) at 256×256 and
   720×1280 LR, interleaved (each timed call right after an untimed one of the same
   variant, so all variants share the machine's state): eager deploy form fp32, eager
   deploy form fp16 (``.half()``, channels_last: PyTorch's plain fp16), ``torch.compile`` of
   the same fp16 model, the aoti-cuda packages with and without CUDA graphs.

Prints the GPU (name, compute capability, driver, CUDA, torch) and a table per model with
each variant's median and its speed-up over eager fp16; writes ``<out>/gpu.json``.

    ESR_SHARED=/path/to/shared python bench/gpu.py [--models rlfn_x4 imdn_x4] [--fp32]
                                                   [--runs 50] [--large-runs 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cpu import CHECKPOINTS, SHARED, load_models

from esr_deploy.backends.aoti import AOTInductor
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.detect import ModelSource
from esr_deploy.runtime.bundle_reader import open_bundle

SHAPES = ((256, 256), (720, 1280))
Fn = Callable[[torch.Tensor], torch.Tensor]


def _eager(model: torch.nn.Module, half: bool) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if half:
                x = x.half().contiguous(memory_format=torch.channels_last)
            return model(x)

    return run


def cuda_ms(fns: list[Fn], x: torch.Tensor, rounds: int) -> list[float]:
    """Median GPU time (ms) of each of ``fns`` on ``x``, CUDA events around each call,
    interleaved; each timed call follows an untimed one of the same function."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # first calls: compiles, autotuning, CUDA-graph captures
        fn(x)
    torch.cuda.synchronize()
    for _ in range(rounds):
        for fn, out in zip(fns, times, strict=True):
            fn(x)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            out.append(float(start.elapsed_time(end)))
    return [statistics.median(t) for t in times]


def _aoti(name: str, target: str, out: Path) -> tuple[dict[str, Any], Fn, Fn]:
    """Compile ``target`` validated on Set5 and Set14; the manifest and the session's
    ``run_torch`` with and without CUDA graphs."""
    sets = (SHARED / "data" / "sr" / "Set5", SHARED / "data" / "sr" / "Set14")
    source = ModelSource(checkpoint=SHARED / "weights" / CHECKPOINTS[name])
    # no latency in the compile: this script times every variant itself, on the GPU
    options = CompileOptions(
        source=source, target=target, val_dirs=sets, out=out / target, latency_shapes=()
    )
    result = compile_model(options)
    bundle = open_bundle(result.bundle)
    settings = bundle.manifest["engine"]["settings"]
    graphed = AOTInductor("cuda").load(bundle.engine_path, settings)
    plain = AOTInductor("cuda").load(bundle.engine_path, {**settings, "cuda_graph": False})
    return result.manifest, graphed.run_torch, plain.run_torch


def bench_model(name: str, targets: list[str], runs: int, large_runs: int, tmp: Path) -> dict:
    _, recipe, _, deploy = load_models(name)
    fp32 = deploy.cuda().eval()
    half = copy.deepcopy(fp32).half().to(memory_format=torch.channels_last)
    fns: dict[str, Fn] = {
        "eager deploy fp32": _eager(fp32, half=False),
        "eager deploy fp16 (.half(), channels_last)": _eager(half, half=True),
        "torch.compile fp16": _eager(torch.compile(half), half=True),  # type: ignore[arg-type]
    }
    quality: dict[str, Any] = {}
    for target in targets:
        manifest, graphed, plain = _aoti(name, target, tmp / name)
        fns[f"{target} (CUDA graph)"] = graphed
        fns[f"{target} (no CUDA graph)"] = plain
        quality[target] = {
            "compile_seconds": manifest["engine"]["settings"]["compile_seconds"],
            "validation": {
                k: {f: v[f] for f in ("psnr_drop", "parity_min_psnr", "engine_psnr_y", "passed")}
                for k, v in manifest["validation"].items()
            },
            "kept_float32": [
                k["node"]
                for k in manifest.get("precision_onnx", {})
                .get("low_precision", {})
                .get("kept_float32", [])
            ],
            "device": manifest["engine"]["device"],
        }
    latency: dict[str, dict[str, float]] = {label: {} for label in fns}
    for h, w in SHAPES:
        x = torch.rand(1, 3, h, w, device="cuda") * recipe.data_range
        n = runs if h * w <= 512 * 512 else large_runs
        for label, ms in zip(fns, cuda_ms(list(fns.values()), x, n), strict=True):
            latency[label][f"1x3x{h}x{w}"] = ms
    return {"model": name, "quality": quality, "latency_ms": latency}


def _print(result: dict) -> None:
    print(f"\n{result['model']}")
    for target, q in result["quality"].items():
        for set_name, v in q["validation"].items():
            print(f"  {target} {set_name}: PSNR-Y drop {v['psnr_drop']:+.4f} dB, parity min "
                  f"{v['parity_min_psnr']:.1f} dB, passed {v['passed']}")  # fmt: skip
        print(f"  {target}: compiled in {q['compile_seconds']} s; float32 kept: "
              f"{', '.join(q['kept_float32']) or 'none'}")  # fmt: skip
    lat = result["latency_ms"]
    base = lat["eager deploy fp16 (.half(), channels_last)"]
    keys = list(base)
    print(f"  {'variant':<44}" + "".join(f"{k + ' ms':>18}{'vs eager fp16':>15}" for k in keys))
    for label, ms in lat.items():
        cells = "".join(f"{ms[k]:>18.3f}{base[k] / ms[k]:>14.2f}x" for k in keys)
        print(f"  {label:<44}{cells}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["rlfn_x4", "imdn_x4"])
    parser.add_argument("--fp32", action="store_true", help="also compile aoti-cuda-fp32")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--large-runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to PyTorch here: nothing to measure", file=sys.stderr)
        return 4
    index = torch.cuda.current_device()
    gpu = AOTInductor("cuda").device()
    print(f"GPU {gpu['name']} (compute capability {gpu['compute_capability']}), driver "
          f"{gpu['driver']}, CUDA {gpu['cuda']}, torch {gpu['torch']}, device {index}")  # fmt: skip
    targets = ["aoti-cuda-fp16", *(["aoti-cuda-fp32"] if args.fp32 else [])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(bench_model(name, targets, args.runs, args.large_runs, Path(tmp)))
            _print(results[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"gpu": gpu, "models": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
