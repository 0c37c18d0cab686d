"""Tests of esr_deploy.data: image reading, MATLAB imresize, tensors, validation sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from esr_deploy import paths
from esr_deploy.data import (
    ImagePair,
    ValidationSet,
    cubic,
    imresize,
    load_validation_set,
    mod_crop,
    read_image,
    read_source_image,
    to_tensor,
    to_uint8,
)
from esr_deploy.errors import DataError

RNG = np.random.default_rng(0)


def _rgb(h: int = 12, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- read_image


def test_read_rgb_png_roundtrip(tmp_path: Path) -> None:
    img = _rgb()
    Image.fromarray(img).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3)
    np.testing.assert_array_equal(out, img)


def test_read_grey_replicated(tmp_path: Path) -> None:
    g = _rgb()[:, :, 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (12, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g)


def test_read_grey_alpha_and_rgba_drop_alpha(tmp_path: Path) -> None:
    img = _rgb()
    alpha = np.full(img.shape[:2], 7, dtype=np.uint8)
    Image.fromarray(np.dstack([img, alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), img)
    la = np.dstack([img[:, :, 0], alpha])
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out, np.repeat(img[:, :, :1], 3, axis=2))


def test_read_palette(tmp_path: Path) -> None:
    img = _rgb()
    pal = Image.fromarray(img).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)


def test_read_one_bit(tmp_path: Path) -> None:
    bits = RNG.integers(0, 2, size=(9, 11), dtype=np.uint8) * 255
    Image.fromarray(bits, mode="L").convert("1").save(tmp_path / "b.png")
    out = read_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out, np.repeat(bits[:, :, None], 3, axis=2))


def test_read_sixteen_bit_grey_scaled_properly(tmp_path: Path) -> None:
    v16 = np.array([[0, 257, 65535, 32896, 128, 129]], dtype=np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    # round(v * 255 / 65535): 0, 1, 255, 128, 0.498 -> 0, 0.502 -> 1
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128, 0, 1])
    assert out.shape == (1, 6, 3)


def test_read_jpeg_and_bmp(tmp_path: Path) -> None:
    img = _rgb()
    Image.fromarray(img).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp"), img)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    assert read_image(tmp_path / "a.jpg").shape == img.shape


def test_read_missing_names_path(tmp_path: Path) -> None:
    p = tmp_path / "nope.png"
    with pytest.raises(DataError, match="nope.png") as e:
        read_image(p)
    assert "no such file" in str(e.value)


def test_read_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "text.png"
    p.write_text("hello, not a png")
    with pytest.raises(DataError, match="text.png") as e:
        read_image(p)
    assert "not a recognised image" in str(e.value) and "hello" in str(e.value)


def test_read_truncated_and_directory(tmp_path: Path) -> None:
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        read_image(tmp_path / "t.png")
    with pytest.raises(DataError, match="directory"):
        read_image(tmp_path)


def test_read_float_image_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="floating-point"):
        read_image(tmp_path / "f.tif")


@pytest.mark.parametrize("suffix", [".gif", ".tif", ".webp"])
def test_multi_frame_image_refused_not_truncated(tmp_path: Path, suffix: str) -> None:
    frames = [Image.fromarray(_rgb(8, 8) // (i + 1)) for i in range(3)]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    for read in (read_image, read_source_image):
        with pytest.raises(DataError, match="holds 3 frames") as e:
            read(path)
        assert str(path) in str(e.value) and "extract the frames" in str(e.value)


# ---------------------------------------------------------------------------- imresize


def test_cubic_kernel_values() -> None:
    x = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.5])
    np.testing.assert_allclose(cubic(x), [1.0, 0.5625, 0.0, -0.0625, 0.0, 0.0, 0.5625])


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 1 / 2, 2, 3, 4])
def test_imresize_constant_image_and_size(scale: float) -> None:
    img = np.full((24, 36, 3), 77, dtype=np.uint8)
    out = imresize(img, scale)
    assert out.dtype == np.uint8
    assert out.shape == (round(24 * scale), round(36 * scale), 3)
    assert np.all(out == 77)


def test_imresize_float_input_is_not_rounded() -> None:
    img = RNG.random((16, 16))
    out = imresize(img, 0.5)
    assert out.dtype == np.float64 and out.shape == (8, 8)
    assert not np.allclose(out, np.round(out))


def test_imresize_upscale_reproduces_linear_ramp() -> None:
    # Cubic convolution reproduces linear functions away from the (mirrored) border.
    ramp = np.tile(np.arange(20, dtype=np.float64), (20, 1))
    out = imresize(ramp, 2)
    expected = (np.arange(40) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(out[10, 4:-4], expected[4:-4], atol=1e-12)


def _pairs(data_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for hr_path in sorted((data_dir / "HR").glob("*.png")):
        hr = mod_crop(read_image(hr_path), 4)
        lr = read_image(data_dir / "LR_bicubic" / "X4" / f"{hr_path.stem}x4.png")
        out.append((hr_path.stem, hr, lr))
    return out


@pytest.mark.parametrize("set_name", ["Set14", "Set5"])
def test_imresize_reproduces_benchmark_lr_bit_exactly(sr_data_dir: Path, set_name: str) -> None:
    """MATLAB bicubic x1/4 of the mod-cropped HR equals the stored LR, every pixel."""
    pairs = _pairs(sr_data_dir / set_name)
    assert pairs
    for name, hr, lr in pairs:
        out = imresize(hr, 1 / 4)
        assert out.shape == lr.shape, name
        diff = np.abs(out.astype(np.int16) - lr.astype(np.int16))
        assert diff.max() == 0, f"{name}: max diff {diff.max()}, {np.count_nonzero(diff)} px"


# ---------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_tensor_roundtrip(data_range: float) -> None:
    img = _rgb()
    t = to_tensor(img, data_range)
    assert t.shape == (1, 3, 12, 10) and t.dtype == torch.float32
    assert float(t.max()) <= data_range and float(t.min()) >= 0.0
    np.testing.assert_array_equal(to_uint8(t, data_range), img)
    np.testing.assert_array_equal(to_uint8(t[0].numpy(), data_range), img)


def test_to_uint8_clamps_and_rounds_half_to_even() -> None:
    vals = np.array([-3.0, 2.5, 3.5, 254.5, 300.0, 0.49], dtype=np.float32)
    x = np.broadcast_to(vals[None, None, :], (3, 1, vals.size)).copy()
    expected = [0, 2, 4, 254, 255, 0]
    out_np = to_uint8(x, 255.0)
    out_t = to_uint8(torch.from_numpy(x)[None], 255.0)
    np.testing.assert_array_equal(out_np[0, :, 0], expected)
    np.testing.assert_array_equal(out_t, out_np)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-0.5, 1.5, width=32), min_size=3, max_size=30))
def test_to_uint8_tensor_and_array_agree(values: list[float]) -> None:
    n = len(values) // 3
    a = np.array(values[: 3 * n], dtype=np.float32).reshape(3, 1, n)
    np.testing.assert_array_equal(to_uint8(a, 1.0), to_uint8(torch.from_numpy(a), 1.0))


def test_tensor_shape_errors() -> None:
    with pytest.raises(DataError):
        to_tensor(np.zeros((4, 4), dtype=np.uint8), 1.0)
    with pytest.raises(DataError):
        to_tensor(np.zeros((4, 4, 3), dtype=np.float32), 1.0)
    with pytest.raises(DataError):
        to_uint8(torch.zeros(2, 3, 4, 4), 1.0)
    with pytest.raises(DataError):
        to_uint8(torch.zeros(1, 1, 4, 4), 1.0)


# ---------------------------------------------------------------------------- validation sets


def test_mod_crop() -> None:
    assert mod_crop(np.zeros((13, 18, 3)), 4).shape == (12, 16, 3)
    assert mod_crop(np.zeros((12, 16, 3)), 4).shape == (12, 16, 3)


def test_default_set_x4() -> None:
    vs = load_validation_set(paths.default_val_dir(), 4)
    assert isinstance(vs, ValidationSet)
    assert vs.name == "set5_crops" and vs.scale == 4 and not vs.lr_generated
    assert [p.name for p in vs.pairs] == ["bird", "butterfly", "head"]
    for p in vs.pairs:
        assert isinstance(p, ImagePair)
        assert p.hr.shape == (192, 192, 3) and p.lr.shape == (48, 48, 3)
        # The LR is a crop of the full-image LR: away from the crop border it equals the
        # bicubic downscale of the HR crop (the x1/4 kernel reaches 8 HR px = 2 LR px).
        gen = imresize(p.hr, 1 / 4)
        np.testing.assert_array_equal(gen[3:-3, 3:-3], p.lr[3:-3, 3:-3])


@pytest.mark.parametrize("scale", [2, 3])
def test_default_set_other_scales_generated(scale: int) -> None:
    vs = load_validation_set(paths.default_val_dir(), scale)
    assert vs.lr_generated and len(vs) == 3
    for p in vs.pairs:
        assert p.lr.shape == (192 // scale, 192 // scale, 3)
        np.testing.assert_array_equal(p.lr, imresize(p.hr, 1 / scale))


def test_set5_loads(sr_data_dir: Path) -> None:
    vs = load_validation_set(sr_data_dir / "Set5", 4)
    assert vs.name == "Set5" and len(vs) == 5 and not vs.lr_generated
    woman = next(p for p in vs.pairs if p.name == "woman")
    assert woman.hr.shape == (344, 228, 3) and woman.lr.shape == (86, 57, 3)


def _make_set(
    root: Path, hr_sizes: dict[str, tuple[int, int]], lr_names: dict[str, str], scale: int = 4
) -> Path:
    (root / "HR").mkdir(parents=True)
    lr_dir = root / "LR_bicubic" / f"X{scale}"
    lr_dir.mkdir(parents=True)
    for stem, (h, w) in hr_sizes.items():
        Image.fromarray(_rgb(h, w)).save(root / "HR" / f"{stem}.png")
    for stem, fname in lr_names.items():
        h, w = hr_sizes[stem]
        Image.fromarray(_rgb(h // scale, w // scale)).save(lr_dir / fname)
    return root


def test_lr_names_with_and_without_suffix_and_mod_crop(tmp_path: Path) -> None:
    root = _make_set(
        tmp_path / "Mine", {"a": (18, 22), "b": (16, 16)}, {"a": "ax4.png", "b": "b.png"}
    )
    vs = load_validation_set(root, 4)
    assert vs.name == "Mine"
    assert [p.name for p in vs.pairs] == ["a", "b"]
    assert vs.pairs[0].hr.shape == (16, 20, 3) and vs.pairs[0].lr.shape == (4, 5, 3)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as e:
        load_validation_set(tmp_path / "nowhere", 4)
    assert "LR_bicubic" in str(e.value)


def test_no_hr_folder_and_empty_hr(tmp_path: Path) -> None:
    (tmp_path / "S" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no HR/ folder") as e:
        load_validation_set(tmp_path / "S", 4)
    assert "images" in str(e.value)
    (tmp_path / "S" / "HR").mkdir()
    (tmp_path / "S" / "HR" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images in HR") as e:
        load_validation_set(tmp_path / "S", 4)
    assert "notes.txt" in str(e.value)


def test_hr_without_lr(tmp_path: Path) -> None:
    root = _make_set(tmp_path / "S", {"a": (16, 16), "b": (16, 16)}, {"a": "ax4.png"})
    with pytest.raises(DataError, match=r"b\.png"):
        load_validation_set(root, 4)


def test_size_mismatch_names_image_and_sizes(tmp_path: Path) -> None:
    root = _make_set(tmp_path / "S", {"a": (16, 16)}, {})
    Image.fromarray(_rgb(5, 4)).save(root / "LR_bicubic" / "X4" / "ax4.png")
    with pytest.raises(DataError, match="image a") as e:
        load_validation_set(root, 4)
    assert "4×5" in str(e.value) and "16×16" in str(e.value)


def test_generated_lr_when_folder_absent(tmp_path: Path) -> None:
    (tmp_path / "S" / "HR").mkdir(parents=True)
    hr = _rgb(26, 24)
    Image.fromarray(hr).save(tmp_path / "S" / "HR" / "a.png")
    vs = load_validation_set(tmp_path / "S", 4)
    assert vs.lr_generated
    np.testing.assert_array_equal(vs.pairs[0].hr, hr[:24, :24])
    np.testing.assert_array_equal(vs.pairs[0].lr, imresize(hr[:24, :24], 0.25))
