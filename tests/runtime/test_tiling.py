"""Tiling: receptive fields read from ONNX graphs (handmade and exported by the real exporter),
tile planning, and tiled == untiled with ONNX Runtime — exactly at the computed radius, not at
one pixel less; within PSNR for RLFN, whose ESA resizes to a size read from a shape."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from esr_deploy.backends.onnxruntime import cpu_session
from esr_deploy.checkpoint import load_checkpoint, load_weights
from esr_deploy.data import read_image
from esr_deploy.errors import EsrDeployError, TilingError
from esr_deploy.export import InputRange, export_onnx
from esr_deploy.precision.fp16 import convert_fp16
from esr_deploy.precision.int8 import name_nodes, quantize_int8
from esr_deploy.recipe import find_recipe
from esr_deploy.runtime.tiling import ReceptiveField, Tile, plan_tiles, receptive_field, run_tiled
from esr_deploy.zoo.imdn import IMDN
from esr_deploy.zoo.rlfn import RLFN

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


# --------------------------------------------------------------------------------------------
# Handmade graphs
# --------------------------------------------------------------------------------------------


class Graph:
    """A small ONNX graph builder: input ``lr`` (1×3×H×W, H and W symbolic), seeded weights."""

    def __init__(self, channels: int = 3) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.channels = {"lr": channels}
        self.rng = np.random.default_rng(7)

    def const(self, values: Sequence[float] | np.ndarray, dtype: type = np.int64) -> str:
        name = f"const{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str = "", **attrs: object) -> str:
        name = name or f"{op.lower()}{len(self.nodes)}"
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        if inputs and inputs[0] in self.channels:
            self.channels[out] = self.channels[inputs[0]]
        return out

    def conv(self, x: str, cout: int, k: int, name: str = "", **attrs: object) -> str:
        cin = self.channels[x] // int(attrs.get("group", 1))  # type: ignore[call-overload]
        w = self.const(self.rng.normal(0, 0.3, (cout, cin, k, k)), np.float32)
        b = self.const(self.rng.normal(0, 0.1, cout), np.float32)
        out = self.node("Conv", [x, w, b], name, kernel_shape=[k, k], **attrs)
        self.channels[out] = cout
        return out

    def model(self, out: str, opset: int = 18, domains: Sequence[str] = ()) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("lr", FLOAT, [1, self.channels["lr"], "H", "W"])],
            [helper.make_tensor_value_info(out, FLOAT, ["N", "C", "OH", "OW"])],
            initializer=self.inits,
        )
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


def session_runner(
    model: onnx.ModelProto | Path, crop_to_scale: int = 0
) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime on one thread; ``crop_to_scale``: crop the output to scale × the input
    (graphs with a stride-2 conv and a 2x resize return one row more for odd sizes)."""
    source = model if isinstance(model, Path) else model.SerializeToString()
    session = cpu_session(source, threads=1, optimize=False)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        out = session.run(None, {name: x})[0]
        if crop_to_scale:
            out = out[:, :, : x.shape[2] * crop_to_scale, : x.shape[3] * crop_to_scale]
        return out

    return run


def tiled_error(
    run: Callable[[np.ndarray], np.ndarray],
    lr: np.ndarray,
    scale: int,
    tile: int,
    overlap: int | tuple[int, int],
    alignment: tuple[int, int] = (1, 1),
    reference: np.ndarray | None = None,
) -> float:
    """Largest |tiled - untiled| over the output."""
    ov = (overlap, overlap) if isinstance(overlap, int) else overlap
    tiles = plan_tiles(lr.shape[2], lr.shape[3], tile, ov, alignment)
    ref = run(lr) if reference is None else reference
    return float(np.max(np.abs(run_tiled(lambda x, _: run(x), lr, scale, tiles) - ref)))


def assert_radius_is_tight(
    model: onnx.ModelProto, rf: ReceptiveField, scale: int, hw: tuple[int, int] = (41, 46)
) -> None:
    """Tiled == untiled with the computed radius and alignment; not with one pixel less."""
    run = session_runner(model, crop_to_scale=scale)
    lr = np.random.default_rng(3).uniform(0, 1, (1, 3, *hw)).astype(np.float32)
    ref = run(lr)
    for tile in (7, 13, 20):
        assert tiled_error(run, lr, scale, tile, rf.radius, rf.alignment, ref) < 1e-5, tile
    less = (rf.radius[0] - 1, rf.radius[1] - 1)
    worst = max(tiled_error(run, lr, scale, t, less, rf.alignment, ref) for t in (7, 13))
    assert worst > 1e-4, "radius - 1 still gives the untiled output: the radius is not tight"


def conv_stack(n: int = 3) -> onnx.ModelProto:
    g = Graph()
    x = "lr"
    for i in range(n):
        x = g.conv(x, 3 if i == n - 1 else 8, 3, pads=[1, 1, 1, 1])
    return g.model(x)


def test_three_stacked_3x3_convs_have_radius_3() -> None:
    model = conv_stack(3)
    rf = receptive_field(model)
    assert rf.radius == (3, 3)
    assert rf.alignment == (1, 1)
    assert rf.exact
    assert rf.global_nodes == rf.size_dependent_nodes == rf.unknown_nodes == ()
    assert rf.describe() == "receptive field ±3 LR pixels, alignment 1; exact"
    assert_radius_is_tight(model, rf, scale=1)


@pytest.mark.parametrize(
    ("attrs", "k", "radius"),
    [
        ({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, 3, 2 + 1),  # dilated 3x3 reaches 2
        ({"pads": [3, 1, 3, 1], "dilations": [3, 1]}, 3, 3 + 1),  # rows dilated only
        ({"pads": [0, 0, 2, 2]}, 3, 2 + 1),  # all the padding at the end: reads i..i+2
        ({"auto_pad": "SAME_UPPER"}, 4, 2 + 1),  # even kernel: pads 1 before, 2 after
        ({"auto_pad": "SAME_LOWER"}, 4, 2 + 1),  # pads 2 before, 1 after
        ({"pads": [1, 1, 1, 1], "group": 3}, 3, 1 + 1),  # depthwise
    ],
)
def test_conv_reach_follows_dilation_pads_and_auto_pad(
    attrs: dict[str, object], k: int, radius: int
) -> None:
    g = Graph()
    first = g.conv("lr", 3, k, **attrs)
    model = g.model(g.conv(first, 3, 3, pads=[1, 1, 1, 1]))
    rf = receptive_field(model)
    want_cols = radius if attrs.get("dilations") != [3, 1] else 1 + 1
    assert rf.radius == (radius, want_cols)
    assert rf.exact
    assert_radius_is_tight(model, rf, scale=1)


def strided_then_resized(mode: str, **resize_attrs: object) -> onnx.ModelProto:
    g = Graph()
    down = g.conv("lr", 8, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    scales = g.const([1.0, 1.0, 2.0, 2.0], np.float32)
    up = g.node("Resize", [down, "", scales], "up", mode=mode, **resize_attrs)
    return g.model(g.conv(up, 3, 1))


@pytest.mark.parametrize(
    ("mode", "attrs", "radius"),
    [
        # output 2m reads conv m (LR 2m-1..2m+1), output 2m+1 reads conv m too (LR 2m-1..2m+1)
        ("nearest", {}, 2),
        ("nearest", {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 2),
        ("linear", {}, 3),  # half-pixel: output 2m reads conv m-1, m: LR 2m-3 .. 2m+1
        ("cubic", {}, 5),
    ],
)
def test_stride_2_conv_then_2x_resize_needs_alignment_2(
    mode: str, attrs: dict[str, object], radius: int
) -> None:
    model = strided_then_resized(mode, **attrs)
    rf = receptive_field(model)
    assert rf.radius == (radius, radius)
    assert rf.alignment == (2, 2)
    assert rf.exact
    assert_radius_is_tight(model, rf, scale=1)
    # windows starting at odd pixels see the other sampling grid of the strided conv
    run = session_runner(model, crop_to_scale=1)
    lr = np.random.default_rng(5).uniform(0, 1, (1, 3, 41, 46)).astype(np.float32)
    assert tiled_error(run, lr, 1, 7, rf.radius, (1, 1)) > 1e-3


@pytest.mark.parametrize(("opset", "op"), [(9, "Upsample"), (10, "Resize")])
def test_old_upsample_and_resize_10(opset: int, op: str) -> None:
    g = Graph()
    down = g.conv("lr", 8, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    up = g.node(op, [down, g.const([1.0, 1.0, 2.0, 2.0], np.float32)], mode="nearest")
    model = g.model(g.conv(up, 3, 1), opset=opset)
    rf = receptive_field(model)
    assert (rf.radius, rf.alignment, rf.exact) == ((2, 2), (2, 2), True)
    assert_radius_is_tight(model, rf, scale=1)


def test_global_average_pool_branch_is_global() -> None:
    g = Graph()
    f = g.conv("lr", 8, 3, pads=[1, 1, 1, 1])
    pooled = g.node("GlobalAveragePool", [f], "gap")
    gate = g.node("Sigmoid", [g.conv(pooled, 8, 1)])
    model = g.model(g.conv(g.node("Mul", [f, gate]), 3, 3, pads=[1, 1, 1, 1]))
    rf = receptive_field(model)
    assert rf.global_nodes == ("gap",)
    assert rf.radius == (2, 2)  # the spatial path still has its radius
    assert not rf.exact
    assert "`gap` (GlobalAveragePool) depends on the whole image" in rf.describe()


@pytest.mark.parametrize(
    ("axes", "is_global"), [([2, 3], True), ([3], True), ([1], False), ([], True)]
)
def test_reduce_mean_is_global_only_over_spatial_axes(axes: list[int], is_global: bool) -> None:
    g = Graph()
    f = g.conv("lr", 8, 3, pads=[1, 1, 1, 1])
    inputs = [f, g.const(axes)] if axes else [f]
    mean = g.node("ReduceMean", inputs, "mean", keepdims=1)
    model = g.model(g.conv(g.node("Sub", [f, mean]), 3, 3, pads=[1, 1, 1, 1]))
    rf = receptive_field(model)
    assert rf.global_nodes == (("mean",) if is_global else ())
    assert rf.radius == (2, 2)


@pytest.mark.parametrize("op", ["GridSample", "Flatten", "MysteryOp"])
def test_unknown_op_on_spatial_tensor_is_reported(op: str) -> None:
    g = Graph()
    f = g.conv("lr", 3, 3, pads=[1, 1, 1, 1])
    if op == "GridSample":
        grid = g.const(np.zeros((1, 8, 8, 2)), np.float32)
        odd = g.node("GridSample", [f, grid], "odd")
    elif op == "Flatten":
        odd = g.node("Flatten", [f], "odd", axis=2)
    else:
        node = helper.make_node("MysteryOp", [f], ["odd_out"], name="odd", domain="com.example")
        g.nodes.append(node)
        odd = "odd_out"
    model = g.model(odd, domains=["com.example"] if op == "MysteryOp" else [])
    rf = receptive_field(model)  # reported, not raised
    assert rf.unknown_nodes == ("odd",)
    assert not rf.exact
    assert "`odd`" in rf.describe() and "not understood" in rf.describe()


def shape_of(g: Graph, x: str, start: int, end: int) -> str:
    return g.node("Shape", [x], start=start, end=end)


def test_resize_to_the_shape_of_another_tensor_is_size_dependent() -> None:
    """RLFN's ESA in miniature: stride-2 conv, 7x7/3 max-pool, resize back to the input size."""
    g = Graph()
    f = g.conv("lr", 8, 3, pads=[1, 1, 1, 1])
    low = g.node("MaxPool", [g.conv(f, 8, 3, strides=[2, 2])], kernel_shape=[7, 7], strides=[3, 3])
    sizes = g.node("Concat", [g.const([1, 8]), shape_of(g, "lr", 2, 4)], axis=0)
    up = g.node(
        "Resize", [g.conv(low, 8, 3, pads=[1, 1, 1, 1]), "", "", sizes], "esa_up", mode="linear"
    )
    model = g.model(g.conv(g.node("Mul", [f, g.node("Sigmoid", [up])]), 3, 3, pads=[1, 1, 1, 1]))
    rf = receptive_field(model)
    assert rf.size_dependent_nodes == ("esa_up",)
    assert rf.alignment == (6, 6)
    assert rf.global_nodes == rf.unknown_nodes == ()
    # pooled element m covers LR 6m .. 6m+14; after the 3x3 conv 6m-6 .. 6m+20; the resize maps
    # output i to i/6 - 5/12 and reads two pooled elements: LR i-14 .. i+23; +1 +1 for the
    # first and last convs
    assert rf.radius == (25, 25)
    assert "`esa_up` (Resize) samples at positions that depend on the image size" in rf.describe()


def test_resize_to_twice_its_own_shape_is_exact() -> None:
    g = Graph()
    f = g.conv("lr", 3, 3, pads=[1, 1, 1, 1])
    hw = g.node("Mul", [shape_of(g, f, 2, 4), g.const([2])])
    sizes = g.node("Concat", [shape_of(g, f, 0, 2), hw], axis=0)
    model = g.model(g.node("Resize", [f, "", "", sizes], "up", mode="nearest"))
    rf = receptive_field(model)
    assert rf.exact
    assert rf.radius == (1, 1)
    assert_radius_is_tight(model, rf, scale=2)


def pixel_shuffle(g: Graph, x: str, r: int) -> str:
    """PyTorch's view/permute/view pixel shuffle with the sizes read from Shape."""
    c_out = g.node("Div", [shape_of(g, x, 1, 2), g.const([r * r])])
    h, w = shape_of(g, x, 2, 3), shape_of(g, x, 3, 4)
    split = g.node("Concat", [shape_of(g, x, 0, 1), c_out, g.const([r, r]), h, w], axis=0)
    six = g.node("Reshape", [x, split])
    moved = g.node("Transpose", [six], perm=[0, 1, 4, 2, 5, 3])
    hr = g.node("Mul", [h, g.const([r])])
    wr = g.node("Mul", [w, g.const([r])])
    merged = g.node("Concat", [shape_of(g, x, 0, 1), c_out, hr, wr], axis=0)
    return g.node("Reshape", [moved, merged])


def test_reshape_transpose_reshape_pixel_shuffle_is_depth_to_space() -> None:
    manual, d2s = Graph(), Graph()
    outs = []
    for g in (manual, d2s):
        f = g.conv(g.conv("lr", 8, 3, pads=[1, 1, 1, 1]), 27, 3, pads=[1, 1, 1, 1])
        outs.append(
            pixel_shuffle(g, f, 3)
            if g is manual
            else g.node("DepthToSpace", [f], blocksize=3, mode="CRD")
        )
    models = [manual.model(outs[0]), d2s.model(outs[1])]
    rf_manual, rf_d2s = (receptive_field(m) for m in models)
    assert rf_manual == rf_d2s
    assert rf_manual.radius == (2, 2) and rf_manual.exact
    assert_radius_is_tight(models[0], rf_manual, scale=3)


def test_pixel_unshuffle_multiplies_the_stride() -> None:
    g = Graph()
    x = g.conv("lr", 3, 3, pads=[1, 1, 1, 1])
    h = g.node("Div", [shape_of(g, x, 2, 3), g.const([2])])
    w = g.node("Div", [shape_of(g, x, 3, 4), g.const([2])])
    split = g.node("Concat", [g.const([1, 3]), h, g.const([2]), w, g.const([2])], axis=0)
    moved = g.node("Transpose", [g.node("Reshape", [x, split])], perm=[0, 1, 3, 5, 2, 4])
    merged = g.node("Concat", [g.const([1, 12]), h, w], axis=0)
    low = g.node("Reshape", [moved, merged])
    up = g.node("DepthToSpace", [g.conv(low, 12, 3, pads=[1, 1, 1, 1])], blocksize=2)
    rf = receptive_field(g.model(up))
    assert rf.alignment == (2, 2)
    assert rf.exact
    # 3x3 conv: ±1; on the 2×-strided grid a 3x3 conv reaches ±2 more, the 2×2 block 1 more
    assert rf.radius == (4, 4)


def test_reshape_that_merges_rows_and_columns_is_unknown() -> None:
    g = Graph()
    f = g.conv("lr", 3, 3, pads=[1, 1, 1, 1])
    flat = g.node("Reshape", [f, g.const([1, 3, -1])], "flatten_hw")
    model = g.model(g.node("Softmax", [flat], axis=1))
    assert receptive_field(model).unknown_nodes == ("flatten_hw",)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_padding_then_valid_convs(mode: str) -> None:
    g = Graph()
    padded = g.node("Pad", ["lr", g.const([0, 0, 2, 2, 0, 0, 2, 2])], mode=mode)
    f = g.conv(g.conv(padded, 8, 3), 3, 3)  # two valid 3x3: the size comes back
    model = g.model(f)
    rf = receptive_field(model)
    assert rf.radius == (2, 2) and rf.exact
    assert_radius_is_tight(model, rf, scale=1)


def test_pad_then_crop_back_is_tight() -> None:
    g = Graph()
    padded = g.node("Pad", ["lr", g.const([0, 0, 2, 2, 0, 0, 2, 2])])
    f = g.conv(padded, 3, 3, pads=[1, 1, 1, 1])
    crop = g.node("Slice", [f, g.const([2, 2]), g.const([-2, -2]), g.const([2, 3])])
    model = g.model(crop)
    rf = receptive_field(model)
    assert rf.radius == (1, 1) and rf.exact
    assert_radius_is_tight(model, rf, scale=1)


def test_crop_and_pad_back_zeroes_the_window_border() -> None:
    """conv1x1 → crop 1 → zero pad 1 → conv3x3 depends on ±1 pixel, but each window zeroes
    its own border, so the overlap must be 2: the crop counts as reaching outside."""
    g = Graph()
    f = g.conv("lr", 3, 1)
    crop = g.node("Slice", [f, g.const([1, 1]), g.const([-1, -1]), g.const([2, 3])])
    padded = g.node("Pad", [crop, g.const([0, 0, 1, 1, 0, 0, 1, 1])])
    model = g.model(g.conv(padded, 3, 3, pads=[1, 1, 1, 1]))
    rf = receptive_field(model)
    assert rf.radius == (2, 2) and rf.exact
    assert_radius_is_tight(model, rf, scale=1)


def test_conv_transpose_upsampler() -> None:
    g = Graph()
    f = g.conv("lr", 4, 3, pads=[1, 1, 1, 1])
    w = g.const(np.random.default_rng(1).normal(0, 0.3, (4, 3, 4, 4)), np.float32)
    up = g.node("ConvTranspose", [f, w], kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
    model = g.model(up)
    rf = receptive_field(model)
    assert rf.radius == (2, 2) and rf.alignment == (1, 1) and rf.exact
    assert_radius_is_tight(model, rf, scale=2)


def test_shape_arithmetic_and_constants_are_not_spatial() -> None:
    g = Graph()
    f = g.conv("lr", 3, 3, pads=[1, 1, 1, 1])
    ones = g.node(
        "ConstantOfShape",
        [shape_of(g, f, 0, 4)],
        value=numpy_helper.from_array(np.ones(1, np.float32)),
    )
    bias = g.node("Expand", [g.const([0.5], np.float32), shape_of(g, f, 0, 4)])
    model = g.model(g.node("Add", [g.node("Mul", [f, ones]), bias]))
    rf = receptive_field(model)
    assert rf.radius == (1, 1) and rf.exact


@pytest.mark.parametrize(("axis", "size_dependent"), [(2, True), (3, True), (1, False)])
def test_values_computed_from_the_image_size_are_size_dependent(
    axis: int, size_dependent: bool
) -> None:
    g = Graph()
    f = g.conv("lr", 3, 3, pads=[1, 1, 1, 1])
    dim = g.node("Cast", [shape_of(g, f, axis, axis + 1)], to=FLOAT)  # height, width, channels
    model = g.model(g.node("Div", [f, dim], "by_dim"))
    rf = receptive_field(model)
    assert rf.size_dependent_nodes == (("by_dim",) if size_dependent else ())
    if size_dependent:
        assert "`by_dim` (Div) uses values computed from the image size" in rf.describe()


def test_graph_without_image_output_is_refused() -> None:
    g = Graph()
    pooled = g.node("GlobalAveragePool", [g.conv("lr", 3, 3, pads=[1, 1, 1, 1])])
    with pytest.raises(TilingError, match="not an N×C×H×W image"):
        receptive_field(g.model(pooled))


# --------------------------------------------------------------------------------------------
# plan_tiles / run_tiled
# --------------------------------------------------------------------------------------------


def check_plan(
    tiles: list[Tile],
    h: int,
    w: int,
    tile: int,
    overlap: tuple[int, int],
    alignment: tuple[int, int],
    min_hw: tuple[int, int],
) -> None:
    """Cores partition the image; each window is its core plus the overlap, clipped, with
    the start aligned down, grown to ``min_hw`` only when it was smaller."""
    cover = np.zeros((h, w), np.int32)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        for axis, (c0, c1, w0, w1, n) in enumerate(
            [(y0, y1, *t.window[:2], h), (x0, x1, *t.window[2:], w)]
        ):
            ov, al, mn = overlap[axis], alignment[axis], min_hw[axis]
            assert c0 % tile == 0 and 0 < c1 - c0 <= tile and c1 == min(n, c0 + tile)
            assert w0 % al == 0 and 0 <= w0 and w1 <= n and w1 - w0 >= mn
            start, end = max(0, c0 - ov), min(n, c1 + ov)
            start -= start % al
            if end - start >= mn:
                assert (w0, w1) == (start, end)
            else:  # grown within the image, by less than one alignment step beyond min_hw
                assert w0 <= start and w1 >= end and w1 - w0 < mn + al
    assert cover.min() == cover.max() == 1, "cores must partition the image"


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap", "alignment", "min_hw"),
    [
        (150, 113, 37, (4, 4), (1, 1), (1, 1)),
        (150, 113, 64, (5, 3), (2, 3), (1, 1)),
        (150, 113, 100, (9, 9), (6, 6), (15, 15)),
        (113, 150, 200, (9, 9), (6, 6), (15, 15)),  # one tile
        (31, 17, 7, (0, 0), (1, 1), (15, 15)),  # windows grown to min_hw
        (16, 16, 6, (2, 2), (6, 6), (16, 16)),  # windows are the whole image
        (1, 1, 1, (3, 3), (1, 1), (1, 1)),
    ],
)
def test_plan_tiles_partitions_odd_sizes(
    h: int,
    w: int,
    tile: int,
    overlap: tuple[int, int],
    alignment: tuple[int, int],
    min_hw: tuple[int, int],
) -> None:
    tiles = plan_tiles(h, w, tile, overlap, alignment, min_hw)
    assert len(tiles) == -(-h // tile) * -(-w // tile)
    check_plan(tiles, h, w, tile, overlap, alignment, min_hw)


def test_plan_tiles_random_sizes() -> None:
    rng = np.random.default_rng(11)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        al = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
        tile = int(rng.integers(max(al), 40))
        ov = (int(rng.integers(0, 20)), int(rng.integers(0, 20)))
        mn = (int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1)))
        check_plan(plan_tiles(h, w, tile, ov, al, mn), h, w, tile, ov, al, mn)


def test_plan_tiles_window_values() -> None:
    tiles = plan_tiles(20, 10, 8, (3, 3), (6, 6))
    assert [t.core for t in tiles] == [
        (0, 8, 0, 8),
        (0, 8, 8, 10),
        (8, 16, 0, 8),
        (8, 16, 8, 10),
        (16, 20, 0, 8),
        (16, 20, 8, 10),
    ]
    # rows of the middle tile: 8-3 = 5 aligned down to 0; 16+3 = 19
    assert tiles[2].window == (0, 19, 0, 10)
    assert tiles[4].window == (12, 20, 0, 10)  # 16-3 = 13 → 12


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 10, 0, (1, 1)), "tile size 0"),
        ((10, 10, 4, (-1, 1)), "overlap"),
        ((10, 10, 4, (1, 1), (6, 6)), "smaller than the alignment"),
        ((10, 10, 8, (1, 1), (0, 1)), "alignment"),
        ((0, 10, 8, (1, 1)), "image size"),
        ((12, 40, 8, (1, 1), (1, 1), (15, 15)), "pad the image"),
    ],
)
def test_plan_tiles_refuses_bad_requests(args: tuple, match: str) -> None:
    with pytest.raises(TilingError, match=match) as info:
        plan_tiles(*args)
    assert isinstance(info.value, EsrDeployError)
    assert str(info.value).count(" — ") == 2  # what failed — what was seen — what to do


def nearest_x2(x: np.ndarray) -> np.ndarray:
    return x.repeat(2, axis=2).repeat(2, axis=3) * 2.0


def test_run_tiled_assembles_cores_and_reports_progress() -> None:
    lr = np.random.default_rng(0).uniform(size=(1, 3, 23, 17)).astype(np.float32)
    tiles = plan_tiles(23, 17, 5, (2, 2))
    calls: list[int] = []
    out = run_tiled(lambda x, _: nearest_x2(x), lr, 2, tiles, on_tile=lambda: calls.append(1))
    assert out.shape == (1, 3, 46, 34) and out.dtype == np.float32
    np.testing.assert_array_equal(out, nearest_x2(lr))
    assert len(calls) == len(tiles) == 20


def test_run_tiled_refuses_wrong_output_and_bad_tiles() -> None:
    lr = np.zeros((1, 3, 10, 10), np.float32)
    tiles = plan_tiles(10, 10, 4, (1, 1))
    with pytest.raises(TilingError, match="expected 1×C×"):
        run_tiled(lambda x, _: x, lr, 2, tiles)
    with pytest.raises(TilingError, match="exactly once"):
        run_tiled(lambda x, _: nearest_x2(x), lr, 2, tiles[:-1])
    with pytest.raises(TilingError, match="does not fit"):
        run_tiled(lambda x, _: nearest_x2(x), lr, 2, [Tile((0, 10, 0, 10), (0, 12, 0, 10))])


# --------------------------------------------------------------------------------------------
# Exported models
# --------------------------------------------------------------------------------------------


class ConvSR(nn.Module):
    """Plain convs (one dilated) and a pixel shuffle: radius 1 + 2 + 0 + 1 = 4 LR pixels."""

    def __init__(self, scale: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(12, 12, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(12, 12, 1),
            nn.Conv2d(12, 3 * scale * scale, 3, padding=1),
            nn.PixelShuffle(scale),
        )
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def conv_sr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("convsr") / "model.fp32.onnx"
    export_onnx(ConvSR().eval(), path, scale=3, data_range=1.0, input_range=InputRange((1, 1)))
    return path


def test_exported_conv_sr_tiles_exactly_at_its_radius(conv_sr: Path) -> None:
    rf = receptive_field(onnx.load(str(conv_sr)))
    assert rf.radius == (4, 4) and rf.alignment == (1, 1) and rf.exact
    run = session_runner(conv_sr)
    lr = np.random.default_rng(1).uniform(0, 1, (1, 3, 150, 113)).astype(np.float32)
    ref = run(lr)
    span = float(ref.max() - ref.min())
    for tile in (37, 64, 100):
        assert tiled_error(run, lr, 3, tile, rf.radius, rf.alignment, ref) <= 1e-5 * span, tile
        short = (rf.radius[0] - 1, rf.radius[1] - 1)
        assert tiled_error(run, lr, 3, tile, short, rf.alignment, ref) > 1e-3 * span, tile


def test_fp16_and_int8_forms_have_the_fp32_field(conv_sr: Path) -> None:
    fp32 = onnx.load(str(conv_sr))
    fp16 = convert_fp16(fp32, {}).model
    int8 = quantize_int8(name_nodes(fp32), amax=lambda _: 4.0).model
    ops16 = {n.op_type for n in fp16.graph.node}
    ops8 = {n.op_type for n in int8.graph.node}
    assert "Cast" in ops16 and {"QuantizeLinear", "DequantizeLinear"} <= ops8
    want = receptive_field(fp32)
    assert receptive_field(fp16) == want
    assert receptive_field(int8) == want


def test_imdn_contrast_attention_is_global(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = IMDN(num_blocks=1, feature_channels=16, distilled_channels=4, cca_reduction=4).eval()
    path = tmp_path / "imdn.onnx"
    export_onnx(model, path, scale=4, data_range=1.0, input_range=InputRange((1, 1)))
    proto = onnx.load(str(path))
    rf = receptive_field(proto)
    ops = dict(rf.op_types)
    assert len(rf.global_nodes) == 2  # the mean and the standard deviation of the CCA layer
    assert {ops[n] for n in rf.global_nodes} == {"ReduceMean"}
    assert rf.size_dependent_nodes == rf.unknown_nodes == ()
    assert rf.radius == (7, 7)  # fea_conv, c1..c4, LR_conv, upsampler: seven 3x3 convs
    assert not rf.exact and "depend on the whole image" in rf.describe()


@pytest.fixture(scope="module")
def rlfn(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = RLFN().eval()
    load_weights(model, load_checkpoint(shared_dir / "weights" / "rlfn_x4.pth"))
    path = tmp_path_factory.mktemp("rlfn") / "model.fp32.onnx"
    export_onnx(model, path, scale=4, data_range=255.0, input_range=InputRange((15, 15)))
    return path


def test_rlfn_field(rlfn: Path) -> None:
    rf = receptive_field(onnx.load(str(rlfn)))
    # per RLFB: three 3x3 convs (3) and ESA, whose stride-2 valid conv, 7x7/3 max-pool, 3x3
    # conv and half-pixel bilinear resize reach LR i-14 .. i+23 (see the handmade ESA test):
    # 26 to the right; 6 blocks + conv_1, conv_2 and the upsampler conv: 6·26 + 3
    assert rf.radius == (159, 159)
    assert rf.alignment == (6, 6)
    assert len(rf.size_dependent_nodes) == 6
    assert {t for _, t in rf.op_types} == {"Resize"}
    assert rf.global_nodes == rf.unknown_nodes == ()


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    a, b = np.clip(a / data_range, 0, 1), np.clip(b / data_range, 0, 1)
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def test_rlfn_tiled_matches_untiled_on_a_set14_crop(rlfn: Path, sr_data_dir: Path) -> None:
    """A 48×512 LR strip of Set14 `monarch`: columns are tiled (windows smaller than the image),
    rows fit one window. The ESA resize samples at positions that depend on the window size, so
    this is close, not exact; the error depends on the image's texture."""
    rf = receptive_field(onnx.load(str(rlfn)))
    data_range = find_recipe("rlfn_x4").data_range
    img = read_image(sr_data_dir / "Set14" / "HR" / "monarch.png")
    lr = np.ascontiguousarray(img[200:248, :512].transpose(2, 0, 1)[None], dtype=np.float32)
    lr *= data_range / 255.0
    run = session_runner(rlfn)
    ref = run(lr)
    scores = {}
    for tile in (100, 128, 150):
        tiles = plan_tiles(48, 512, tile, rf.radius, rf.alignment, (15, 15))
        assert max(t.window[3] - t.window[2] for t in tiles) < 512
        scores[tile] = psnr(run_tiled(lambda x, _: run(x), lr, 4, tiles), ref, data_range)
    assert min(scores.values()) >= 60.0, scores
    # windows whose start ignores the alignment sample the ESA's grid elsewhere
    tiles = plan_tiles(48, 512, 100, rf.radius, (1, 1), (15, 15))
    assert psnr(run_tiled(lambda x, _: run(x), lr, 4, tiles), ref, data_range) < scores[100] - 3
