"""The bundle report: ``report.md`` / ``report.html`` rendered from the manifest, and the PNGs
beside them (:mod:`esr_deploy.validate.figures`).

- rendering: tables in both formats, escaping, figures linked, auto candidates, an old
  manifest without figures;
- figures on real Set5 images with a fake engine that differs from the reference in a known
  16×16 region: the heat map is bright there and dark elsewhere, the panels are the crops
  they claim to be, the caption states the gain and the maximum difference;
- the targets chart: a failed and an unavailable candidate are listed, not plotted;
- end to end: a small user network compiled to a bundle (and through ``--target auto``)
  holds report.html and every picture its reports link, checksummed in the manifest.
"""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from user_models import tiny_source

from esr_deploy.bundle import MANIFEST, REPORT
from esr_deploy.compiling.options import CompileOptions, CompileResult
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.data import ImagePair, imresize, load_validation_set
from esr_deploy.paths import default_val_dir
from esr_deploy.recipe import Recipe
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.runtime.manifest import Manifest
from esr_deploy.targets import availability, get_target
from esr_deploy.validate.auto_chart import LATENCY_BAR, targets_figure
from esr_deploy.validate.drawing import PAD
from esr_deploy.validate.figures import (
    COMPARISON_IMAGES,
    HEAT_LUT,
    PANEL,
    bicubic_crop,
    comparison_figures,
    detail_crop,
    difference_gain,
)
from esr_deploy.validate.report import REPORT_HTML, render_html, render_report, write_report

SCALE = 4
DATA_RANGE = 255.0
RECIPE = Recipe(name="fake", arch="fake:Fake", scale=SCALE, data_range=DATA_RANGE)
#: The fake engine's error: DELTA (0..255 units) on a REGION×REGION HR block, NOISE elsewhere.
DELTA, NOISE, REGION = 3.0, 0.01, 24


# ----------------------------------------------------------------------------- helpers


def _luma(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(pixels, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


class _Images(HTMLParser):
    """The ``src`` of every ``<img>`` and the cell texts of every table."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Images:
    parser = _Images()
    parser.feed(text)
    parser.close()
    return parser


def _md_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def _manifest(**extra: Any) -> Manifest:
    """A manifest as ``build_manifest`` writes it (the keys the report reads)."""
    m: dict[str, Any] = {
        "schema_version": 1,
        "name": "rlfn_x4",
        "target": "ort-fp32",
        "precision": "fp32",
        "backend": "onnxruntime",
        "backend_version": "1.31.1",
        "scale": 4,
        "data_range": 255.0,
        "color_order": "RGB",
        "layout": "NCHW",
        "profile": {"min": [15, 15], "opt": [256, 256], "max": [1080, 1920]},
        "checkpoint": {"path": "/ckpt/rlfn_x4.pth", "sha256": "8c7edb57dfc89048" + "0" * 48},
        "engine": {
            "file": "engine.onnx",
            "backend_version": "1.31.1",
            "device": {"kind": "cpu", "model": "AMD EPYC"},
            "settings": {},
        },
        "inputs": [{"name": "lr", "dtype": "float32", "shape": ["N", 3, "H", "W"]}],
        "outputs": [{"name": "sr", "dtype": "float32", "shape": ["N", 3, "H*4", "W*4"]}],
        "reference_onnx": "model.fp32.onnx",
        "files": {},
        "export": {
            "exporter": "torch.export (dynamo)",
            "opset": 18,
            "simplified": True,
            "input_range": {"min_hw": [15, 15]},
            "max_abs_error": 1.04e-06,
        },
        "passes": [
            {
                "name": "fold-bn",
                "modified": True,
                "convs_before": 40,
                "convs_after": 33,
                "params_before": 1200,
                "params_after": 1100,
                "max_abs_error": 2.5e-07,
            },
        ],  # fmt: skip
        "metrics": {
            "params": 543740,
            "flops_256": 33992788992,
            "activations_256": 126490304,
            "convs": 57,
            "onnx_convs": 57,
        },  # fmt: skip
        "validation": {
            "<script>alert(1)</script> & co": {
                "images": 3,
                "reference_psnr_y": 32.3345,
                "engine_psnr_y": 32.3344,
                "psnr_drop": 0.0001,
                "reference_ssim_y": 0.8869,
                "engine_ssim_y": 0.8869,
                "parity_min_psnr": 138.04,
                "passed": True,
            },
        },  # fmt: skip
        "latency_ms": {"1x3x256x256": {"median": 593.76, "p10": 577.71, "p90": 627.57, "runs": 10}},
        "esr_deploy_version": "0.1.0",
        "created": "2026-11-22T01:08:21+00:00",
    }
    m.update(extra)
    return Manifest.from_json(m)


FIGURES = [
    {"file": "compare-1-bird.png", "kind": "comparison", "image": "bird",
     "caption": "bird: crops <b>bold</b> & more"},
    {"file": "difference-1-bird.png", "kind": "difference", "image": "bird",
     "caption": "|engine − reference| amplified ×2,200,000; max 0.000191"},
]  # fmt: skip

AUTO: dict[str, Any] = {
    "chosen": "ov-fp32",
    "reason": "fastest at 1x3x64x64 of the targets that passed validation",
    "max_psnr_drop": 0.02,
    "candidates": [
        {"target": "ort-int8", "available": True, "passed": False,
         "failure": "Validation of m on ort-int8 failed — set5_crops: PSNR-Y drop 0.6503 dB > "
                    "allowed 0.0200 dB (reference 32.3345, engine 31.6842) — nothing was written"},
        {"target": "ov-fp32", "available": True, "passed": True, "median_ms": 81.559,
         "psnr_drop": 0.0},
        {"target": "ort-fp32", "available": True, "passed": True, "median_ms": 99.259,
         "psnr_drop": 0.0003},
        {"target": "trt-fp16", "available": False, "reason": "no NVIDIA GPU"},
    ],
}  # fmt: skip


# ----------------------------------------------------------------------------- rendering


def test_markdown_and_html_have_the_same_summary_and_passes_tables() -> None:
    m = _manifest()
    md, page = render_report(m), render_html(m)
    assert "| 1x3x256x256 | 593.76 | 577.71 | 627.57 | 10 |" in md
    assert "| fold-bn | True | 40 → 33 | 1200 → 1100 | 2.5e-07 |" in md
    assert "| 543,740 | 33.99 G | 126.49 M | 57 | 57 |" in md
    tables = _parse(page).tables
    validation, latency, model, passes = tables
    assert validation[0][:4] == ["set", "images", "reference PSNR-Y", "engine PSNR-Y"]
    assert validation[1] == [
        "<script>alert(1)</script> & co", "3", "32.3345", "32.3344", "0.0001", "0.8869",
        "0.8869", "138.04", "yes",
    ]  # fmt: skip
    assert latency[1] == ["1x3x256x256", "593.76", "577.71", "627.57", "10"]
    assert model[1] == ["543,740", "33.99 G", "126.49 M", "57", "57"]
    assert passes == [
        ["pass", "modified", "convs", "params", "max abs error"],
        ["fold-bn", "True", "40 → 33", "1200 → 1100", "2.5e-07"],
    ]
    # every table row of the Markdown is a row of the HTML
    md_rows = [
        [
            c.strip().replace("\\|", "|").replace("\\<", "<")
            for c in re.split(r"(?<!\\)\|", line)[1:-1]
        ]
        for line in md.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert md_rows == [row for t in tables for row in t]


def test_html_escapes_the_manifest_text_and_links_the_figures() -> None:
    page = render_html(_manifest(report_figures=FIGURES))
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "crops &lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<style>" in page and "http" not in page  # nothing fetched from elsewhere
    assert _parse(page).sources == ["compare-1-bird.png", "difference-1-bird.png"]
    assert "×2,200,000" in page and "0.000191" in page
    md = render_report(_manifest(report_figures=FIGURES))
    assert _md_links(md) == ["compare-1-bird.png", "difference-1-bird.png"]
    assert "crops \\<b\\>bold\\</b\\>" in md  # shown literally, not as markup


def test_a_figure_file_name_cannot_leave_the_bundle_folder_or_break_the_markup() -> None:
    odd = [{"file": 'x" onerror="alert(1).png', "kind": "comparison", "image": "x",
            "caption": "c"}]  # fmt: skip
    page = render_html(_manifest(report_figures=odd))
    (src,) = _parse(page).sources
    assert '"' not in src and " " not in src and "onerror=" not in page
    md = render_report(_manifest(report_figures=odd))
    assert " " not in _md_links(md)[0]


def test_manifest_without_figures_renders_without_pictures() -> None:
    m = _manifest()  # an older bundle, or validate's re-render
    assert "report_figures" not in m
    assert _parse(render_html(m)).sources == [] and _md_links(render_report(m)) == []


def test_auto_candidates_are_listed_with_the_failure_and_the_figure() -> None:
    targets = {"file": "targets.png", "kind": "targets", "image": None, "caption": "chart"}
    m = _manifest(auto=AUTO, report_figures=[*FIGURES, targets])
    md, page = render_report(m), render_html(m)
    assert "## Target selection (--target auto)" in md
    assert "| ov-fp32 | chosen | 81.56 | 0.0000 |  |" in md
    assert "| trt-fp16 | not available | — | — | no NVIDIA GPU |" in md
    (row,) = [line for line in md.splitlines() if line.startswith("| ort-int8 ")]
    assert "| failed | — | — |" in row and "PSNR-Y drop 0.6503 dB" in row
    assert _md_links(md)[-1] == "targets.png" and _parse(page).sources[-1] == "targets.png"
    auto_table = _parse(page).tables[1]
    assert [r[:2] for r in auto_table[1:]] == [
        ["ort-int8", "failed"], ["ov-fp32", "chosen"], ["ort-fp32", "passed"],
        ["trt-fp16", "not available"],
    ]  # fmt: skip
    assert '<td class="no">failed</td>' in page


def test_write_report_writes_markdown_and_html(tmp_path: Path) -> None:
    m = _manifest(report_figures=FIGURES)
    write_report(tmp_path / REPORT, m)
    assert (tmp_path / REPORT).read_text(encoding="utf-8") == render_report(m)
    assert (tmp_path / REPORT_HTML).read_text(encoding="utf-8") == render_html(m)


# ----------------------------------------------------------------------------- figures


def test_detail_crop_is_the_textured_region_on_the_lr_grid() -> None:
    hr = np.full((96, 128, 3), 120, dtype=np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    hr[40:72, 84:116] = (((yy + xx) % 2) * 255)[..., None].astype(np.uint8)  # a checkerboard
    y, x, h, w = detail_crop(hr, SCALE, size=32)
    assert (h, w) == (32, 32) and y % SCALE == 0 and x % SCALE == 0
    assert (y, x) == (40, 84)
    # a small image gives a smaller crop, still on the grid
    assert detail_crop(hr[:24, :40], SCALE, size=64)[2:] == (24, 40)


def test_bicubic_crop_is_the_crop_of_the_whole_upscaled_image(sr_data_dir: Path) -> None:
    pair = load_validation_set(sr_data_dir / "Set5", SCALE).pairs[1]  # bird
    whole = imresize(pair.lr, SCALE)
    for box in [detail_crop(pair.hr, SCALE), (0, 0, 64, 64), (224, 224, 64, 64), (8, 100, 32, 48)]:
        y, x, h, w = box
        np.testing.assert_array_equal(
            bicubic_crop(pair.lr, SCALE, box), whole[y : y + h, x : x + w]
        )


def test_difference_gain_maps_the_percentile_near_full_scale() -> None:
    gen = np.random.default_rng(0)
    diff = gen.random((200, 300)) * 0.004
    gain = difference_gain(diff)
    p = float(np.percentile(diff, 99.9))
    assert 0.9 * 255 <= gain * p <= 255
    assert float(f"{gain:.2g}") == gain  # two significant digits
    assert difference_gain(np.zeros((4, 4))) == 1.0
    sparse = np.zeros((100, 100))
    sparse[0, 0] = 5.0  # the percentile is 0: the maximum maps to full scale
    assert difference_gain(sparse) == 51.0


def _reference(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=SCALE, mode="bicubic", align_corners=False)


def _fake_engine(region: dict[tuple[int, int], tuple[int, int]]) -> Any:
    """The reference plus DELTA on a REGION×REGION HR block (per image, found by its size;
    at least 0.1 % of the pixels, so that it is the 99.9th percentile) and a NOISE-sized
    ripple elsewhere."""

    def run(x: np.ndarray) -> np.ndarray:
        out = _reference(torch.from_numpy(x)).numpy().copy()
        h, w = out.shape[2:]
        ripple = NOISE * np.cos(np.arange(h * w).reshape(h, w))
        out += (ripple * DATA_RANGE / 255.0).astype(np.float32)
        y, x0 = region[(h, w)]
        out[:, :, y : y + REGION, x0 : x0 + REGION] += DELTA * DATA_RANGE / 255.0
        return out

    return run


@pytest.fixture(scope="module")
def set5_pairs(sr_data_dir: Path) -> list[ImagePair]:
    """The first two Set5 images, with the LR clamped away from 0 and 255 so that the fake
    engine's offset is not clipped by the output range."""
    pairs = load_validation_set(sr_data_dir / "Set5", SCALE).pairs[:COMPARISON_IMAGES]
    return [ImagePair(p.name, np.clip(p.lr, 20, 230).astype(np.uint8), p.hr) for p in pairs]


@pytest.fixture(scope="module")
def drawn(
    set5_pairs: list[ImagePair], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, Any]], dict[str, tuple[int, int]]]:
    out = tmp_path_factory.mktemp("figures")
    region = {}  # image name: top left of the block, in the middle of the crop shown
    for p in set5_pairs:
        y, x, h, w = detail_crop(p.hr, SCALE)
        region[p.name] = (y + (h - REGION) // 2, x + (w - REGION) // 2)
    by_size = {p.hr.shape[:2]: region[p.name] for p in set5_pairs}
    records = comparison_figures(
        out, set5_pairs, _reference, _fake_engine(by_size), RECIPE, "engine (fake)", "Set5"
    )
    return out, records, region


def test_comparison_shows_four_labelled_crops(
    drawn: tuple[Path, list[dict[str, Any]], dict[str, Any]], set5_pairs: list[ImagePair]
) -> None:
    out, records, _ = drawn
    assert [(r["kind"], r["image"]) for r in records] == [
        ("comparison", "baby"), ("difference", "baby"),
        ("comparison", "bird"), ("difference", "bird"),
    ]  # fmt: skip
    for pair, record in zip(set5_pairs, records[::2], strict=True):
        crop = record["crop"]
        y, x, h, w = crop["y"], crop["x"], crop["height"], crop["width"]
        assert (y, x, h, w) == detail_crop(pair.hr, SCALE) and (h, w) == (64, 64)
        zoom = record["zoom"]
        assert zoom == PANEL // 64 == 4
        labels = [p["label"] for p in record["panels"]]
        assert labels == ["bicubic (LR x4)", "PyTorch reference", "engine (fake)", "HR"]
        boxes = [p["box"] for p in record["panels"]]
        assert [(b[2] - b[0], b[3] - b[1]) for b in boxes] == [(w * zoom, h * zoom)] * 4
        assert all(b[0] + w * zoom + PAD == n[0] for b, n in zip(boxes, boxes[1:], strict=False))
        img = np.asarray(Image.open(out / record["file"]).convert("RGB"))
        assert img.shape[1] == boxes[-1][2] + PAD
        assert img.shape[0] > boxes[0][3]

        def panel(i: int, img: np.ndarray = img, boxes: list[list[int]] = boxes) -> np.ndarray:
            x0, y0, x1, y1 = boxes[i]
            return img[y0:y1, x0:x1]

        def big(a: np.ndarray, zoom: int = zoom) -> np.ndarray:
            return np.repeat(np.repeat(a, zoom, axis=0), zoom, axis=1)

        np.testing.assert_array_equal(panel(0), big(bicubic_crop(pair.lr, SCALE, (y, x, h, w))))
        np.testing.assert_array_equal(panel(3), big(pair.hr[y : y + h, x : x + w]))
        # the engine panel carries the fake offset that the reference panel does not
        assert panel(2).astype(int).sum() > panel(1).astype(int).sum()
        assert f"{w}×{h} HR crop at x={x}, y={y}" in record["caption"]
        assert f"enlarged ×{zoom}" in record["caption"]


def test_difference_heat_map_is_bright_where_the_engine_differs_and_dark_elsewhere(
    drawn: tuple[Path, list[dict[str, Any]], dict[str, Any]],
) -> None:
    out, records, region = drawn
    for record in records[1::2]:
        crop, zoom = record["crop"], record["zoom"]
        gain = record["gain"]
        assert 0.9 * 255 <= gain * DELTA <= 255  # the 99.9th percentile is the offset
        assert record["max_abs_difference"] == pytest.approx(DELTA + NOISE, abs=2e-3)
        assert record["full_scale"] == pytest.approx(255 / gain)
        assert f"×{gain:g}" in record["caption"]
        assert f"{record['max_abs_difference']:.3g}" in record["caption"]
        assert "0..255 units" in record["caption"] and "≥" in record["caption"]
        img = np.asarray(Image.open(out / record["file"]).convert("RGB"))
        x0, y0, x1, y1 = record["panels"][0]["box"]
        heat = _luma(img[y0:y1, x0:x1])
        assert heat.shape == (crop["height"] * zoom, crop["width"] * zoom)
        ry, rx = region[record["image"]]
        ry, rx = (ry - crop["y"]) * zoom, (rx - crop["x"]) * zoom
        inside = np.zeros(heat.shape, dtype=bool)
        inside[ry : ry + REGION * zoom, rx : rx + REGION * zoom] = True
        assert heat[inside].min() > 200  # near full scale: the top of the colour map
        assert np.percentile(heat[~inside], 99) < 15  # the ripple: near black
        assert _luma(HEAT_LUT[-1]) > 200 and _luma(HEAT_LUT[0]) < 5
        # the whole-image panel shows the same block, and the colour bar is in the picture
        x0, y0, x1, y1 = record["panels"][1]["box"]
        overview = _luma(img[y0:y1, x0:x1])
        assert PANEL // 2 < max(overview.shape) <= PANEL
        assert 0 < (overview > 200).mean() < 0.03
        below = img[record["panels"][0]["box"][3] :]
        assert any(np.all(row[PAD] == HEAT_LUT[0]) for row in below)  # the colour bar


# ----------------------------------------------------------------------------- targets


def _bars(img: np.ndarray) -> list[int]:
    """Lengths of the latency bars: runs of rows holding the bar colour, their width."""
    mask = np.all(img == np.array(LATENCY_BAR, dtype=np.uint8), axis=2)
    rows = mask.any(axis=1)
    lengths, start = [], None
    for i, on in enumerate([*rows, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            lengths.append(int(mask[start:i].sum(axis=1).max()))
            start = None
    return lengths


def test_targets_figure_plots_the_passed_and_lists_the_failed(tmp_path: Path) -> None:
    record = targets_figure(
        tmp_path, AUTO["candidates"], chosen="ov-fp32", max_psnr_drop=0.02,
        latency_label="median latency at 1x3x64x64 (ms)",
    )  # fmt: skip
    assert record is not None
    assert record["kind"] == "targets" and record["image"] is None
    assert record["targets"] == ["ort-int8", "ov-fp32", "ort-fp32", "trt-fp16"]
    caption = record["caption"]
    assert "ort-int8: failed (set5_crops: PSNR-Y drop 0.6503 dB" in caption
    assert "trt-fp16: not available here (no NVIDIA GPU)" in caption
    assert "ov-fp32: 81.6 ms, PSNR-Y drop 0.0000 dB" in caption
    assert "chosen: ov-fp32" in caption and "0.02 dB" in caption
    img = np.asarray(Image.open(tmp_path / record["file"]).convert("RGB"))
    bars = _bars(img)
    assert len(bars) == 2  # only the two that passed have a latency bar
    assert bars[1] / bars[0] == pytest.approx(99.259 / 81.559, rel=0.03)
    failed_ink = np.all(np.abs(img.astype(int) - (190, 20, 40)) < 40, axis=2)
    assert failed_ink.sum() > 100  # the FAILED note and the budget line are drawn


def test_targets_figure_needs_two_built_targets(tmp_path: Path) -> None:
    one = [AUTO["candidates"][1], AUTO["candidates"][3]]  # one built, one unavailable
    assert targets_figure(tmp_path, one) is None
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- end to end


def _tiny_options(tmp: Path, **kw: Any) -> CompileOptions:
    return CompileOptions(source=tiny_source(tmp, SCALE), val_dirs=(), **kw)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    """A random-weight user network compiled with the default passes on the packaged set."""
    tmp = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    result = compile_model(_tiny_options(tmp, out=tmp / "bundle", latency_shapes=()))
    assert time.perf_counter() - start < 120
    return result


def _assert_report_files(bundle: Path) -> dict[str, Any]:
    checked = open_bundle(bundle)  # every checksum holds
    manifest = checked.manifest.to_json()
    md = (bundle / REPORT).read_text(encoding="utf-8")
    page = (bundle / REPORT_HTML).read_text(encoding="utf-8")
    # pure functions of the manifest
    assert md == render_report(checked.manifest) and page == render_html(checked.manifest)
    sources, links = _parse(page).sources, _md_links(md)
    files = [f["file"] for f in manifest["report_figures"]]
    assert sources == links == files
    for name in files:
        assert (bundle / name).is_file() and name in manifest["files"], name
        with Image.open(bundle / name) as im:
            assert im.format == "PNG" and im.width > 300
    assert REPORT_HTML in manifest["files"] and REPORT in manifest["files"]
    assert MANIFEST not in manifest["files"]
    return manifest


def test_compiled_bundle_holds_the_html_report_and_its_pictures(
    tiny_bundle: CompileResult,
) -> None:
    manifest = _assert_report_files(tiny_bundle.bundle)
    assert manifest == tiny_bundle.manifest
    first_set = load_validation_set(default_val_dir(), SCALE)
    expected = [p.name for p in first_set.pairs[:COMPARISON_IMAGES]]
    figures = manifest["report_figures"]
    assert [(f["kind"], f["image"]) for f in figures] == [
        (kind, name) for name in expected for kind in ("comparison", "difference")
    ]
    assert all(f["set"] == first_set.name for f in figures)
    assert figures[0]["panels"][2]["label"] == "engine (ort-fp32)"
    for f in figures[1::2]:  # an fp32 engine: float rounding, far below one 0..255 step
        assert 0.0 <= f["max_abs_difference"] < 0.01 and f["gain"] >= 1000


def test_auto_bundle_adds_the_targets_chart(tmp_path: Path) -> None:
    for name in ("ov-fp32", "ort-fp32"):
        status = availability(get_target(name))
        if not status.ok:
            pytest.skip(f"{name}: {status.reason}")
    options = _tiny_options(
        tmp_path,
        target="auto",
        out=tmp_path / "auto",
        latency_shapes=((32, 32),),
        latency_runs=2,
        auto_candidates=("ov-fp32", "ort-fp32"),
    )
    result = compile_model(options)
    manifest = _assert_report_files(result.bundle)
    kinds = [f["kind"] for f in manifest["report_figures"]]
    assert kinds == ["comparison", "difference"] * COMPARISON_IMAGES + ["targets"]
    candidates = manifest["auto"]["candidates"]
    assert all(isinstance(c["psnr_drop"], float) for c in candidates)
    md = (result.bundle / REPORT).read_text(encoding="utf-8")
    assert f"| {manifest['auto']['chosen']} | chosen |" in md
    # the chosen candidate's own pictures came along, and nothing else is left over
    assert sorted(p.name for p in result.bundle.glob("*.png")) == sorted(
        f["file"] for f in manifest["report_figures"]
    )
