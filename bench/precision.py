"""Reduced precision on the official checkpoints: accuracy of the fp16 and int8 ONNX, and
ort-int8 vs ort-fp32 latency side by side.

For each model: ``compile --target onnx-fp16`` and ``compile --target ort-int8`` on Set5 and
Set14 (calibration on their LR images, the sensitivity search on), each validated against
the PyTorch fp32 reference as the compile gates it; then the int8 engine and an ort-fp32
engine built from the same bundle's fp32 ONNX are timed interleaved (fp32, int8, fp32, ...)
at 256×256 so machine noise hits both alike. The ratio is median(fp32) / median(int8) from
the same run. Results also go to bench/out/precision.json.

    python bench/precision.py [--models rlfn_x4 imdn_x4 fmen_x4] [--runs 7] [--method mse]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

from esr_deploy import cpu
from esr_deploy.backends.onnxruntime import OnnxRuntimeCPU
from esr_deploy.bundle import REFERENCE_ONNX
from esr_deploy.compiling.options import CompileOptions, CompileResult
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.detect import ModelSource
from esr_deploy.precision.apply import PrecisionOptions
from esr_deploy.targets import require_available
from esr_deploy.validate.latency import measure_interleaved

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CHECKPOINTS = {"rlfn_x4": "rlfn_x4.pth", "imdn_x4": "imdn_x4.pth", "fmen_x4": "fmen_ntire2022.pth"}


def _compile(weights: Path, target: str, out: Path, method: str) -> CompileResult:
    sets = (SHARED / "data" / "sr" / "Set5", SHARED / "data" / "sr" / "Set14")
    return compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=weights),
            target=target,
            val_dirs=sets,
            out=out,
            latency_shapes=(),
            precision=PrecisionOptions(method=method),
        )
    )


def bench_model(name: str, hw: tuple[int, int], runs: int, method: str) -> dict:
    weights = SHARED / "weights" / CHECKPOINTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fp16 = _compile(weights, "onnx-fp16", root / "fp16", method).manifest
        int8_result = _compile(weights, "ort-int8", root / "int8", method)
        int8 = int8_result.manifest
        _, backend = require_available("ort-fp32")
        fp32_dir = root / "fp32"
        fp32_dir.mkdir()
        built = backend.build(int8_result.bundle / REFERENCE_ONNX, fp32_dir, "fp32")
        fp32_engine = backend.load(fp32_dir / built.engine_file, built.settings)
        int8_engine = backend.load(
            int8_result.bundle / int8["engine"]["file"], int8["engine"]["settings"]
        )
        x = np.random.default_rng(0).random((1, 3, *hw), dtype=np.float32) * int8["data_range"]
        x = x.astype(np.float32)
        t32, t8 = measure_interleaved(
            [partial(fp32_engine.run, x), partial(int8_engine.run, x)], warmup=2, rounds=runs
        )
    search = int8["precision_onnx"].get("search", {})
    return {
        "model": name,
        "shape": f"1x3x{hw[0]}x{hw[1]}",
        "method": method,
        "fp16_drop": {s: v["psnr_drop"] for s, v in fp16["validation"].items()},
        "fp16_parity_min": {s: v["parity_min_psnr"] for s, v in fp16["validation"].items()},
        "fp16_kept_float32": [k["op_type"] for k in fp16["precision_onnx"]["fp16"]["kept_float32"]],
        "int8_drop": {s: v["psnr_drop"] for s, v in int8["validation"].items()},
        "int8_parity_min": {s: v["parity_min_psnr"] for s, v in int8["validation"].items()},
        "int8_kept_float": [k["node"] for k in search.get("kept_float", [])],
        "int8_candidates": search.get("candidates"),
        "int8_weight_range": int8["precision_onnx"]["int8"]["weight_range"],
        "int8_kernels": int8["precision_onnx"].get("int8_kernels"),
        "ort_fp32_ms": t32.median_ms,
        "ort_int8_ms": t8.median_ms,
        "ratio_fp32_over_int8": t32.median_ms / t8.median_ms,
        "runs": runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(CHECKPOINTS))
    parser.add_argument("--shape", default="256x256")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--method", default="mse")
    args = parser.parse_args()
    h, w = (int(v) for v in args.shape.split("x"))
    print(f"CPU: {cpu.describe()}")
    print(f"ONNX Runtime int8 kernels here: {OnnxRuntimeCPU().int8_kernels().reason}", flush=True)
    print(
        f"{'model':<9} {'fp16 drop S5/S14 dB':>20} {'int8 drop S5/S14 dB':>20} "
        f"{'kept float':>11} {'weights':>8} {'ort-fp32 ms':>12} {'ort-int8 ms':>12} "
        f"{'fp32/int8':>10}"
    )
    rows = []
    for name in args.models:
        if not (SHARED / "weights" / CHECKPOINTS[name]).is_file():
            print(f"{name:<9} skipped: checkpoint not in {SHARED / 'weights'}", file=sys.stderr)
            continue
        row = bench_model(name, (h, w), args.runs, args.method)
        rows.append(row)
        f16 = "/".join(f"{v:.4f}" for v in row["fp16_drop"].values())
        i8 = "/".join(f"{v:.4f}" for v in row["int8_drop"].values())
        kept = f"{len(row['int8_kept_float'])}/{row['int8_candidates']}"
        print(
            f"{name:<9} {f16:>20} {i8:>20} {kept:>11} "
            f"{'±' + str(row['int8_weight_range'][1]):>8} {row['ort_fp32_ms']:>12.1f} "
            f"{row['ort_int8_ms']:>12.1f} {row['ratio_fp32_over_int8']:>9.2f}x",
            flush=True,
        )
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "precision.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
