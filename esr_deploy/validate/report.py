"""``report.md``: the human-readable summary of a bundle, rendered from its manifest.

The report is a pure function of the manifest, so ``esr-deploy validate`` and ``compile``
render the same thing and a reviewer can trust that the numbers are the manifest's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_report(manifest: Mapping[str, Any]) -> str:
    m = manifest
    lines = [
        f"# {m['name']} — {m['target']}",
        "",
        f"Built by esr-deploy {m['esr_deploy_version']} on {m['created']} with "
        f"{m['backend']} {m['backend_version']} (x{m['scale']}, input range 0..{m['data_range']:g},"
        f" {m['color_order']}, {m['layout']}).",
        "",
        "## Validation",
        "",
        _row(
            "set",
            "images",
            "reference PSNR-Y",
            "engine PSNR-Y",
            "drop (dB)",
            "reference SSIM-Y",
            "engine SSIM-Y",
            "min parity PSNR",
            "passed",
        ),
        _row(*["---"] * 9),
    ]
    for name, v in m["validation"].items():
        lines.append(
            _row(
                name,
                v["images"],
                f"{v['reference_psnr_y']:.4f}",
                f"{v['engine_psnr_y']:.4f}",
                f"{v['psnr_drop']:.4f}",
                f"{v['reference_ssim_y']:.4f}",
                f"{v['engine_ssim_y']:.4f}",
                f"{v['parity_min_psnr']:.2f}",
                "yes" if v["passed"] else "NO",
            )
        )
    lines += [
        "",
        "## Latency (ms)",
        "",
        _row("input", "median", "p10", "p90", "runs"),
        _row(*["---"] * 5),
    ]
    for shape, lat in m["latency_ms"].items():
        lines.append(
            _row(
                shape, f"{lat['median']:.2f}", f"{lat['p10']:.2f}", f"{lat['p90']:.2f}", lat["runs"]
            )
        )
    mt = m["metrics"]
    lines += [
        "",
        "## Model (NTIRE metrics at 256×256 LR)",
        "",
        _row("params", "FLOPs", "activations", "convs (PyTorch)", "convs (ONNX)"),
        _row(*["---"] * 5),
        _row(
            f"{mt['params']:,}",
            f"{mt['flops_256'] / 1e9:.2f} G",
            f"{mt['activations_256'] / 1e6:.2f} M",
            mt["convs"],
            mt["onnx_convs"],
        ),
        "",
        "## Passes",
        "",
    ]
    if m["passes"]:
        lines += [_row("pass", "modified", "convs", "params", "max abs error"), _row(*["---"] * 5)]
        for p in m["passes"]:
            lines.append(
                _row(
                    p["name"],
                    p["modified"],
                    f"{p['convs_before']} → {p['convs_after']}",
                    f"{p['params_before']} → {p['params_after']}",
                    f"{p['max_abs_error']:.2g}",
                )
            )
    else:
        lines.append("No graph passes were applied.")
    lines += _precision_lines(m.get("precision_onnx"))
    ex = m["export"]
    lines += [
        "",
        "## Export",
        "",
        f"- exporter: {ex['exporter']}, opset {ex['opset']}, simplified: {ex['simplified']}",
        f"- smallest accepted LR input: {ex['input_range']['min_hw'][0]}×"
        f"{ex['input_range']['min_hw'][1]}; profile opt {m['profile']['opt']}, "
        f"max {m['profile']['max']}",
        f"- ONNX vs PyTorch max abs error: {ex['max_abs_error']:.3g} × data range",
        f"- checkpoint: `{m['checkpoint']['path']}` (sha256 {m['checkpoint']['sha256'][:16]}…)",
        f"- device: {m['engine']['device'].get('model', m['engine']['device'].get('kind'))}",
        "",
    ]
    return "\n".join(lines)


def _precision_lines(p: Mapping[str, Any] | None) -> list[str]:
    """What the fp16/int8 ONNX is: calibration, and what stayed in higher precision and why."""
    if not p:
        return []
    cal = p["calibration"]
    method = f", thresholds: {cal['method']}" if cal.get("method") else ""
    lines = [
        "",
        f"## Precision: {p['precision']} (`{p['onnx']}`)",
        "",
        f"- calibration: {cal['images']} images from {cal['source']}{method}"
        f" (statistics {'read from the cache' if cal['from_cache'] else 'measured'})",
    ]
    if p["precision"] == "fp16":
        kept = p["fp16"]["kept_float32"]
        lines.append(
            f"- largest |x| of a float16 tensor on the validation images: "
            f"{p['fp16_max_abs_on_validation']:.4g} (`{p['fp16_max_abs_tensor']}`)"
        )
        lines.append(f"- ops kept in float32: {len(kept) or 'none'}")
        lines += [f"  - `{k['node']}` ({k['op_type']}): {k['reason']}" for k in kept]
    else:
        lines.append(f"- activations: {p['activations']}; weights: {p['weights']}")
        search = p.get("search")
        kept = search["kept_float"] if search else []
        forced = p.get("kept_float_by_user", [])
        lines.append(
            f"- kept in float by the sensitivity search: {len(kept) or 'none'}"
            + (f"; by --keep-float: {', '.join(forced)}" if forced else "")
        )
        lines += [f"  - `{k['node']}` (error removed: {k['mse_gain']:.3g})" for k in kept]
        if search:
            lines.append("- search steps (layers in float → result):")
            lines += [
                f"  - {s['kept_float']}: {'pass' if s['passed'] else 'fail'} ({s['detail']})"
                for s in search["steps"]
            ]
    return lines


def write_report(path: Path, manifest: Mapping[str, Any]) -> None:
    path.write_text(render_report(manifest), encoding="utf-8")
