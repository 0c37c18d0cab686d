"""Tile-exact resizing: give size-dependent Resize nodes the whole image's sampling positions.

Some networks resize a tensor back to the size of another one (RLFN's and RFDN's ESA:
``F.interpolate(c3, size=x.shape[2:], mode="bilinear")`` after a stride-6 branch). With
``half_pixel`` coordinates, output pixel ``I`` of a resize from ``n`` to ``N`` samples the
input at ``s(I) = (I + ½) · n / N − ½``: the scale ``n / N`` depends on the image size (for
RLFN ``n = ⌊(⌊(N − 3)/2⌋ + 1 − 7)/3⌋ + 1``, never exactly ``N/6``), so a tile of another size
samples at other positions than the whole image does, whatever the overlap. On a 1080×1920
frame the shift reaches several LR pixels at the far side.

The rewrite here makes the positions explicit. Each such ``Resize(X, sizes=S)`` (linear,
``half_pixel``/``pytorch_half_pixel``) becomes::

    Xp = Pad(X, 1 pixel on each side of H and W, mode="edge")
    Y  = Resize(Xp, roi=<input>, sizes=S, mode="linear", "tf_crop_and_resize")

``tf_crop_and_resize`` samples output ``i`` at ``x(i) = a·(L − 1) + i·(b − a)·(L − 1)/(N' − 1)``
(``L = n' + 2`` the padded local input size, ``N'`` the local output size, ``a``/``b`` the
roi). For a window whose local pixel 0 is global pixel ``o_in`` of ``X`` and ``o_out`` of
``Y``, and a whole image where ``X`` has ``n`` and ``Y`` has ``N`` pixels, the global sample
position of local output ``i`` in local (padded) input coordinates is
``x(i) = (i + o_out + ½) · n/N − ½ − o_in + 1``, so
``a = ((o_out + ½) · n/N + ½ − o_in) / (L − 1)`` and ``b = a + (n/N) · (N' − 1)/(L − 1)``.
The edge padding reproduces ``half_pixel``'s clamping at the image border (a window that
touches a border has ``o = 0`` there, or ends where the image ends); samples that fall
outside a window's data land in its overlap, which is discarded.

The sizes come from ONNX shape inference (with data propagation) at three input sizes: the
window, the whole image, and the window moved to its origin (``o_in`` = the size gained by
``X`` when the input grows by the window's origin, which is a multiple of the network's
alignment, so the strided ops' grids coincide). With the window equal to the image the
rewrite computes the original resize (to float rounding; tested).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

#: coordinate modes whose positions are ``(I + ½) · n/N − ½`` (pytorch_half_pixel differs
#: only for outputs of length 1, which a tile never has)
_HALF_PIXEL = (b"half_pixel", b"pytorch_half_pixel")


@dataclass(frozen=True)
class ResizeSite:
    """One rewritten Resize: its input and output tensors and its new roi graph input."""

    node: str
    source: str  # X
    output: str  # Y
    roi_input: str


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def rewritable(node: onnx.NodeProto) -> bool:
    """A 4-D-style linear half-pixel Resize driven by ``sizes`` (what the rewrite handles)."""
    return (
        node.op_type == "Resize"
        and len(node.input) >= 4
        and bool(node.input[3])
        and _attr(node, "mode", b"nearest") == b"linear"
        and _attr(node, "coordinate_transformation_mode", b"half_pixel") in _HALF_PIXEL
        and not _attr(node, "antialias", 0)
    )


def explicit_resize(
    model: onnx.ModelProto, nodes: Sequence[str]
) -> tuple[onnx.ModelProto, tuple[ResizeSite, ...]]:
    """A copy of ``model`` whose Resize nodes named in ``nodes`` (and :func:`rewritable`)
    take their sampling positions from a new float ``[8]`` graph input each."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(nodes)
    pads_name = "esr_tile_resize_pads"
    sites: list[ResizeSite] = []
    new_nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.name not in wanted or not rewritable(node):
            new_nodes.append(node)
            continue
        roi = f"{node.name}_tile_roi"
        padded = f"{node.input[0]}_tile_padded_{len(sites)}"
        new_nodes.append(
            helper.make_node(
                "Pad", [node.input[0], pads_name], [padded], mode="edge", name=f"{node.name}_pad"
            )
        )
        new_nodes.append(
            helper.make_node(
                "Resize",
                [padded, roi, "", node.input[3]],
                list(node.output),
                name=node.name,
                mode="linear",
                coordinate_transformation_mode="tf_crop_and_resize",
                extrapolation_value=0.0,
            )
        )
        out.graph.input.append(helper.make_tensor_value_info(roi, TensorProto.FLOAT, [8]))
        sites.append(ResizeSite(node.name, node.input[0], node.output[0], roi))
    if sites:
        out.graph.initializer.append(
            numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), pads_name)
        )
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out, tuple(sites)


class ResizeGeometry:
    """The roi of every rewritten Resize for a window of an image (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, sites: Sequence[ResizeSite]) -> None:
        self._model = model.SerializeToString()
        self.sites = tuple(sites)
        self._sizes = lru_cache(maxsize=64)(self._infer)

    def _infer(self, h: int, w: int) -> dict[str, tuple[int, int]]:
        """Spatial size of every site's input and output for an LR input of ``h × w``."""
        model = onnx.ModelProto.FromString(self._model)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for i, value in ((2, h), (3, w)):
            dims[i].ClearField("dim_param")
            dims[i].dim_value = value
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        found: dict[str, tuple[int, int]] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.output]:
            d = info.type.tensor_type.shape.dim
            if len(d) == 4 and d[2].HasField("dim_value") and d[3].HasField("dim_value"):
                found[info.name] = (d[2].dim_value, d[3].dim_value)
        missing = [t for s in self.sites for t in (s.source, s.output) if t not in found]
        if missing:
            raise ValueError(f"shape inference left {missing} without a static size at {h}×{w}")
        return found

    def rois(
        self, window: tuple[int, int, int, int], image_hw: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        """Graph inputs for a window ``(y0, y1, x0, x1)`` of an image of ``image_hw``."""
        y0, y1, x0, x1 = window
        local = self._sizes(y1 - y0, x1 - x0)
        whole = self._sizes(*image_hw)
        moved = self._sizes(y1, x1)  # the window grown back to the image's origin
        feeds: dict[str, np.ndarray] = {}
        for site in self.sites:
            a: list[float] = []
            b: list[float] = []
            for axis in (0, 1):
                n_local = local[site.source][axis]
                out_local = local[site.output][axis]
                o_in = moved[site.source][axis] - n_local
                o_out = moved[site.output][axis] - out_local
                ratio = whole[site.source][axis] / whole[site.output][axis]
                span = n_local + 1  # padded length − 1
                start = ((o_out + 0.5) * ratio + 0.5 - o_in) / span
                a.append(start)
                b.append(start + ratio * (out_local - 1) / span)
            feeds[site.roi_input] = np.array([0, 0, a[0], a[1], 1, 1, b[0], b[1]], np.float32)
        return feeds
