"""The serving side: image IO for upscaling, ``esr_deploy.load(...).upscale``, ``upscale`` CLI.

Most tests run a small hand-made x2 network (three convs and a DepthToSpace) through ONNX
Runtime, written as a bundle, so that tiling, padding and image layouts are checked on a real
engine in well under a second each; one test upscales a real image with the official RLFN.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

import esr_deploy
from esr_deploy.backends.onnxruntime import OnnxRuntimeCPU
from esr_deploy.bundle import MANIFEST, REFERENCE_ONNX, SCHEMA_VERSION, sha256_file
from esr_deploy.cli import app
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.data import imresize, read_image, read_source_image, write_image
from esr_deploy.errors import DataError, TilingError
from esr_deploy.loading.detect import ModelSource
from esr_deploy.paths import example_checkpoint
from esr_deploy.runtime.upscaler import Upscaler, bytes_per_lr_pixel, load
from esr_deploy.validate.quality import psnr

SCALE = 2


def _sr_graph(global_pool: bool = False) -> onnx.ModelProto:
    """x2 SR: conv3x3(3→8) relu conv3x3(8→8) relu conv3x3(8→12) DepthToSpace(2); radius 3.

    With ``global_pool`` the features are also scaled by their global average (IMDN-style
    attention), which no tile can reproduce.
    """
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    shapes = [(8, 3), (8, 8), (3 * SCALE * SCALE, 8)]
    x = "lr"
    for i, (cout, cin) in enumerate(shapes):
        w = rng.normal(0, 1 / np.sqrt(9 * cin), (cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0, 0.1, cout).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1] * 4))
        x = f"c{i}"
        if i < len(shapes) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
        if i == 0 and global_pool:
            nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="attention_gap"))
            nodes.append(helper.make_node("Sigmoid", ["gap"], ["gate"]))
            nodes.append(helper.make_node("Mul", [x, "gate"], ["gated"]))
            x = "gated"
    nodes.append(helper.make_node("DepthToSpace", [x], ["sr"], blocksize=SCALE, mode="CRD"))
    graph = helper.make_graph(
        nodes,
        "tiny_sr",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, "H", "W"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _write_bundle(
    folder: Path,
    global_pool: bool = False,
    max_hw: tuple[int, int] = (1080, 1920),
    min_hw: tuple[int, int] = (1, 1),
) -> Path:
    """A bundle folder the way compile lays it out (manifest, fp32 ONNX, engine)."""
    folder.mkdir(parents=True)
    model = _sr_graph(global_pool)
    onnx.save(model, folder / REFERENCE_ONNX)
    onnx.save(model, folder / "engine.onnx")
    backend = OnnxRuntimeCPU()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": "tiny_sr",
        "target": "ort-fp32",
        "precision": "fp32",
        "backend": backend.name,
        "scale": SCALE,
        "data_range": 255.0,
        "color_order": "RGB",
        "layout": "NCHW",
        "inputs": [{"name": "lr", "dtype": "float32", "shape": ["N", 3, "H", "W"]}],
        "outputs": [{"name": "sr", "dtype": "float32", "shape": ["N", 3, "H*2", "W*2"]}],
        "checkpoint": {},
        "reference_onnx": REFERENCE_ONNX,
        "export": {"input_range": {"min_hw": list(min_hw)}},
        "profile": {"min": list(min_hw), "opt": [64, 64], "max": list(max_hw)},
        "engine": {
            "file": "engine.onnx",
            "backend_version": backend.version(),
            "device": backend.device(),
            "settings": {"intra_op_num_threads": 1},
        },
        "passes": [],
        "metrics": {},
        "validation": {},
        "latency_ms": {},
        "files": {name: sha256_file(folder / name) for name in (REFERENCE_ONNX, "engine.onnx")},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def real_lr(sr_data_dir: Path) -> np.ndarray:
    """A 150×113 crop of a real Set14 colour image (odd width), as the LR input."""
    hr = read_image(next((sr_data_dir / "Set14" / "HR").glob("comic.*")))
    return np.ascontiguousarray(hr[40:190, 60:173])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Upscaler:
    return load(_write_bundle(tmp_path_factory.mktemp("tiny") / "bundle"))


# -------------------------------------------------------------------------- image IO


def _png16(path: Path, planes: np.ndarray, colour_type: int) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit colour)."""
    h, w = planes.shape[:2]
    rows = planes.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_read_source_image_keeps_grey_alpha_and_16_bits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    s = read_source_image(tmp_path / "grey.png")
    assert s.grey and s.alpha is None and s.kind == "grey"
    assert np.array_equal(s.rgb[:, :, 1], grey) and np.array_equal(s.rgb[:, :, 0], grey)

    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    s = read_source_image(tmp_path / "rgba.png")
    assert not s.grey and s.kind == "RGBA"
    assert np.array_equal(s.rgb, rgba[:, :, :3]) and np.array_equal(s.alpha, rgba[:, :, 3])

    grey16 = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    s = read_source_image(tmp_path / "grey16.png")
    assert s.bits == 16 and s.grey and s.rgb.dtype == np.uint16
    assert np.array_equal(s.rgb[:, :, 2], grey16)  # all 16 bits, not the top 8

    _png16(tmp_path / "rgb16.png", rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16), 2)
    with pytest.raises(DataError, match="16-bit colour PNG"):
        read_source_image(tmp_path / "rgb16.png")

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        read_source_image(tmp_path / "broken.png")


def test_write_image_round_trips_each_kind(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for name in ("grey.png", "rgba.png", "grey16.png", "la.png", "rgb.webp"):
        Image.fromarray(
            {
                "grey.png": rng.integers(0, 256, (7, 5), dtype=np.uint8),
                "rgba.png": rng.integers(0, 256, (7, 5, 4), dtype=np.uint8),
                "grey16.png": rng.integers(0, 65536, (7, 5), dtype=np.uint16),
                "la.png": rng.integers(0, 256, (7, 5, 2), dtype=np.uint8),
                "rgb.webp": rng.integers(0, 256, (7, 5, 3), dtype=np.uint8),
            }[name]
        ).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
        source = read_source_image(tmp_path / name)
        write_image(tmp_path / "out" / name, source)
        again = read_source_image(tmp_path / "out" / name)
        assert again.kind == source.kind, name
        assert np.array_equal(again.rgb, source.rgb), name
        assert (again.alpha is None) == (source.alpha is None), name
        if source.alpha is not None:
            assert np.array_equal(again.alpha, source.alpha), name
    assert not list((tmp_path / "out").glob(".*part"))  # no temporary left behind
    with pytest.raises(DataError, match="no alpha channel"):
        write_image(tmp_path / "out" / "x.jpg", read_source_image(tmp_path / "rgba.png"))


# -------------------------------------------------------------------------- the API


def test_receptive_field_and_memory_come_from_the_graph(tiny: Upscaler) -> None:
    assert tiny.field.radius == (3, 3) and tiny.field.exact
    # largest node: DepthToSpace, 12 channels in + 3 channels at 2×2 the pixels out (float32);
    # the last conv (8 in + 12 out) is smaller
    assert bytes_per_lr_pixel(_sr_graph()) == pytest.approx((12 + 3 * SCALE * SCALE) * 4)


def test_profile_limit_tiles_and_tiled_equals_untiled(tmp_path: Path, real_lr: np.ndarray) -> None:
    whole = load(_write_bundle(tmp_path / "big"))
    small = load(_write_bundle(tmp_path / "small", max_hw=(40, 64)))
    h, w = real_lr.shape[:2]
    assert not whole.plan(h, w).tiled
    plan = small.plan(h, w)
    assert plan.tiled and plan.overlap == (3, 3) and "exceeds the engine's profile" in plan.reason
    assert all(t.window[1] - t.window[0] <= 40 for t in plan.tiles)
    reference = whole.upscale(real_lr)
    assert reference.shape == (h * SCALE, w * SCALE, 3) and reference.dtype == np.uint8
    assert np.array_equal(small.upscale(real_lr), reference)
    for tile in (37, 64, 100):  # 37 and 64 do not divide 150 or 113
        assert np.array_equal(whole.upscale(real_lr, tile=tile), reference), tile
    # an overlap below the receptive field shows seams: the radius is needed, not padding
    seams = whole.upscale(real_lr, tile=37, overlap=2)
    assert not np.array_equal(seams, reference)


def test_memory_budget_tiles(tiny: Upscaler, real_lr: np.ndarray) -> None:
    h, w = real_lr.shape[:2]
    budget = int(tiny.bytes_per_pixel * 60 * 60)
    plan = tiny.plan(h, w, max_memory=budget)
    assert plan.tiled and "budget" in plan.reason
    for t in plan.tiles:
        y0, y1, x0, x1 = t.window
        assert tiny.bytes_per_pixel * (y1 - y0) * (x1 - x0) <= budget
    assert np.array_equal(tiny.upscale(real_lr, max_memory=budget), tiny.upscale(real_lr))
    with pytest.raises(TilingError, match="raise --max-memory"):
        tiny.plan(h, w, max_memory=int(tiny.bytes_per_pixel * 5 * 5))  # < one 1-px tile + 2×3


def test_array_layouts_and_dtypes(tiny: Upscaler, real_lr: np.ndarray) -> None:
    rgb = real_lr[:30, :41]
    out = tiny.upscale(rgb)
    grey = rgb[:, :, 1]
    g = tiny.upscale(grey)
    assert g.shape == (60, 82) and g.dtype == np.uint8
    assert tiny.upscale(grey[:, :, None]).shape == (60, 82, 1)
    alpha = np.linspace(0, 255, 30 * 41).reshape(30, 41).astype(np.uint8)
    rgba = tiny.upscale(np.dstack([rgb, alpha]))
    assert rgba.shape == (60, 82, 4)
    assert np.array_equal(rgba[:, :, :3], out)  # colour unaffected by alpha
    assert np.array_equal(rgba[:, :, 3], imresize(alpha, float(SCALE)))  # bicubic alpha
    wide = tiny.upscale(rgb.astype(np.uint16) * 257)
    assert wide.dtype == np.uint16
    assert np.abs(wide.astype(np.int64) - out.astype(np.int64) * 257).max() <= 257
    unit = tiny.upscale(rgb.astype(np.float32) / 255)
    assert unit.dtype == np.float32 and 0.0 <= unit.min() and unit.max() <= 1.0
    assert np.abs(unit * 255 - out).max() <= 0.5 + 1e-3
    with pytest.raises(DataError, match="dtype int32"):
        tiny.upscale(rgb.astype(np.int32))
    with pytest.raises(DataError, match="shape"):
        tiny.upscale(np.zeros((4, 4, 2), np.uint8))


def test_image_smaller_than_the_minimum_is_padded_and_cropped(tmp_path: Path) -> None:
    up = load(_write_bundle(tmp_path / "b", min_hw=(15, 15)))
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = up.upscale(img)
    assert out.shape == (14, 18, 3)
    padded = np.pad(img, ((0, 8), (0, 6), (0, 0)), "symmetric")
    assert np.array_equal(out, up.upscale(padded)[:14, :18])


def test_thin_image_is_mirrored_up_as_promised(tmp_path: Path) -> None:
    """3000×1 with a 15×15 minimum: mirrored up to 15 wide (the column repeats), tiled along
    its length, cropped back; equal to upscaling the mirrored image."""
    up = load(_write_bundle(tmp_path / "b", min_hw=(15, 15), max_hw=(256, 256)))
    img = np.random.default_rng(4).integers(0, 256, (3000, 1, 3), dtype=np.uint8)
    out = up.upscale(img)
    assert out.shape == (6000, 2, 3)
    mirrored = np.repeat(img, 15, axis=1)
    assert np.array_equal(out, up.upscale(mirrored)[:, :2])


def test_empty_and_non_finite_arrays_are_refused(tiny: Upscaler) -> None:
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5), np.float32)):
        with pytest.raises(DataError, match="empty array"):
            tiny.upscale(empty)
    bad = np.full((8, 8, 3), 0.5, np.float32)
    for value in (np.nan, -np.inf):
        image = bad.copy()
        image[2, 3, 1] = value
        with pytest.raises(DataError, match="1 NaN or infinite values"):
            tiny.upscale(image)
    with pytest.raises(DataError, match="192 NaN"):
        tiny.upscale(np.full((8, 8, 3), np.nan, np.float32))


def test_global_attention_refuses_inexact_tiles(tmp_path: Path, real_lr: np.ndarray) -> None:
    up = load(_write_bundle(tmp_path / "gap", global_pool=True, max_hw=(40, 64)))
    assert up.field.global_nodes == ("attention_gap",) and not up.field.exact
    h, w = real_lr.shape[:2]
    with pytest.raises(TilingError, match="attention_gap") as info:
        up.plan(h, w)
    assert "--tile" in str(info.value)
    assert up.upscale(real_lr, tile=32).shape == (h * SCALE, w * SCALE, 3)  # asked for: runs


def test_top_level_load_is_the_serving_api(tiny: Upscaler) -> None:
    up = esr_deploy.load(tiny.bundle.path)
    assert up.scale == SCALE and up.field == tiny.field


# -------------------------------------------------------------------------- the CLI


def test_cli_upscales_files_and_folders_and_skips_unreadable(
    tmp_path: Path, real_lr: np.ndarray
) -> None:
    bundle = _write_bundle(tmp_path / "bundle", max_hw=(64, 64))
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(real_lr).save(src / "photo.jpg", quality=95)
    Image.fromarray(real_lr[:, :, 0]).save(src / "sub" / "grey.png")
    Image.fromarray(np.dstack([real_lr, real_lr[:, :, 1]])).save(src / "sub" / "rgba.webp")
    (src / "sub" / "broken.bmp").write_bytes(b"BM not a bitmap")
    single = tmp_path / "single.png"
    Image.fromarray(real_lr[:20, :30]).save(single)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["upscale", str(bundle), str(single), str(src), "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "broken.bmp" in result.output and "1 of 5 images were skipped" in result.output
    h, w = real_lr.shape[:2]
    with Image.open(out / "single.png") as im:
        assert im.size == (60, 40) and im.mode == "RGB"
    with Image.open(out / "in" / "photo.png") as im:
        assert im.size == (w * SCALE, h * SCALE) and im.mode == "RGB"
    with Image.open(out / "in" / "sub" / "grey.png") as im:
        assert im.mode == "L" and im.size == (w * SCALE, h * SCALE)
    with Image.open(out / "in" / "sub" / "rgba.png") as im:
        assert im.mode == "RGBA"
    assert "tiles of" in result.output  # 150×113 exceeds the 64×64 profile
    assert not (out / "in" / "sub" / "broken.png").exists()


def test_cli_refuses_outputs_that_collide(tmp_path: Path) -> None:
    bundle = _write_bundle(tmp_path / "bundle")
    for name in ("a.png", "a.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    result = CliRunner().invoke(
        app,
        [
            "upscale",
            str(bundle),
            str(tmp_path / "a.png"),
            str(tmp_path / "a.jpg"),
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code != 0 and "would both be written" in result.output
    result = CliRunner().invoke(
        app, ["upscale", str(bundle), str(tmp_path / "a.png"), "-o", str(tmp_path)]
    )
    assert result.exit_code != 0 and "overwrite an input" in result.output


# -------------------------------------------------------------------------- a real network


@pytest.fixture(scope="module")
def rlfn(tmp_path_factory: pytest.TempPathFactory) -> Upscaler:
    torch.set_num_threads(1)
    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=example_checkpoint()),
            val_dirs=(),
            out=tmp_path_factory.mktemp("rlfn") / "bundle",
            latency_shapes=(),
        )
    )
    return load(result.bundle)


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_rlfn_tiled_matches_untiled_on_a_real_image(
    rlfn: Upscaler, sr_data_dir: Path, record_property: Any
) -> None:
    """The whole of Set14's baboon (480×500, the most textured image) as LR, tiles of 200
    (dividing neither side): with RLFN's ±159-pixel field the windows are real tiles.

    RLFN's ESA resizes to the input's size, so a tile samples its attention map at other
    positions than the whole image: run as is, tiles lose to ~50 dB. With the resizes given
    the whole image's positions the tiles are exact to float rounding."""
    field = rlfn.field
    assert field.global_nodes == () and field.unknown_nodes == ()
    assert field.size_dependent_nodes  # ESA's resize back to the input size
    assert field.alignment == (6, 6)  # ESA: a stride-2 conv, then a stride-3 max pool
    assert rlfn.exact_tiles and "whole image's positions" in rlfn.describe_tiling()
    image = read_image(next((sr_data_dir / "Set14" / "HR").glob("baboon.*")))
    lr = image.transpose(2, 0, 1)[None].astype(np.float32)  # RLFN's range is 0..255
    h, w = image.shape[:2]
    untiled = np.clip(rlfn.run(lr) / 255.0, 0.0, 1.0)
    plan = rlfn.plan(h, w, tile=200)
    assert plan.overlap == field.radius
    assert any(t.window != (0, h, 0, w) for t in plan.tiles)  # a real tiling
    exact = psnr(np.clip(rlfn.run(lr, plan) / 255.0, 0.0, 1.0), untiled, 1.0)
    as_is = Upscaler(rlfn.bundle, rlfn.session, onnx.load(rlfn.bundle.path / REFERENCE_ONNX), 1)
    assert not as_is.exact_tiles
    approximate = psnr(np.clip(as_is.run(lr, plan) / 255.0, 0.0, 1.0), untiled, 1.0)
    record_property("psnr_exact_tiles", round(exact, 2))
    record_property("psnr_tiles_as_is", round(approximate, 2))
    assert exact >= 100.0 > 60.0 > approximate, (exact, approximate)


def test_a_list_of_different_sizes_is_refused_as_a_batch(tiny: Upscaler) -> None:
    a, b = np.zeros((20, 20, 3), np.uint8), np.zeros((20, 21, 3), np.uint8)
    with pytest.raises(DataError, match="different sizes"):
        tiny.upscale([a, b])
    assert tiny.upscale([]) == []


@pytest.mark.slow  # uses the compiled RLFN bundle
def test_rlfn_list_of_images_is_one_batch_and_equals_single_runs(
    rlfn: Upscaler, sr_data_dir: Path
) -> None:
    """Four different Set5 crops, 40×40: one engine call of batch 4 (counted on the real
    session), each output equal to that image upscaled alone."""
    crops = []
    for name in ("baby", "bird", "butterfly", "head"):
        img = read_image(sr_data_dir / "Set5" / "LR_bicubic" / "X4" / f"{name}x4.png")
        crops.append(np.ascontiguousarray(img[:40, :40]))
    singles = [rlfn.upscale(c) for c in crops]
    calls: list[tuple[int, ...]] = []
    real_run = rlfn.session.run

    def counting(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return real_run(x)

    rlfn.session.run = counting  # type: ignore[method-assign]
    try:
        batch = rlfn.upscale(crops)
    finally:
        rlfn.session.run = real_run  # type: ignore[method-assign]
    assert calls == [(4, 3, 40, 40)]
    for single, got in zip(singles, batch, strict=True):
        assert got.shape == (160, 160, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - single.astype(int)).max() <= 1
    assert np.abs(batch[0].astype(int) - batch[1].astype(int)).max() > 10
