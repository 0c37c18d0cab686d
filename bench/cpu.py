"""Is esr-deploy the fastest way to run these models on this CPU? Peers, every CPU target,
auto's choice and the matmul roofline, side by side in one run.

Per model (official checkpoints: RLFN, IMDN, FMEN) and LR shape (256×256, 720×1280):

- the **peers** of :mod:`esr_deploy.validate.peers` (what a user would run instead: eager
  fp32, eager bf16 where native, ``torch.compile``, ONNX Runtime and OpenVINO on a plain
  ``torch.onnx.export``);
- every **esr-deploy CPU target** available here, compiled and validated on Set5 as
  ``--target auto`` compiles its candidates (every target held to the PSNR-Y budget), once
  at the default 0.02 dB budget and once more for the int8 targets at ``--max-drop 0.15``
  (their sensitivity search keeps fewer layers in float with the larger budget);
- **auto's choice** at each budget, chosen as ``compile_auto`` chooses (lowest median at
  256×256 among the targets that passed), and its ratio to the best peer (best fp32 peer
  for the 0.15 dB budget, which the issue's 1.3× bar is about);
- a large fp32 **matmul** (torch ``mm`` of 2048×2048, same threads): the roofline. Each
  runner's GFLOP/s is ``2 · MACs / time`` with the MACs of the official model at that shape
  (:func:`esr_deploy.validate.metrics.model_metrics` run on the ``meta`` device: the
  NTIRE count, convs plus element-wise activations), as a fraction of the matmul's.

Everything at one shape is timed interleaved (:func:`esr_deploy.validate.peers.measure_peers`),
so machine noise hits all alike: on a shared machine read the ratios, not the absolute
milliseconds (the header gives the load average). Results: ``bench/out/cpu.json`` and
``bench/out/cpu.md``.

    python bench/cpu.py                       # everything (make cpu-bench)
    python bench/cpu.py --models rlfn_x4 --shapes 256x256 --targets ov-fp32 ov-bf16 \\
        --peers eager-fp32 ov-plain-fp32 --runs 3          # a quick look (a few minutes)
    python bench/cpu.py ... --bundles /tmp/b   # keep (and next time reuse) the bundles
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esr_deploy.compiling import CompileOptions, compile_model
from esr_deploy.compiling.auto import AUTO_CANDIDATES, AUTO_MAX_PSNR_DROP
from esr_deploy.cpu import cpu_info, default_threads
from esr_deploy.gate.engines import open_engine
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.detect import ModelSource
from esr_deploy.loading.keys import load_weights
from esr_deploy.recipe import find_recipe
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.shapes import parse_shape
from esr_deploy.targets import availability, get_target
from esr_deploy.validate.metrics import model_metrics
from esr_deploy.validate.peers import PEERS, Runner, measure_peers, shape_key, vs_best_peer

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ESR_SHARED", REPO.parent / "shared"))
CHECKPOINTS = {"rlfn_x4": "rlfn_x4.pth", "imdn_x4": "imdn_x4.pth", "fmen_x4": "fmen_ntire2022.pth"}
SHAPES = ("256x256", "720x1280")
INT8_BUDGET = 0.15
MATMUL_N = 2048
MATMUL = "matmul 2048² fp32"


def matmul_runner() -> Callable[[np.ndarray], object]:
    """A large fp32 sgemm (torch ``mm``, torch's threads): ``2·N³`` FLOP per call."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(MATMUL_N, MATMUL_N, generator=g) for _ in range(2))
    return lambda _x: torch.mm(a, b)


def compile_targets(
    name: str, targets: list[str], folder: Path, int8_budgets: list[float]
) -> list[dict[str, Any]]:
    """Compile ``targets`` of the official ``name`` checkpoint as auto does, int8 ones at
    both budgets, into ``folder/<name>/<target>-<budget>`` (a bundle already there, from an
    earlier run with ``--bundles``, is reused); one row per engine, with the loader of its
    session under ``"load"`` (each shape loads it afresh, so it can be let go when the
    runners of a large shape do not fit in memory together)."""
    rows: list[dict[str, Any]] = []
    for target in targets:
        budgets = int8_budgets if target.endswith("-int8") else [AUTO_MAX_PSNR_DROP]
        status = availability(get_target(target))
        for budget in budgets:
            row: dict[str, Any] = {"engine": target, "budget_db": budget}
            rows.append(row)
            if not status.ok:
                row["skipped"] = status.reason
                continue
            out = folder / name / f"{target}-{budget}"
            try:
                manifest = _compiled(name, target, budget, out, row)
            except Exception as exc:  # a failed target is a row, not the end of the bench
                row["failed"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                continue
            v = manifest["validation"]["Set5"]
            row.update(psnr_drop=v["psnr_drop"], passed=bool(v["passed"]))
            row["load"] = partial(_engine_runner, out)
    return rows


def _engine_runner(bundle_dir: Path) -> Runner:
    """The bundle's session, loaded as ``esr-deploy bench`` loads it (engine checked here)."""
    return open_engine(bundle_dir).session.run


def _compiled(name: str, target: str, budget: float, out: Path, row: dict[str, Any]) -> Any:
    """The manifest of the bundle at ``out``: the one there, or a fresh compile."""
    if (out / "manifest.json").is_file():
        row["reused"] = str(out)
        return open_bundle(out).manifest
    started = time.perf_counter()
    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=SHARED / "weights" / CHECKPOINTS[name]),
            target=target,
            val_dirs=(SHARED / "data" / "sr" / "Set5",),
            out=out,
            latency_shapes=(),
            max_psnr_drop=budget,
        )
    )
    row["compile_s"] = round(time.perf_counter() - started, 1)
    return result.manifest


def _label(row: dict[str, Any]) -> str:
    if "peer" in row:
        return str(row["peer"])
    if row["engine"] == MATMUL:
        return MATMUL
    suffix = f" @{row['budget_db']:g} dB" if row["engine"].endswith("-int8") else ""
    return f"{row['engine']}{suffix}"


def bench_model(name: str, shapes: list[tuple[int, int]], args: argparse.Namespace) -> dict:
    recipe = find_recipe(name)
    model = recipe.build_model()
    load_weights(model, load_checkpoint(SHARED / "weights" / CHECKPOINTS[name]))
    model.eval()
    meta = copy.deepcopy(model).to("meta")
    macs = {shape_key(hw): model_metrics(meta, hw).flops for hw in shapes}
    with tempfile.TemporaryDirectory(prefix="esr-bench-") as tmp:
        engines = compile_targets(name, args.targets, args.bundles or Path(tmp), args.int8_budgets)
        runners = {_label(r): r.pop("load") for r in engines if "load" in r}
        runners[MATMUL] = matmul_runner
        rows = measure_peers(
            model,
            recipe.data_range,
            shapes,
            args.runs,
            args.large_runs,
            args.peers,
            runners,
            warmup=1,  # after the build probe: ONNX Runtime sizes its arena in the 2nd call
        )
    by_label = {_label(r): r for r in engines}
    for row in rows:  # measure_peers' engine rows carry the timings; merge into ours
        if "engine" in row and row["engine"] in by_label:
            mine = by_label[row["engine"]]
            mine.update({k: row[k] for k in ("latency_ms", "group", "failed") if k in row})
    peers = [r for r in rows if "peer" in r]
    matmul = next(r for r in rows if r.get("engine") == MATMUL)
    return {"model": name, "macs": macs, "peers": peers, "engines": engines, "matmul": matmul}


def summarise(result: dict, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """Auto's choice per budget, ratios to the best peers and roofline fractions."""
    first = shape_key(shapes[0])

    def ms(row: dict[str, Any], key: str) -> float | None:
        stats = row.get("latency_ms", {}).get(key)
        return None if stats is None else float(stats["median"])

    summary: dict[str, Any] = {"auto": {}, "roofline_gflops": {}, "gflops": {}}
    for budget in (AUTO_MAX_PSNR_DROP, INT8_BUDGET):
        ok = [
            r for r in result["engines"]
            if r["engine"] in AUTO_CANDIDATES and r.get("passed") and ms(r, first) is not None
            and (r["budget_db"] == budget or not r["engine"].endswith("-int8"))
        ]  # fmt: skip
        if not ok:
            continue
        chosen = min(ok, key=lambda r: ms(r, first) or float("inf"))
        entry: dict[str, Any] = {"chosen": _label(chosen)}
        for hw in shapes:
            key = shape_key(hw)
            mine = ms(chosen, key)
            best = vs_best_peer(result["peers"], key, mine) if mine else {}
            if best and mine:
                entry[key] = {"ms": mine, "best_peer": best["peer"], "vs_best_peer": best["ratio"]}
                fp32 = vs_best_peer(result["peers"], key, mine, fp32_only=True)
                if fp32:
                    entry[key].update(best_fp32_peer=fp32["peer"], vs_best_fp32_peer=fp32["ratio"])
        summary["auto"][f"{budget:g}"] = entry
    for hw in shapes:
        key = shape_key(hw)
        mm = ms(result["matmul"], key)
        roof = 2 * MATMUL_N**3 / (mm * 1e6) if mm else None
        summary["roofline_gflops"][key] = roof
        for row in [*result["peers"], *result["engines"]]:
            t = ms(row, key)
            if t and roof:
                gflops = 2 * result["macs"][key] / (t * 1e6)
                summary["gflops"].setdefault(_label(row), {})[key] = [gflops, gflops / roof]
    return summary


def table(result: dict, summary: dict, shapes: list[tuple[int, int]]) -> list[str]:
    keys = [shape_key(hw) for hw in shapes]
    head = "| runner | Set5 drop (dB) | " + " | ".join(f"{k} ms | GFLOP/s (roofline)" for k in keys)
    lines = [f"### {result['model']}", "", head + " |", "|---" * (2 + 2 * len(keys)) + "|"]
    for row in [*result["peers"], *result["engines"], result["matmul"]]:
        label = _label(row)
        why = row.get("skipped") or row.get("failed")
        if why and not row.get("latency_ms"):
            lines.append(f"| {label} | {str(why)[:90]} |" + " |" * (2 * len(keys)))
            continue
        drop = f"{row['psnr_drop']:+.4f}" + ("" if row.get("passed") else " (failed)") \
            if "psnr_drop" in row else "—"  # fmt: skip
        cells = []
        for k in keys:
            stats = row.get("latency_ms", {}).get(k)
            g = summary["gflops"].get(label, {}).get(k)
            cells.append(f"{stats['median']:.1f}" if stats else "—")
            cells.append(f"{g[0]:.1f} ({g[1]:.0%})" if g else "—")
        lines.append(f"| {label} | {drop} | " + " | ".join(cells) + " |")
    lines += ["", *_group_notes([*result["peers"], *result["engines"], result["matmul"]], keys)]
    for budget, entry in summary["auto"].items():
        parts = [
            f"{k}: {v['ms']:.1f} ms, {v['vs_best_peer']:.2f}× the best peer ({v['best_peer']})"
            + (
                f", {v['vs_best_fp32_peer']:.2f}× the best fp32 peer ({v['best_fp32_peer']})"
                if "vs_best_fp32_peer" in v
                else ""
            )  # fmt: skip
            for k, v in entry.items()
            if k != "chosen"
        ]
        lines.append(f"- auto at {budget} dB chooses **{entry['chosen']}**; " + "; ".join(parts))
    return [*lines, ""]


def _group_notes(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """Where the runners of a shape did not fit in memory together (``measure_peers`` timed
    them in groups, interleaved within each), which ran together."""
    notes = []
    for key in keys:
        groups: dict[int, list[str]] = {}
        for row in rows:
            if key in row.get("group", {}):
                groups.setdefault(row["group"][key], []).append(_label(row))
        if groups:
            parts = "; ".join(f"{', '.join(names)}" for _, names in sorted(groups.items()))
            notes.append(f"- at {key} the runners did not fit in memory together; interleaved "
                         f"within each group only: {parts}")  # fmt: skip
    return notes


def header() -> list[str]:
    info = cpu_info()
    return [
        f"CPU: {info.get('model', platform.processor())}, {default_threads()} threads; "
        f"flags: {', '.join(info.get('flags', []))}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"torch {torch.__version__}",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(CHECKPOINTS), choices=CHECKPOINTS)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), help="LR HxW")
    parser.add_argument(
        "--targets", nargs="*", default=list(AUTO_CANDIDATES), help="esr-deploy targets"
    )
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--runs", type=int, default=7, help="rounds at shapes ≤ 512×512")
    parser.add_argument("--large-runs", type=int, default=3, help="rounds at larger shapes")
    parser.add_argument(
        "--int8-budgets",
        nargs="*",
        type=float,
        default=[AUTO_MAX_PSNR_DROP, INT8_BUDGET],
        help="PSNR-Y drop budgets (dB) the int8 targets are compiled at",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument(
        "--bundles", type=Path, help="keep the compiled bundles here and reuse them next time"
    )
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes]
    args.out.mkdir(parents=True, exist_ok=True)
    lines = header()
    results = []
    print("\n".join(lines), flush=True)
    for name in args.models:
        result = bench_model(name, shapes, args)
        result["summary"] = summarise(result, shapes)
        results.append(result)
        block = table(result, result["summary"], shapes)
        print("\n".join(block), flush=True)
        lines += block
    doc = {"cpu": cpu_info(), "load_average": os.getloadavg(), "results": results}
    (args.out / "cpu.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
