"""Tile-exact resizing on a small ESA-like graph run by ONNX Runtime.

The graph gates its input with a map computed at 1/6 resolution (stride-2 conv, stride-3 max
pool) and resized back to the input's size, as RLFN's ESA does: the case where tiles of
another size sample at other positions than the whole image.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from esr_deploy.backends.onnxruntime import cpu_session
from esr_deploy.runtime.resize_geometry import ResizeGeometry, explicit_resize, rewritable
from esr_deploy.runtime.tiling import Tile, plan_tiles, receptive_field, run_tiled


def _esa_graph(mode: str = "linear") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (3, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2]),
        helper.make_node("MaxPool", ["c1"], ["p"], kernel_shape=[7, 7], strides=[3, 3]),
        helper.make_node("Conv", ["p", "w2"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "from", "to"], ["hw"]),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["c3", "", "", "sizes"],
            ["up"],
            name="esa_resize",
            mode=mode,
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Sigmoid", ["up"], ["gate"]),
        helper.make_node("Mul", ["x", "gate"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([2], np.int64), "from"),
        numpy_helper.from_array(np.array([4], np.int64), "to"),
        numpy_helper.from_array(np.array([1, 3], np.int64), "nc"),
    ]
    graph = helper.make_graph(
        nodes,
        "esa",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def esa() -> tuple[onnx.ModelProto, onnx.ModelProto, ResizeGeometry]:
    model = _esa_graph()
    rewritten, sites = explicit_resize(model, ("esa_resize",))
    assert [s.node for s in sites] == ["esa_resize"]
    assert [i.name for i in rewritten.graph.input] == ["x", "esa_resize_tile_roi"]
    onnx.checker.check_model(rewritten)
    return model, rewritten, ResizeGeometry(model, sites)


def test_whole_image_geometry_is_the_original_resize(
    esa: tuple[onnx.ModelProto, onnx.ModelProto, ResizeGeometry],
) -> None:
    model, rewritten, geometry = esa
    x = np.random.default_rng(1).random((1, 3, 97, 131), dtype=np.float32)
    original = cpu_session(model.SerializeToString(), threads=1).run(None, {"x": x})[0]
    feeds = {"x": x, **geometry.rois((0, 97, 0, 131), (97, 131))}
    again = cpu_session(rewritten.SerializeToString(), threads=1).run(None, feeds)[0]
    assert np.abs(again - original).max() <= 1e-5


def test_tiles_are_exact_only_with_the_whole_image_geometry(
    esa: tuple[onnx.ModelProto, onnx.ModelProto, ResizeGeometry],
) -> None:
    model, rewritten, geometry = esa
    field = receptive_field(model)
    assert field.size_dependent_nodes == ("esa_resize",) and field.alignment == (6, 6)
    x = np.random.default_rng(2).random((1, 3, 200, 171), dtype=np.float32)
    plain = cpu_session(model.SerializeToString(), threads=1)
    explicit = cpu_session(rewritten.SerializeToString(), threads=1)
    whole = plain.run(None, {"x": x})[0]
    for tile in (48, 64, 100):  # none divides 200 or 171
        tiles = plan_tiles(200, 171, tile, field.radius, field.alignment, (15, 15))
        assert any(t.window != (0, 200, 0, 171) for t in tiles)

        def exact(win: np.ndarray, t: Tile) -> np.ndarray:
            feeds = {"x": win, **geometry.rois(t.window, (200, 171))}
            return np.asarray(explicit.run(None, feeds)[0])

        def as_is(win: np.ndarray, _: Tile) -> np.ndarray:
            return np.asarray(plain.run(None, {"x": win})[0])

        assert np.abs(run_tiled(exact, x, 1, tiles) - whole).max() <= 1e-5, tile
        assert np.abs(run_tiled(as_is, x, 1, tiles) - whole).max() > 1e-3, tile


def test_only_linear_half_pixel_resizes_by_size_are_rewritten() -> None:
    assert rewritable(next(n for n in _esa_graph().graph.node if n.op_type == "Resize"))
    cubic = _esa_graph(mode="cubic")
    node = next(n for n in cubic.graph.node if n.op_type == "Resize")
    assert not rewritable(node)
    unchanged, sites = explicit_resize(cubic, ("esa_resize",))
    assert sites == () and len(unchanged.graph.input) == 1
