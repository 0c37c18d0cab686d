"""``report.md`` and ``report.html``: the human-readable summary of a bundle, from its manifest.

Both are pure functions of the manifest, so ``esr-deploy validate`` and ``compile`` render
the same thing and a reviewer can trust that the numbers are the manifest's. The report is
first built as a list of sections (tables, paragraphs, bullet lists, figures) and then
written as Markdown or as HTML; the pictures are PNGs beside the report, drawn at compile
time by :mod:`esr_deploy.validate.figures` and listed in ``manifest["report_figures"]``
(file, kind, image, caption). The HTML is self-contained apart from those PNGs (relative
``<img src>``), with a little inline CSS; every text from the manifest is escaped.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from esr_deploy.runtime.manifest import Auto, Manifest

#: The HTML report beside ``report.md`` (:func:`write_report` writes both).
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Text:
    """A paragraph; text between backticks is code."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A list; each item is (indent level, text)."""

    items: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Figure:
    file: str
    alt: str
    caption: str


Block = Table | Text | Bullets | Figure


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...]


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    return Table(tuple(header), tuple(tuple(str(c) for c in r) for r in rows))


def report_sections(m: Manifest) -> tuple[str, list[Section]]:
    """The report's title and its sections, from the manifest."""
    title = f"{m.name} — {m.target}"
    figures = m.report_figures
    intro = Text(
        f"Built by esr-deploy {m.esr_deploy_version} on {m.created} with "
        f"{m.backend} {m.engine.backend_version} (x{m.scale}, input range 0..{m.data_range:g},"
        f" {m.color_order}, {m.layout})."
    )
    sections = [Section("", (intro,)), _validation(m, figures)]
    if m.auto is not None:
        sections.append(_auto(m.auto, figures))
    sections += [_latency(m), _model(m), _passes(m)]
    if m.precision_onnx is not None:  # its details are the precision step's own tables
        precision = _precision(m["precision_onnx"])
        sections += [precision] if precision is not None else []
    sections.append(_export(m))
    return title, sections


def _figure(f: Mapping[str, Any]) -> Figure:
    alt = f"{f['kind']} {f['image']}" if f.get("image") else str(f["kind"])
    return Figure(str(f["file"]), alt, str(f["caption"]))


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _validation(m: Manifest, figures: Sequence[Mapping[str, Any]]) -> Section:
    rows = [
        (
            name,
            "—" if v.images is None else v.images,
            _number(v.reference_psnr_y, 4),
            _number(v.engine_psnr_y, 4),
            _number(v.psnr_drop, 4),
            _number(v.reference_ssim_y, 4),
            _number(v.engine_ssim_y, 4),
            _number(v.parity_min_psnr, 2),
            "yes" if v.passed else "NO",
        )
        for name, v in m.validation.items()
    ]
    header = (
        "set",
        "images",
        "reference PSNR-Y",
        "engine PSNR-Y",
        "drop (dB)",
        "reference SSIM-Y",
        "engine SSIM-Y",
        "min parity PSNR",
        "passed",
    )
    blocks: list[Block] = [_table(header, rows)]
    blocks += [_figure(f) for f in figures if f["kind"] in ("comparison", "difference")]
    return Section("Validation", tuple(blocks))


def _auto(auto: Auto, figures: Sequence[Mapping[str, Any]]) -> Section:
    rows = []
    for c in auto.candidates:
        if not c.get("available"):
            status, note = "not available", c.get("reason", "")
        elif not c.get("passed"):
            status, note = "failed", c.get("failure", "")
        else:
            status, note = ("chosen" if c["target"] == auto.chosen else "passed"), ""
        median = f"{c['median_ms']:.2f}" if c.get("median_ms") is not None else "—"
        drop = f"{c['psnr_drop']:.4f}" if c.get("psnr_drop") is not None else "—"
        rows.append((c["target"], status, median, drop, note))
    blocks: list[Block] = [
        Text(
            f"Chosen: `{auto.chosen}` — {auto.reason}. PSNR-Y drop budget for every "
            f"candidate: {auto.max_psnr_drop:g} dB."
        ),
        _table(("target", "result", "median (ms)", "worst PSNR-Y drop (dB)", "note"), rows),
    ]
    blocks += [_figure(f) for f in figures if f["kind"] == "targets"]
    return Section("Target selection (--target auto)", tuple(blocks))


def _latency(m: Manifest) -> Section:
    rows = [
        (shape, _number(lat.median, 2), _number(lat.p10, 2), _number(lat.p90, 2),
         "—" if lat.runs is None else lat.runs)
        for shape, lat in m.latency_ms.items()
    ]  # fmt: skip
    return Section("Latency (ms)", (_table(("input", "median", "p10", "p90", "runs"), rows),))


def _model(m: Manifest) -> Section:
    mt = m.metrics
    row = (
        f"{mt['params']:,}",
        f"{mt['flops_256'] / 1e9:.2f} G",
        f"{mt['activations_256'] / 1e6:.2f} M",
        mt["convs"],
        mt["onnx_convs"],
    )
    header = ("params", "FLOPs", "activations", "convs (PyTorch)", "convs (ONNX)")
    return Section("Model (NTIRE metrics at 256×256 LR)", (_table(header, [row]),))


def _passes(m: Manifest) -> Section:
    if not m.passes:
        return Section("Passes", (Text("No graph passes were applied."),))
    rows = [
        (
            p["name"],
            p["modified"],
            f"{p['convs_before']} → {p['convs_after']}",
            f"{p['params_before']} → {p['params_after']}",
            f"{p['max_abs_error']:.2g}",
        )
        for p in m.passes
    ]
    header = ("pass", "modified", "convs", "params", "max abs error")
    return Section("Passes", (_table(header, rows),))


def _precision(p: Mapping[str, Any]) -> Section | None:
    """What the fp16/int8 ONNX is: calibration, and what stayed in higher precision and why."""
    if not p:
        return None
    cal = p["calibration"]
    method = f", thresholds: {cal['method']}" if cal.get("method") else ""
    items = [
        (
            0,
            f"calibration: {cal['images']} images from {cal['source']}{method}"
            f" (statistics {'read from the cache' if cal['from_cache'] else 'measured'})",
        )
    ]
    if p["precision"] in ("fp16", "bf16"):
        # the fp16 ONNX, or a torch graph with the same rules (AOTInductor: "low_precision")
        torch_graph = "low_precision" in p
        kept = (p["low_precision"] if torch_graph else p["fp16"])["kept_float32"]
        prefix = "" if torch_graph else "fp16_"
        items.append(
            (
                0,
                f"largest |x| of a {p['precision']} tensor on the validation images: "
                f"{p[prefix + 'max_abs_on_validation']:.4g} (`{p[prefix + 'max_abs_tensor']}`)",
            )
        )
        items.append((0, f"ops kept in float32: {len(kept) or 'none'}"))
        items += [(1, f"`{k['node']}` ({k['op_type']}): {k['reason']}") for k in kept]
    else:
        items.append((0, f"activations: {p['activations']}; weights: {p['weights']}"))
        search = p.get("search")
        kept = search["kept_float"] if search else []
        forced = p.get("kept_float_by_user", [])
        items.append(
            (
                0,
                f"kept in float by the sensitivity search: {len(kept) or 'none'}"
                + (f"; by --keep-float: {', '.join(forced)}" if forced else ""),
            )
        )
        items += [(1, f"`{k['node']}` (error removed: {k['mse_gain']:.3g})") for k in kept]
        if search:
            items.append((0, "search steps (layers in float → result):"))
            items += [
                (1, f"{s['kept_float']}: {'pass' if s['passed'] else 'fail'} ({s['detail']})")
                for s in search["steps"]
            ]
    source = p["onnx"] if "onnx" in p else "torch.export graph"
    return Section(f"Precision: {p['precision']} (`{source}`)", (Bullets(tuple(items)),))


def _export(m: Manifest) -> Section:
    ex, device, checkpoint = m.export, m.engine.device, m.checkpoint
    error = "—" if ex.max_abs_error is None else f"{ex.max_abs_error:.3g}"
    items = (
        f"exporter: {ex.exporter}, opset {ex.opset}, simplified: {ex.simplified}",
        f"smallest accepted LR input: {ex.min_hw[0]}×{ex.min_hw[1]}; profile opt "
        f"{_hw(m.profile.opt)}, max {_hw(m.profile.max)}",
        f"ONNX vs PyTorch max abs error: {error} × data range",
        f"checkpoint: `{checkpoint.path}` (sha256 {(checkpoint.sha256 or '?')[:16]}…)",
        f"device: {device.get('model', device.get('kind'))}",
    )
    return Section("Export", (Bullets(tuple((0, i) for i in items)),))


# ------------------------------------------------------------------------------ Markdown


def _md_cell(text: str) -> str:
    """A table cell shown literally: no column break, no HTML tag from the manifest."""
    return text.replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def _md_plain(text: str) -> str:
    """``text`` shown literally in Markdown (captions and alt texts)."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text.replace("\n", " "))


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Table):
        return [
            _md_row(block.header),
            _md_row(["---"] * len(block.header)),
            *(_md_row(r) for r in block.rows),
        ]
    if isinstance(block, Text):
        return [block.text]
    if isinstance(block, Bullets):
        return [f"{'  ' * level}- {text}" for level, text in block.items]
    return [f"![{_md_plain(block.alt)}]({quote(block.file)})", "", f"*{_md_plain(block.caption)}*"]


def _hw(hw: tuple[int, int] | None) -> str:
    """An H×W pair as the manifest's JSON shows it (``[256, 256]``)."""
    return str(list(hw)) if hw is not None else "None"


def render_report(manifest: Manifest) -> str:
    """``report.md``."""
    title, sections = report_sections(manifest)
    lines = [f"# {title}", ""]
    for section in sections:
        if section.title:
            lines += [f"## {section.title}", ""]
        for block in section.blocks:
            lines += [*_md_block(block), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1500px; margin: 1.5em auto; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } th:first-child, td:first-child { text-align: left; }
td.no { color: #b00020; font-weight: bold; }
code { background: #f2f2f2; padding: 0 0.2em; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; max-width: 75em; }
img { max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #eee; }
""".strip()

_FAILED_CELLS = frozenset({"NO", "failed"})


def _html_text(text: str) -> str:
    """Escaped ``text`` with backtick spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_block(block: Block) -> list[str]:
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
        out = ["<table>", f"<tr>{head}</tr>"]
        for row in block.rows:
            cells = "".join(
                f'<td class="no">{html.escape(c)}</td>'
                if c in _FAILED_CELLS
                else f"<td>{html.escape(c)}</td>"
                for c in row
            )
            out.append(f"<tr>{cells}</tr>")
        return [*out, "</table>"]
    if isinstance(block, Text):
        return [f"<p>{_html_text(block.text)}</p>"]
    if isinstance(block, Bullets):
        out, level = [], -1
        for depth, text in block.items:
            while level < depth:
                out.append("<ul>")
                level += 1
            while level > depth:
                out.append("</ul>")
                level -= 1
            out.append(f"<li>{_html_text(text)}</li>")
        return out + ["</ul>"] * (level + 1)
    src = html.escape(quote(block.file), quote=True)
    return [
        "<figure>",
        f'<img src="{src}" alt="{html.escape(block.alt, quote=True)}">',
        f"<figcaption>{html.escape(block.caption)}</figcaption>",
        "</figure>",
    ]


def render_html(manifest: Manifest) -> str:
    """``report.html``: the same sections as :func:`render_report`, with the pictures."""
    title, sections = report_sections(manifest)
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        if section.title:
            lines.append(f"<h2>{_html_text(section.title)}</h2>")
        for block in section.blocks:
            lines += _html_block(block)
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


def write_report(path: Path, manifest: Mapping[str, Any]) -> None:
    """``report.md`` at ``path`` and ``report.html`` beside it, from the manifest compile is
    about to write (read as the runtime will: :meth:`Manifest.built`); its ``files`` are
    listed afterwards, the report being one of them."""
    checked = Manifest.built({"files": {}, **manifest}, "the manifest being written")
    path.write_text(render_report(checked), encoding="utf-8")
    path.with_suffix(".html").write_text(render_html(checked), encoding="utf-8")
