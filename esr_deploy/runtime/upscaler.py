"""The serving side: run an engine bundle on images, tiled when it must be.

``esr_deploy.load(bundle).upscale(image)`` and ``esr-deploy upscale`` both go through
:class:`Upscaler`. An image is run **untiled** when it fits the engine's shape profile and the
memory budget; otherwise it is cut into tiles (:mod:`esr_deploy.runtime.tiling`) whose
overlap is the network's receptive field, computed from the bundle's fp32 ONNX graph, so that
the stitched result equals the untiled one to float rounding:

- convolutional networks: exactly so, with windows aligned to the strided ops' grid;
- networks that resize to a size read from the image (RLFN's and RFDN's ESA): their Resize
  nodes sample at positions that depend on the image size, so a tile of another size would
  sample elsewhere whatever the overlap (48–51 dB on Set14's baboon). For engines that ONNX
  Runtime runs from an ONNX graph (``ort-*``), tiles run that graph with those Resize nodes
  given the whole image's sampling positions (:mod:`esr_deploy.runtime.resize_geometry`), which is
  exact; for other engines tiling is approximate and says so;
- networks that average over the whole image (IMDN's contrast attention): no tile can
  reproduce them; refused unless the caller asks for tiles explicitly.

Memory model. The peak memory of one engine call grows linearly with the number of input
pixels: ``peak ≈ SLACK · b · H · W`` where ``b`` is the largest sum of the sizes of one node's
inputs and outputs per LR pixel (bytes; from ONNX shape inference on a probe input) and
``SLACK`` (2.5) covers the runtime's allocator: for RLFN at 1080×1920 with ONNX Runtime the
estimate with 2.5 is 3.0 GiB, and the process grew by 3.1 GiB (``bench/upscale.py``). The
default budget is half of the memory available when the bundle is loaded.

Images: ``uint8``, ``uint16`` or float (0..1) arrays, H×W (grey, replicated to RGB for the
network and converted back to luma), H×W×3 or H×W×4 (alpha upscaled with bicubic
interpolation, not by the network, and re-attached). The output has the input's layout and
dtype.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from esr_deploy.backends.base import EngineSession
from esr_deploy.data import (
    IMAGE_EXTENSIONS,
    SourceImage,
    grey_from_rgb,
    imresize,
    read_source_image,
    write_image,
)
from esr_deploy.errors import DataError, EsrDeployError, OutputError, TilingError
from esr_deploy.memory import available_memory
from esr_deploy.progress import NullProgress, Progress
from esr_deploy.runtime.bundle_reader import Bundle, open_bundle
from esr_deploy.runtime.resize_geometry import ResizeGeometry, explicit_resize, rewritable
from esr_deploy.runtime.tiling import ReceptiveField, Tile, plan_tiles, receptive_field, run_tiled
from esr_deploy.targets import require_available

log = logging.getLogger(__name__)

#: allocator slack on top of the graph's largest node footprint (see the module docstring)
MEMORY_SLACK = 2.5
#: share of the memory available at load time that one engine call may use by default
DEFAULT_MEMORY_FRACTION = 0.5
_PROBE = 64  # LR side of the shape-inference probe


def bytes_per_lr_pixel(model: onnx.ModelProto) -> float:
    """Largest (inputs + outputs) footprint of one node, in bytes per LR input pixel.

    Shape inference runs on a probe input of ``1×C×64×64``; tensors without a static shape
    there are skipped. Weights (initializers) are not counted: they do not grow with the
    image.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_input = probe.graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    for i, value in enumerate((1, None, _PROBE, _PROBE)):
        if value is not None:
            dims[i].ClearField("dim_param")
            dims[i].dim_value = value
    inferred = onnx.shape_inference.infer_shapes(probe)
    weights = {t.name for t in inferred.graph.initializer}
    sizes: dict[str, int] = {}
    itemsize = {onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        shape = info.type.tensor_type.shape.dim
        if not shape or any(not d.HasField("dim_value") for d in shape):
            continue
        n = math.prod(d.dim_value for d in shape)
        sizes[info.name] = n * itemsize.get(info.type.tensor_type.elem_type, 4)
    peak = 0
    for node in inferred.graph.node:
        names = [t for t in (*node.input, *node.output) if t and t not in weights]
        peak = max(peak, sum(sizes.get(t, 0) for t in names))
    return peak / float(_PROBE * _PROBE)


@dataclass(frozen=True)
class TilePlan:
    """How one image is run: untiled (``tiles`` of one whole-image tile) or in tiles."""

    tiles: tuple[Tile, ...]
    tile: int | None  # core side in LR pixels, None when untiled
    overlap: tuple[int, int]
    reason: str  # why tiled (or not), for users

    @property
    def tiled(self) -> bool:
        return self.tile is not None


@dataclass(frozen=True)
class PixelFormat:
    """How an array maps to the network's input range: ``x = v / peak · data_range``."""

    dtype: np.dtype[Any]
    peak: float

    @classmethod
    def of(cls, array: np.ndarray) -> PixelFormat:
        if array.dtype == np.uint8:
            return cls(array.dtype, 255.0)
        if array.dtype == np.uint16:
            return cls(array.dtype, 65535.0)
        if np.issubdtype(array.dtype, np.floating):
            return cls(array.dtype, 1.0)
        raise DataError(
            f"cannot upscale an array of dtype {array.dtype} — give uint8, uint16 or float "
            "(0..1) pixels"
        )

    def to_pixels(self, x: np.ndarray, data_range: float) -> np.ndarray:
        """Network output (float, 0..data_range) → this format, rounded half to even."""
        return self.cast(np.clip(x, 0.0, data_range) * np.float32(self.peak / data_range))

    def cast(self, v: np.ndarray) -> np.ndarray:
        """Float values in ``0..peak`` → this dtype (rounded half to even and saturated)."""
        if np.issubdtype(self.dtype, np.floating):
            return v.astype(self.dtype)
        return np.clip(np.round(v), 0.0, self.peak).astype(self.dtype)


class Upscaler:
    """A loaded engine bundle that upscales images; see the module docstring."""

    def __init__(
        self,
        bundle: Bundle,
        session: EngineSession,
        graph: onnx.ModelProto,
        max_memory: int,
        engine_graph: onnx.ModelProto | None = None,
    ) -> None:
        """``graph``: the bundle's fp32 ONNX (receptive field, memory); ``engine_graph``: the
        ONNX graph the engine runs, where ONNX Runtime runs one (``ort-*``), for tile-exact
        resizing."""
        m = bundle.manifest
        self.bundle = bundle
        self.session = session
        self.scale = m.scale
        self.data_range = m.data_range
        self.bgr = m.bgr
        self.min_hw: tuple[int, int] = m.export.min_hw
        self.max_hw: tuple[int, int] | None = m.profile.max
        self.field: ReceptiveField = receptive_field(graph)
        self.bytes_per_pixel = MEMORY_SLACK * bytes_per_lr_pixel(graph)
        self.max_memory = max_memory
        self._geometry: _ExactResizeTiles | None = None
        if self.field.size_dependent_nodes and engine_graph is not None:
            known = self.field if engine_graph is graph else None
            self._geometry = _ExactResizeTiles.of(engine_graph, known)

    @property
    def exact_tiles(self) -> bool:
        """Whether tiles reproduce the untiled output (to float rounding)."""
        only_resizes = not (self.field.global_nodes or self.field.unknown_nodes)
        return self.field.exact or (only_resizes and self._geometry is not None)

    def describe_tiling(self) -> str:
        """One sentence: the receptive field and whether tiles are exact, and why."""
        f = self.field
        if not self.exact_tiles:
            return f.describe()
        radius = (
            f"±{f.radius[0]}" if f.radius[0] == f.radius[1] else f"±{f.radius[0]}×{f.radius[1]}"
        )
        text = f"receptive field {radius} LR pixels, windows aligned to {max(f.alignment)}"
        if f.size_dependent_nodes:
            text += (
                f"; {len(f.size_dependent_nodes)} Resize nodes sample at positions that depend "
                "on the image size, and tiles give them the whole image's positions"
            )
        return text + ": tiles equal the untiled output"

    @property
    def name(self) -> str:
        return f"{self.bundle.manifest.name} ({self.bundle.manifest.target})"

    # ---------------------------------------------------------------------------- planning

    def _fits_profile(self, h: int, w: int) -> bool:
        if self.max_hw is None:
            return True
        big, small = max(self.max_hw), min(self.max_hw)
        return max(h, w) <= big and min(h, w) <= small

    def _fits_memory(self, h: int, w: int, budget: int) -> bool:
        return self.bytes_per_pixel * h * w <= budget

    def plan(
        self,
        height: int,
        width: int,
        tile: int | None = None,
        overlap: int | None = None,
        max_memory: int | None = None,
    ) -> TilePlan:
        """Decide untiled or tiled for an LR image of ``height × width``.

        ``tile``: force tiles of this core size (LR pixels); ``overlap``: override the
        receptive field (LR pixels per side). Raises :class:`TilingError` when tiles are
        needed but cannot reproduce the untiled output and ``tile`` was not given. An image
        smaller than the network's minimum input is planned at that minimum: :meth:`run`
        mirrors it up to it and crops the output back.
        """
        height, width = max(height, self.min_hw[0]), max(width, self.min_hw[1])
        budget = max_memory if max_memory is not None else self.max_memory
        radius = (overlap, overlap) if overlap is not None else self.field.radius
        if tile is None:
            if self._fits_profile(height, width) and self._fits_memory(height, width, budget):
                whole = Tile(core=(0, height, 0, width), window=(0, height, 0, width))
                return TilePlan((whole,), None, (0, 0), "fits the profile and memory")
            why = (
                f"{height}×{width} exceeds the engine's profile (max {self.max_hw})"
                if not self._fits_profile(height, width)
                else f"{height}×{width} needs ~{self._gib(height * width)} GiB, above the "
                f"{budget / 2**30:.1f} GiB budget"
            )
            if self.field.global_nodes or self.field.unknown_nodes:
                raise TilingError(
                    f"{self.name} needs tiles for this image ({why}), but tiles cannot "
                    f"reproduce its untiled output: {self.field.describe()} — raise the "
                    "memory budget (--max-memory) if the image fits, or pass --tile N to "
                    "accept an approximate result."
                )
            tile = self._largest_tile(radius, budget)
        else:
            why = f"--tile {tile} requested"
        tiles = plan_tiles(height, width, tile, radius, self.field.alignment, self.min_hw)
        if not self.exact_tiles:
            log.warning("%s: tiled output is approximate — %s", self.name, self.field.describe())
        return TilePlan(tuple(tiles), tile, radius, why)

    def _gib(self, pixels: int) -> str:
        return f"{self.bytes_per_pixel * pixels / 2**30:.1f}"

    def _largest_tile(self, radius: tuple[int, int], budget: int) -> int:
        """Largest core (multiple of the alignment) whose window fits profile and budget."""
        step = max(self.field.alignment)
        pad = 2 * max(radius) + step  # overlap on both sides plus alignment slack
        side = int(math.sqrt(budget / self.bytes_per_pixel)) - pad
        if self.max_hw is not None:
            side = min(side, min(self.max_hw) - pad)
        tile = side // step * step
        if tile < step:
            raise TilingError(
                f"{self.name}: no tile fits — a tile needs at least {step + pad}² LR pixels "
                f"(receptive field ±{max(radius)}), i.e. ~{self._gib((step + pad) ** 2)} GiB; "
                f"the budget is {budget / 2**30:.2f} GiB — raise --max-memory."
            )
        return tile

    # ---------------------------------------------------------------------------- running

    def run(
        self,
        lr: np.ndarray,
        plan: TilePlan | None = None,
        on_tile: Callable[[], None] | None = None,
    ) -> np.ndarray:
        """1×3×H×W float32 in the model's input range (RGB) → 1×3×sH×sW, tiled per ``plan``."""
        _, _, h, w = lr.shape
        plan = plan or self.plan(h, w)
        mh, mw = self.min_hw
        if h < mh or w < mw:  # padded (mirrored) to the minimum size, cropped back after
            lr = _mirror_up(lr, mh, mw)
        if plan.tiled:
            image_hw = (lr.shape[2], lr.shape[3])

            def run_window(window: np.ndarray, tile: Tile) -> np.ndarray:
                if self._geometry is None:
                    return self._engine_run(window, self.session.run)
                return self._engine_run(window, self._geometry.runner(tile, image_hw))

            out = run_tiled(run_window, lr, self.scale, plan.tiles, on_tile)
        else:
            out = self._engine_run(lr, self.session.run)
            if on_tile is not None:
                on_tile()
        return out[:, :, : h * self.scale, : w * self.scale]

    def _engine_run(self, x: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        x = np.ascontiguousarray(x[:, ::-1] if self.bgr else x, dtype=np.float32)
        y = np.asarray(run(x), dtype=np.float32)
        return np.ascontiguousarray(y[:, ::-1]) if self.bgr else y

    def upscale(
        self,
        image: np.ndarray | SourceImage | Sequence[np.ndarray | SourceImage],
        tile: int | None = None,
        overlap: int | None = None,
        max_memory: int | None = None,
        on_tile: Callable[[], None] | None = None,
    ) -> Any:
        """Upscale an image array (or a :class:`~esr_deploy.data.SourceImage`), or a list of
        same-size images as one batch (one engine call when the batch fits the engine's
        batch range and the memory budget untiled, else image by image).

        Returns the same kind: an array of the input's layout and dtype, or a SourceImage (a
        list of them for a list).
        """
        if isinstance(image, list | tuple):
            return self._upscale_batch(list(image), tile, overlap, max_memory)
        image = cast(np.ndarray | SourceImage, image)
        source = image if isinstance(image, SourceImage) else _as_source(image)
        h, w = source.rgb.shape[:2]
        result = self._upscale_source(source, self.plan(h, w, tile, overlap, max_memory), on_tile)
        return result if isinstance(image, SourceImage) else _as_array(result, image)

    def _upscale_batch(
        self, images: list[Any], tile: int | None, overlap: int | None, max_memory: int | None
    ) -> list[Any]:
        """Same-size images as one engine call (batch N) when the batch fits the engine's
        batch range and memory untiled; else one by one (same results, per image)."""
        sources = [i if isinstance(i, SourceImage) else _as_source(i) for i in images]
        sizes = {s.rgb.shape[:2] for s in sources} | {s.rgb.dtype.str for s in sources}
        if len(sizes) > 2:
            raise DataError(
                f"cannot upscale a list of images of different sizes or dtypes ({sizes}) as "
                "one batch — give images of one size and dtype, or call upscale per image"
            )
        n = len(sources)
        h, w = sources[0].rgb.shape[:2] if sources else (0, 0)
        budget = (max_memory if max_memory is not None else self.max_memory) // max(n, 1)
        plan = self.plan(h, w, tile, overlap, budget) if sources else None
        if plan is None or plan.tiled or n > self.max_batch:
            results = [self._upscale_source(s, self.plan(h, w, tile, overlap, max_memory))
                       for s in sources]  # fmt: skip
        else:
            lrs, fmt = zip(*(self._lr(s) for s in sources), strict=True)
            sr = self.run(np.concatenate(lrs), plan)
            results = [self._finish(s, fmt[i], sr[i]) for i, s in enumerate(sources)]
        return [r if isinstance(i, SourceImage) else _as_array(r, i)
                for r, i in zip(results, images, strict=True)]  # fmt: skip

    @property
    def max_batch(self) -> int:
        """The largest batch one engine call takes: the manifest's export.batch.max (1 for a
        bundle compiled before batches)."""
        batch = self.bundle.manifest.export.batch
        return batch.max if batch is not None else 1

    def _lr(self, source: SourceImage) -> tuple[np.ndarray, PixelFormat]:
        if source.rgb.dtype.kind == "f" and not np.isfinite(source.rgb).all():
            bad = int(np.count_nonzero(~np.isfinite(source.rgb)))
            raise DataError(
                f"cannot upscale an image with {bad} NaN or infinite values (of "
                f"{source.rgb.size}) — the network would return NaN there; replace them "
                "(e.g. numpy.nan_to_num) or clip the image to 0..1 first"
            )
        fmt = PixelFormat.of(source.rgb)
        lr = source.rgb.transpose(2, 0, 1)[None].astype(np.float32)
        if fmt.peak != self.data_range:
            lr *= np.float32(self.data_range / fmt.peak)
        return lr, fmt

    def _upscale_source(
        self, source: SourceImage, plan: TilePlan, on_tile: Callable[[], None] | None = None
    ) -> SourceImage:
        lr, fmt = self._lr(source)
        return self._finish(source, fmt, self.run(lr, plan, on_tile)[0])

    def _finish(self, source: SourceImage, fmt: PixelFormat, sr: np.ndarray) -> SourceImage:
        rgb = np.ascontiguousarray(fmt.to_pixels(sr, self.data_range).transpose(1, 2, 0))
        alpha = None
        if source.alpha is not None:
            a = imresize(source.alpha, float(self.scale))  # uint8 in, uint8 out
            alpha = a if a.dtype == source.alpha.dtype else PixelFormat.of(source.alpha).cast(a)
        return SourceImage(rgb, alpha, source.grey)

    def upscale_files(
        self,
        jobs: Sequence[UpscaleJob],
        tile: int | None = None,
        overlap: int | None = None,
        progress: Progress | None = None,
        on_skip: Callable[[str], None] | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """Upscale each job's image into its output file; returns (records, skipped count).

        A file that cannot be read, or an image that cannot be tiled, is skipped (its message
        goes to ``on_skip`` and the log) and the others go on.
        """
        progress = progress or NullProgress()
        records: list[dict[str, Any]] = []
        skipped = 0
        for job in jobs:
            try:
                source = read_source_image(job.input)
                h, w = source.rgb.shape[:2]
                plan = self.plan(h, w, tile, overlap)
                start = time.perf_counter()
                with progress.task(job.input.name, len(plan.tiles)) as advance:
                    result = self._upscale_source(source, plan, advance)
                seconds = time.perf_counter() - start
                write_image(job.output, result)
            except (DataError, TilingError) as exc:
                skipped += 1
                if on_skip is not None:
                    on_skip(str(exc))
                else:
                    log.warning("skipped %s: %s", job.input, exc)
                continue
            records.append(
                {
                    "input": str(job.input),
                    "output": str(job.output),
                    "lr": [h, w],
                    "sr": list(result.rgb.shape[:2]),
                    "kind": source.kind,
                    "tiles": len(plan.tiles) if plan.tiled else 0,
                    "plan": (
                        f"{len(plan.tiles)} tiles of {plan.tile} (overlap {plan.overlap[0]}"
                        f"×{plan.overlap[1]}; {plan.reason})"
                        if plan.tiled
                        else "untiled"
                    ),
                    "seconds": seconds,
                }
            )
        return records, skipped


@dataclass(frozen=True)
class UpscaleJob:
    input: Path
    output: Path


def upscale_jobs(inputs: Sequence[Path], out_dir: Path) -> list[UpscaleJob]:
    """One job per image: files as given, folders searched recursively for images.

    Outputs are PNG files under ``out_dir`` (a folder's images keep their relative paths).
    Refuses, before any work, inputs that do not exist, an output folder that is a file, and
    two inputs that would be written to the same file or over an input.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file, not a folder — choose a folder.")
    jobs: list[UpscaleJob] = []
    for given in inputs:
        if given.is_dir():
            found = sorted(
                p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise DataError(
                    f"no images in folder {given} — it has no {', '.join(IMAGE_EXTENSIONS)} files"
                )
            jobs += [
                UpscaleJob(p, out_dir / given.name / p.relative_to(given).with_suffix(".png"))
                for p in found
            ]
        elif given.exists():
            jobs.append(UpscaleJob(given, out_dir / f"{given.stem}.png"))
        else:
            raise DataError(f"no such file or folder: {given} — check the path.")
    inputs_resolved = {j.input.resolve() for j in jobs}
    seen: dict[Path, Path] = {}
    for job in jobs:
        target = job.output.resolve()
        if target in seen:
            raise EsrDeployError(
                f"{seen[target]} and {job.input} would both be written to {job.output} — "
                "upscale them into different --out folders or rename one."
            )
        if target in inputs_resolved:
            raise EsrDeployError(
                f"{job.output} would overwrite an input image — choose another --out folder."
            )
        seen[target] = job.input
    return jobs


class _ExactResizeTiles:
    """ONNX Runtime session of the engine's graph with explicit-position resizes (tiles)."""

    def __init__(self, graph: onnx.ModelProto, nodes: tuple[str, ...]) -> None:
        rewritten, sites = explicit_resize(graph, nodes)
        self.geometry = ResizeGeometry(graph, sites)
        self.input_name = graph.graph.input[0].name
        self._bytes = rewritten.SerializeToString()
        self._session: Any = None

    @classmethod
    def of(
        cls, graph: onnx.ModelProto, field: ReceptiveField | None = None
    ) -> _ExactResizeTiles | None:
        """For ``graph`` (whose receptive field is ``field``, computed if not given) if all
        its size-dependent resizes can be rewritten, else None."""
        field = field or receptive_field(graph)
        nodes = {n.name: n for n in graph.graph.node}
        if not field.size_dependent_nodes or not all(
            name in nodes and rewritable(nodes[name]) for name in field.size_dependent_nodes
        ):
            return None
        return cls(graph, field.size_dependent_nodes)

    def runner(self, tile: Tile, image_hw: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
        if self._session is None:
            from esr_deploy.backends.onnxruntime import cpu_session

            self._session = cpu_session(self._bytes)
        feeds = self.geometry.rois(tile.window, image_hw)

        def run(x: np.ndarray) -> np.ndarray:
            return np.asarray(self._session.run(None, {self.input_name: x, **feeds})[0])

        return run


def _engine_graph(bundle: Bundle, reference: onnx.ModelProto) -> onnx.ModelProto | None:
    """The ONNX graph an ONNX Runtime CPU engine runs, rebuilt from the bundle, or None;
    ``reference`` is the bundle's fp32 ONNX (what an fp32 engine runs)."""
    m = bundle.manifest
    if m.backend != "onnxruntime":
        return None
    if m.precision == "fp32":
        return reference
    if m.precision == "int8" and m.precision_onnx is not None and m.precision_onnx.onnx:
        from esr_deploy.backends.onnxruntime import lower_int8_activations

        return lower_int8_activations(onnx.load(str(bundle.file(m.precision_onnx.onnx))))
    return None


def _mirror_up(lr: np.ndarray, min_h: int, min_w: int) -> np.ndarray:
    """``lr`` (N×C×H×W) mirrored at its bottom/right edges up to ``min_h × min_w``; mirroring
    repeats when the image is thinner than the padding (a 1-pixel-wide image repeats its
    column)."""
    while lr.shape[2] < min_h or lr.shape[3] < min_w:
        pad_h = min(max(0, min_h - lr.shape[2]), lr.shape[2])
        pad_w = min(max(0, min_w - lr.shape[3]), lr.shape[3])
        lr = np.pad(lr, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), "symmetric")
    return lr


def _as_source(array: np.ndarray) -> SourceImage:
    array = np.asarray(array)
    if array.size == 0:
        raise DataError(
            f"cannot upscale an empty array (shape {array.shape}) — give an image of at least "
            "1×1 pixels"
        )
    if array.ndim == 2:
        return SourceImage(np.repeat(array[:, :, None], 3, axis=2), None, grey=True)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            return SourceImage(np.repeat(array, 3, axis=2), None, grey=True)
        alpha = array[:, :, 3].copy() if array.shape[2] == 4 else None
        return SourceImage(np.ascontiguousarray(array[:, :, :3]), alpha, grey=False)
    raise DataError(
        f"cannot upscale an array of shape {array.shape} — give H×W (grey), H×W×3 (RGB) or "
        "H×W×4 (RGBA) pixels"
    )


def _as_array(result: SourceImage, like: np.ndarray) -> np.ndarray:
    rgb = result.rgb
    if result.grey:
        plane = grey_from_rgb(rgb)
        return plane if like.ndim == 2 else plane[:, :, None]
    if result.alpha is not None:
        return np.dstack([rgb, result.alpha])
    return rgb


def load(
    bundle: str | Path,
    max_memory: int | None = None,
    verify: bool = True,
    digest: str | None = None,
) -> Upscaler:
    """Load an engine bundle for upscaling through the strict reader
    (:func:`esr_deploy.runtime.bundle_reader.open_bundle`: paths, checksums, facts), with
    the backend version and CPU checked.

    ``max_memory``: bytes one engine call may use (default: half of the memory available
    now); larger images are tiled. ``digest``: the ``sha256:…`` the caller pinned.
    """
    loaded = open_bundle(bundle, digest=digest, verify=verify)
    manifest = loaded.manifest
    _, backend = require_available(manifest.target)
    backend.check_engine(manifest)
    session = backend.load(loaded.engine_path, manifest.engine.settings)
    graph = onnx.load(str(loaded.file(manifest.reference_onnx)))
    budget = max_memory or int(DEFAULT_MEMORY_FRACTION * available_memory())
    return Upscaler(loaded, session, graph, budget, _engine_graph(loaded, graph))
