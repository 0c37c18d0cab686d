"""Image IO, MATLAB-exact bicubic resizing and LR/HR validation pairs.

Everything here works on ``uint8`` H×W×3 RGB arrays, the form in which SR benchmarks are
stored and evaluated. The conversion to and from network tensors is explicit
(:func:`to_tensor`, :func:`to_uint8`) so that the rounding used by the evaluation protocol
(``/work/shared/weights/README.md``) lives in one place. torch is imported only by those two
functions, so the runtime (which reads and writes images) does not load it.

Validation set layout (what :func:`load_validation_set` reads)::

    <SetName>/
        HR/<stem>.<ext>
        LR_bicubic/X<s>/<stem>x<s>.<ext>     (or <stem>.<ext>)

with ``ext`` one of png, jpg, jpeg, bmp, webp, tif, tiff. When ``LR_bicubic/X<s>`` is absent
the LR images are generated from the mod-cropped HR with :func:`imresize` (MATLAB bicubic).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from esr_deploy.errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagePair",
    "SourceImage",
    "ValidationSet",
    "cubic",
    "grey_from_rgb",
    "imresize",
    "load_validation_set",
    "mod_crop",
    "read_image",
    "read_source_image",
    "to_tensor",
    "to_uint8",
    "write_image",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------


def _describe_file(path: Path) -> str:
    """A short description of what is at ``path``, for error messages."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "a directory, not a file"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:  # permission denied and the like
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "an empty file (0 bytes)"
    return f"a {size}-byte file starting with {head!r}"


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as a ``uint8`` H×W×3 RGB array (the validation reader).

    Conversions (Pillow mode → RGB):

    - ``L`` (8-bit grey) and ``1`` (bi-level, 0/255): replicated to three channels;
    - ``LA``: grey replicated, alpha dropped; ``RGBA``/``RGBX``: alpha dropped;
    - ``P``/``PA`` (palette): looked up to RGB, alpha dropped;
    - ``I;16*`` / ``I`` (16-bit grey): ``v8 = round(v16 · 255 / 65535)`` then replicated;
    - other colour spaces (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): Pillow's ``convert("RGB")``.

    16-bit *colour* PNGs are decoded by Pillow itself to 8 bits (it keeps the high byte,
    ``floor(v16 / 256)``, at most 1 level from the rounded value). EXIF orientation is not
    applied: benchmark images are stored upright.

    Raises:
        DataError: the file is missing, not an image, truncated, or of an unsupported kind
            (floating point); the message names the path and what was found there.
    """
    p = Path(path)
    arr = _decode(p, _pil_to_rgb, upright=False)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, arr.shape
    return np.ascontiguousarray(arr)


def _single_frame(im: Image.Image, path: Path) -> None:
    """Refuse a multi-frame file (animated GIF/WebP/PNG, multi-page TIFF) rather than
    silently reading its first frame."""
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        raise DataError(
            f"cannot read image {path} — it holds {frames} frames (an animation or a "
            "multi-page file), and esr-deploy reads single images — extract the frames as "
            "separate images first (e.g. ffmpeg -i in.gif frame%04d.png)"
        )


def _decode(path: Path, convert: Callable[[Image.Image, Path], T], upright: bool) -> T:
    """Open, decode and ``convert`` an image; every failure becomes a :class:`DataError`
    naming the file and what is there. ``upright``: apply the EXIF orientation first."""
    try:
        with Image.open(path) as opened:
            _single_frame(opened, path)
            opened.load()
            im = (ImageOps.exif_transpose(opened) or opened) if upright else opened
            return convert(im, path)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        kind = "not a recognised image" if isinstance(e, UnidentifiedImageError) else str(e)
        raise DataError(
            f"cannot read image {path} — {kind}; found {_describe_file(path)} — "
            f"give a readable image file ({', '.join(IMAGE_EXTENSIONS)})"
        ) from e


def _sixteen_bit(im: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit (or 32-bit integer holding 16-bit values) grey image as ``uint16`` H×W."""
    v = np.asarray(im, dtype=np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
        raise DataError(
            f"cannot read image {path} — 32-bit integer image with values in "
            f"[{v.min()}, {v.max()}], outside the 16-bit range — save it as 8- or 16-bit"
        )
    return v.astype(np.uint16)


def _pil_to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded Pillow image of any supported mode to ``uint8`` H×W×3 RGB."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1", "LA"):
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in _SIXTEEN_BIT_MODES:
        v = _sixteen_bit(im, path)
        grey8 = np.floor(v * (255.0 / 65535.0) + 0.5).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if mode in ("F",):
        raise DataError(
            f"cannot read image {path} — floating-point image (mode {mode}) — "
            "save it as an 8-bit RGB or greyscale image"
        )
    if mode in ("P", "PA"):
        return np.asarray(im.convert("RGBA"), dtype=np.uint8)[:, :, :3]
    if mode in ("RGBA", "RGBX", "RGBa"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Reading and writing images for upscaling (the serving side)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceImage:
    """An image as ``upscale`` reads it: colour planes, alpha, and how to write it back.

    ``rgb`` is H×W×3, ``uint8``, or ``uint16`` for 16-bit greyscale sources (replicated to
    three planes so the network sees RGB); ``alpha`` is H×W of the same dtype or ``None``;
    ``grey`` says the image is written back with one colour channel.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    grey: bool

    @property
    def bits(self) -> int:
        return 16 if self.rgb.dtype == np.uint16 else 8

    @property
    def kind(self) -> str:
        """``"RGB"``, ``"RGBA"``, ``"grey"``, ``"grey+alpha"``, with ``", 16-bit"`` if so."""
        name = ("grey" if self.grey else "RGB") + ("+alpha" if self.alpha is not None else "")
        if name == "RGB+alpha":
            name = "RGBA"
        return name + (", 16-bit" if self.bits == 16 else "")


def _png_bit_depth(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or ``None`` for other files."""
    try:
        with path.open("rb") as fh:
            head = fh.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def read_source_image(path: str | Path) -> SourceImage:
    """Read an image to upscale, keeping what :func:`read_image` drops.

    - grey (``L``, ``1``) is replicated to RGB and marked ``grey`` (written back as grey);
    - alpha (``RGBA``, ``LA``, palette transparency) is returned separately: it is upscaled
      with bicubic interpolation, not by the network, and re-attached;
    - 16-bit greyscale PNGs keep their 16 bits (``uint16``); 16-bit *colour* PNGs are
      refused, because Pillow decodes them to 8 bits and the result would silently lose
      precision;
    - EXIF orientation is applied (camera JPEGs are written upright);
    - multi-frame files (animated GIF/WebP/PNG, multi-page TIFF) are refused rather than
      silently reduced to their first frame.

    Raises:
        DataError: missing, unreadable, floating-point, 16-bit colour or multi-frame images,
            naming the file and what was found.
    """
    p = Path(path)
    depth = _png_bit_depth(p)
    if depth is not None and depth[0] == 16 and depth[1] != 0:
        raise DataError(
            f"cannot upscale {p} — it is a 16-bit colour PNG (colour type {depth[1]}), and the "
            "image reader (Pillow) decodes only the top 8 bits of such files — convert it to "
            "8-bit colour (or 16-bit greyscale) first"
        )
    return _decode(p, _source_from_pil, upright=True)


def _source_from_pil(im: Image.Image, path: Path) -> SourceImage:
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa", "PA", "LA", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        grey = mode in ("LA", "La")
        return SourceImage(np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3].copy(), grey)
    if mode in ("L", "1"):
        return SourceImage(_pil_to_rgb(im, path), None, grey=True)
    if mode in _SIXTEEN_BIT_MODES:
        grey16 = _sixteen_bit(im, path)
        return SourceImage(np.repeat(grey16[:, :, None], 3, axis=2), None, grey=True)
    return SourceImage(_pil_to_rgb(im, path), None, grey=False)


#: WebP lossless, JPEG at quality 95: an upscaler should not add visible compression loss
_SAVE_OPTIONS: dict[str, dict[str, object]] = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}


def grey_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 → H×W luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (BT.601, as Pillow's ``L``), in
    the input's dtype (integers rounded half up and saturated)."""
    y = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if np.issubdtype(rgb.dtype, np.floating):
        return y.astype(rgb.dtype)
    peak = float(np.iinfo(rgb.dtype).max)
    return np.clip(np.floor(y + 0.5), 0.0, peak).astype(rgb.dtype)


def write_image(path: str | Path, image: SourceImage) -> None:
    """Write ``image`` to ``path`` (format from the suffix; WebP lossless), atomically.

    Grey images are written with one channel (``L``/``LA``, or ``I;16`` for 16-bit: luma
    ``Y = 0.299 R + 0.587 G + 0.114 B`` of the three planes, which the network returns almost
    equal), alpha re-attached. The file is written beside ``path`` under a temporary name and
    renamed, so an interrupted run never leaves a truncated image.
    """
    p = Path(path)
    rgb = image.rgb
    if image.grey:
        plane = grey_from_rgb(rgb)
        if image.bits == 16:
            pil = Image.fromarray(plane)
            if image.alpha is not None:
                raise DataError(f"cannot write {p} — 16-bit grey with alpha is not supported")
        elif image.alpha is not None:
            pil = Image.fromarray(np.stack([plane, image.alpha], axis=2))
        else:
            pil = Image.fromarray(plane)
    elif image.alpha is not None:
        pil = Image.fromarray(np.dstack([rgb, image.alpha]))
    else:
        pil = Image.fromarray(rgb)
    suffix = p.suffix.lower()
    if suffix in (".jpg", ".jpeg") and pil.mode in ("RGBA", "LA"):
        raise DataError(
            f"cannot write {p} — JPEG has no alpha channel and this image has one — "
            "write PNG or WebP instead"
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.part")
    try:
        fmt = Image.registered_extensions().get(suffix, "PNG")
        pil.save(tmp, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {p} — {e.strerror or e} — check the output folder") from e
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# MATLAB imresize (bicubic)
# --------------------------------------------------------------------------------------------


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``).

    ``k(x) = 1.5|x|³ − 2.5|x|² + 1``            for ``|x| ≤ 1``,
    ``k(x) = −0.5|x|³ + 2.5|x|² − 4|x| + 2``     for ``1 < |x| ≤ 2``, and 0 elsewhere.
    """
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1.0) + (
        -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    ) * ((ax > 1.0) & (ax <= 2.0))


def _contributions(
    in_length: int, out_length: int, scale: float, antialiasing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and (0-based) source indices of each output sample, as MATLAB computes them.

    For output sample ``x = 1..out_length`` (1-based) the source position is
    ``u = x / s + 0.5 (1 − 1/s)``. When downscaling with antialiasing the kernel is
    stretched, ``h(t) = s · k(s t)``, and its support widens from 4 to ``4 / s``. The taps
    are ``left + j`` for ``j = 0..P−1`` with ``left = floor(u − width/2)`` and
    ``P = ceil(width) + 2``; the weights ``h(u − tap)`` are normalised to sum to 1 per row.
    Out-of-range taps are mirrored symmetrically (``[1..n, n..1]`` repeated, the edge sample
    repeated), and taps whose weight is zero for every output are dropped.

    Returns:
        ``(weights, indices)``, each ``out_length × P'`` (float64, int64).
    """
    kernel_width = 4.0
    if scale < 1.0 and antialiasing:
        kernel_width = kernel_width / scale
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - indices
    if scale < 1.0 and antialiasing:
        weights = scale * cubic(dist * scale)
    else:
        weights = cubic(dist)
    weights = weights / np.sum(weights, axis=1, keepdims=True)
    # Symmetric padding: MATLAB's aux = [1:n, n:-1:1] indexed with mod(indices - 1, 2n) + 1.
    aux = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    idx = indices.astype(np.int64) - 1  # 1-based → 0-based
    idx = aux[np.mod(idx, aux.size)]
    keep = np.any(weights != 0.0, axis=0)
    return weights[:, keep], idx[:, keep]


def _resize_along(
    arr: np.ndarray, axis: int, out_length: int, scale: float, antialiasing: bool
) -> np.ndarray:
    """One separable pass: ``out[i] = Σ_p w[i, p] · in[idx[i, p]]`` along ``axis`` (float64).

    The taps are accumulated in order ``p = 0, 1, …`` as MATLAB's ``imresizemex`` does, so
    that the double-precision sums (and thus uint8 rounding ties) match.
    """
    weights, indices = _contributions(arr.shape[axis], out_length, scale, antialiasing)
    moved = np.moveaxis(arr, axis, 0)
    shape = (out_length,) + (1,) * (moved.ndim - 1)
    acc = np.zeros((out_length,) + moved.shape[1:], dtype=np.float64)
    for p in range(weights.shape[1]):
        acc += weights[:, p].reshape(shape) * moved[indices[:, p]]
    return np.moveaxis(acc, 0, axis)


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double → uint8 conversion: round half away from zero, saturate to 0..255."""
    return np.clip(np.floor(x + 0.5), 0.0, 255.0).astype(np.uint8)


def imresize(
    img: np.ndarray,
    scale_factor: float,
    antialiasing: bool = True,
) -> np.ndarray:
    """Resize like MATLAB's ``imresize(img, scale_factor, 'bicubic')``.

    Output size per spatial dimension is ``ceil(n · s)`` (with a 1e-9 guard so that, e.g.,
    ``192 · (1/3)`` gives 64). The two spatial dimensions are resized separately, the one
    with the smaller scale first (for equal scales: rows — the height — first), with the
    weights of :func:`_contributions`. For ``uint8`` input each pass is rounded back to
    ``uint8`` (round half away from zero, saturating), exactly as MATLAB does; other input
    dtypes are computed and returned in float64 without rounding.

    Args:
        img: H×W or H×W×C array.
        scale_factor: one scale for both dimensions (``1/4`` downscales by four).
        antialiasing: widen the kernel when downscaling (MATLAB's default ``true``).
    """
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an H×W or H×W×C array, got shape {img.shape}")
    if not scale_factor > 0:
        raise ValueError(f"imresize scale_factor must be positive, got {scale_factor}")
    is_uint8 = img.dtype == np.uint8
    out: np.ndarray = img.astype(np.float64)
    # MATLAB sorts the dimensions by scale; with one scale for both it keeps rows first.
    for axis in (0, 1):
        out_length = int(math.ceil(img.shape[axis] * scale_factor - 1e-9))
        out = _resize_along(out, axis, out_length, scale_factor, antialiasing)
        if is_uint8:
            out = _round_to_uint8(out).astype(np.float64)
    return out.astype(np.uint8) if is_uint8 else out


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def to_tensor(img: np.ndarray, data_range: float) -> torch.Tensor:
    """``uint8`` H×W×3 → float32 1×3×H×W tensor in ``[0, data_range]``: ``x = v · r / 255``."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise DataError(
            f"to_tensor expects a uint8 H×W×3 image — got dtype {img.dtype}, shape "
            f"{img.shape} — read images with esr_deploy.data.read_image"
        )
    import torch

    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(torch.float32)
    if data_range != 255.0:
        t = t * (float(data_range) / 255.0)
    return t.unsqueeze(0).contiguous()


def to_uint8(out: torch.Tensor | np.ndarray, data_range: float) -> np.ndarray:
    """Network output (1×3×H×W or 3×H×W) → ``uint8`` H×W×3.

    ``v = round_half_even(clamp(x, 0, r) · 255 / r)``, computed in the input's own floating
    dtype (``torch.round`` for tensors, ``np.round`` for arrays: both round half to even).
    """
    if out.ndim == 4:
        if out.shape[0] != 1:
            raise DataError(f"to_uint8 expects a batch of one image, got shape {tuple(out.shape)}")
        out = out[0]
    if out.ndim != 3 or out.shape[0] != 3:
        raise DataError(
            f"to_uint8 expects 1×3×H×W or 3×H×W, got shape {tuple(out.shape)} — "
            "pass the model output for one RGB image"
        )
    factor = 255.0 / float(data_range)
    if not isinstance(out, np.ndarray):  # a torch tensor
        import torch

        t = out.detach().to("cpu")
        if not t.is_floating_point():
            t = t.to(torch.float32)
        v = torch.round(t.clamp(0.0, float(data_range)) * factor)
        arr = v.to(torch.uint8).numpy()
    else:
        a = out if np.issubdtype(out.dtype, np.floating) else out.astype(np.float32)
        arr = np.round(np.clip(a, 0.0, float(data_range)) * factor).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


# --------------------------------------------------------------------------------------------
# Validation sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePair:
    """One validation image: LR input and its mod-cropped HR target (``uint8`` H×W×3)."""

    name: str
    lr: np.ndarray
    hr: np.ndarray


@dataclass(frozen=True)
class ValidationSet:
    """LR/HR pairs of one set at one scale; ``lr_generated`` when LR came from imresize."""

    name: str
    scale: int
    pairs: tuple[ImagePair, ...]
    lr_generated: bool

    def __len__(self) -> int:
        return len(self.pairs)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that H and W are multiples of ``scale``."""
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


_LAYOUT = "expected <set>/HR/<stem>.png and <set>/LR_bicubic/X<s>/<stem>x<s>.png"


def load_validation_set(directory: str | Path, scale: int) -> ValidationSet:
    """Load the LR/HR pairs of a set folder for one scale.

    HR images are mod-cropped to a multiple of ``scale``; each LR must satisfy
    ``LR.shape · scale == HR_cropped.shape``. If ``LR_bicubic/X<scale>`` does not exist the LR
    images are generated with ``imresize(HR_cropped, 1/scale)`` and ``lr_generated`` is set.

    Raises:
        DataError: missing folder, no HR images, an HR image without LR, or a size mismatch.
    """
    d = Path(directory)
    if scale < 1:
        raise DataError(f"validation scale must be a positive integer, got {scale}")
    if not d.is_dir():
        raise DataError(f"validation set {d} not found — {_describe_file(d)} — {_LAYOUT}")
    hr_dir = d / "HR"
    if not hr_dir.is_dir():
        found = sorted(p.name for p in d.iterdir())[:10]
        raise DataError(f"validation set {d} has no HR/ folder — found {found} — {_LAYOUT}")
    hr_files = _image_files(hr_dir)
    if not hr_files:
        found = sorted(p.name for p in hr_dir.iterdir())[:10]
        raise DataError(f"validation set {d}: no images in HR/ — found {found} — {_LAYOUT}")
    lr_dir = d / "LR_bicubic" / f"X{scale}"
    lr_generated = not lr_dir.is_dir()
    lr_by_stem: dict[str, Path] = {}
    if not lr_generated:
        suffix = f"x{scale}"
        plain: dict[str, Path] = {}
        for p in _image_files(lr_dir):
            if p.stem.endswith(suffix) and len(p.stem) > len(suffix):
                lr_by_stem.setdefault(p.stem[: -len(suffix)], p)
            plain.setdefault(p.stem, p)
        for stem, p in plain.items():
            lr_by_stem.setdefault(stem, p)
        missing = [p.name for p in hr_files if p.stem not in lr_by_stem]
        if missing:
            raise DataError(
                f"validation set {d}: no LR image in {lr_dir} for HR {missing} — "
                f"found {sorted(p.name for p in _image_files(lr_dir))[:10]} — {_LAYOUT}"
            )
    else:
        log.info(
            "validation set %s: %s absent, generating x%d LR with MATLAB-bicubic imresize",
            d.name,
            lr_dir,
            scale,
        )

    pairs: list[ImagePair] = []
    for hr_path in hr_files:
        hr = mod_crop(read_image(hr_path), scale)
        if hr.shape[0] == 0 or hr.shape[1] == 0:
            raise DataError(
                f"validation set {d}: HR image {hr_path.name} is smaller than the scale "
                f"{scale} — remove it or use a smaller scale"
            )
        if lr_generated:
            lr = imresize(hr, 1.0 / scale)
        else:
            lr_path = lr_by_stem[hr_path.stem]
            lr = read_image(lr_path)
            if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                raise DataError(
                    f"validation set {d}: image {hr_path.stem}: LR {lr_path.name} is "
                    f"{lr.shape[1]}×{lr.shape[0]} (W×H), x{scale} = "
                    f"{lr.shape[1] * scale}×{lr.shape[0] * scale}, but the mod-cropped HR "
                    f"is {hr.shape[1]}×{hr.shape[0]} — regenerate the LR from the HR"
                )
        pairs.append(ImagePair(name=hr_path.stem, lr=lr, hr=hr))
    return ValidationSet(name=d.name, scale=scale, pairs=tuple(pairs), lr_generated=lr_generated)
