"""Rich tables the commands print: a compile's validation summary, latency and stage times,
``inspect``'s key/value view, ``targets`` and ``bench``. Rendering only: every value comes
from a manifest, a report or a probe, and nothing here decides anything."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from esr_deploy.backends.base import Availability
    from esr_deploy.gate.report import BenchReport
    from esr_deploy.targets import Target


def summary_table(manifest: Mapping[str, Any], bundle: Path) -> Table:
    """One row per validation set: reference and engine PSNR-Y, the drop, parity, verdict."""
    table = Table(title=f"{manifest['name']} → {manifest['target']}  ({bundle})")
    for col in ("set", "images", "ref PSNR-Y", "engine PSNR-Y", "drop", "min parity", "ok"):
        table.add_column(col, justify="right" if col != "set" else "left")
    for name, v in manifest["validation"].items():
        table.add_row(
            name,
            str(v["images"]),
            f"{v['reference_psnr_y']:.4f}",
            f"{v['engine_psnr_y']:.4f}",
            f"{v['psnr_drop']:+.4f}",
            f"{v['parity_min_psnr']:.1f} dB",
            "yes" if v["passed"] else "NO",
        )
    return table


def latency_table(manifest: Mapping[str, Any]) -> Table:
    table = Table(title="latency (ms)")
    for col in ("input", "median", "p10", "p90", "runs"):
        table.add_column(col, justify="right")
    for shape, lat in manifest.get("latency_ms", {}).items():
        table.add_row(
            shape,
            f"{lat['median']:.2f}",
            f"{lat['p10']:.2f}",
            f"{lat['p90']:.2f}",
            str(lat["runs"]),
        )
    return table


def profile_table(seconds: Mapping[str, float]) -> Table:
    """``compile --profile``: wall seconds per compile stage, in the order the pipeline
    recorded them, with each stage's share of the total (``total`` is the last row; when the
    manifest has none, the stages' sum)."""
    stages = {k: float(v) for k, v in seconds.items() if k != "total"}
    total = float(seconds.get("total", sum(stages.values())))
    table = Table(title="compile stages (wall time)")
    for col in ("stage", "seconds", "share"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage, value in stages.items():
        share = f"{value / total:.0%}" if total > 0 else "-"
        table.add_row(stage, f"{value:.2f}", share)
    table.add_row("total", f"{total:.2f}", "100%" if total > 0 else "-", style="bold")
    return table


def _cell(key: str, value: Any) -> str:
    """One inspect value as text: pass plans one line per pass, the rest as JSON."""
    if isinstance(value, str):
        return value
    if key == "passes" and isinstance(value, list):
        lines = []
        for p in value:
            verb = "would fold" if p["would_modify"] else "nothing to do"
            lines.append(f"{p['name']}: {verb}; convs {p['convs']}, params {p['params']}")
            lines += [f"  {d}" for d in p["details"]]
        return "\n".join(lines)
    return json.dumps(value, ensure_ascii=False)


def info_table(title: str, info: Mapping[str, Any]) -> Table:
    """``inspect``: one row per key, values as text (escaped: they come from the file)."""
    table = Table(title=escape(title), show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        table.add_row(key, escape(_cell(key, value)))
    return table


def targets_table(rows: Sequence[tuple[Target, Availability]]) -> Table:
    table = Table(title="targets")
    for col in ("target", "available", "description / why not"):
        table.add_column(col)
    for t, a in rows:
        table.add_row(
            t.name,
            "[green]yes[/]" if a.ok else "[red]no[/]",
            escape(t.description if a.ok else a.reason),
        )
    return table


def bench_table(report: BenchReport) -> Table:
    """The candidate's timing, and the reference's (measured or recorded) below it."""
    kind = "interleaved rounds" if report.reference_kind == "bundle" else "runs"
    table = Table(title=f"latency at {report.input_key} (ms), {report.runs} {kind}")
    for col in ("", "engine", "median", "p10", "p90", "runs"):
        table.add_column(col, justify="left" if col in ("", "engine") else "right")
    for side in [report.candidate] + ([report.reference] if report.reference else []):
        role = side.role if side.measured else f"{side.role} (recorded)"
        table.add_row(
            role,
            escape(f"{side.name} ({side.target})"),
            f"{side.stats.median_ms:.2f}",
            f"{side.stats.p10_ms:.2f}",
            f"{side.stats.p90_ms:.2f}",
            str(side.stats.runs),
        )
    return table
