"""One rule per ONNX op: how a node maps its spatial inputs' reaches to its outputs'.

A rule is ``rule(analysis, node)``: it reads the node's inputs' :class:`~.lattice.Spatial`
states from the :class:`~.analysis.Analysis`, computes the outputs' (the per-op math is in
:mod:`.lattice`: windows for Conv/pooling, pixel shuffles, resampling), and assigns them, or
raises :class:`~.ops.Unsupported` when it cannot interpret the node (the node is then listed
as unknown). :data:`RULES` maps op types to rules; the analysis looks a node up there and
nowhere else.

- Conv / MaxPool / AveragePool / LpPool: a window (explicit pads or ``auto_pad``; SAME pads that
  depend on ``n mod s`` make the node size-dependent).
- ConvTranspose: output ``o`` receives inputs ``(o + p − t·d)/s``, so ``a' = a/s``,
  ``lo' = lo + a·(p − (k − 1)·d)/s``, ``hi' = hi + a·p/s``.
- Pad and Slice shift the index: ``lo' = lo − a·p``, ``hi' = hi − a·p`` for a leading pad ``p``
  (a crop is a negative pad; any padding mode but ``wrap``).
- Element-wise ops (and Concat/Split/Gather on non-spatial axes) take the union of their
  spatial inputs' intervals; per-channel constants have no extent.
- Reductions, softmax and normalisations over a spatial axis, global pooling and
  instance/group normalisation depend on the whole image: the node is listed as global.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from fractions import Fraction
from typing import TYPE_CHECKING

import onnx

from esr_deploy.runtime.tiling.lattice import Reach, Spatial, resample, reshape_spatial, set_dim
from esr_deploy.runtime.tiling.ops import (
    AXES_INPUT_FROM,
    CONVS,
    ELEMENTWISE,
    GLOBAL_POOLS,
    PARAM_INPUTS,
    POOLS,
    REDUCES,
    WHOLE_IMAGE,
    Unsupported,
    attr,
    floats,
    int_attr,
    ints,
)
from esr_deploy.runtime.tiling.symbolic import ONE, Val, Vals, shape_range

if TYPE_CHECKING:
    from esr_deploy.runtime.tiling.analysis import Analysis

Rule = Callable[["Analysis", onnx.NodeProto], None]


def shape(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.spatial[node.input[0]]
    src = node.input[0]
    if node.op_type == "Size":
        an.size_tainted.add(node.output[0])
        return
    start, end = shape_range(node, state.rank)
    picked = range(state.rank)[start:end]
    an.values[node.output[0]] = [state.size(i, src) for i in picked]
    if any(state.dims[i][0] in ("y", "x") for i in picked):
        an.size_tainted.add(node.output[0])


def elementwise(an: Analysis, node: onnx.NodeProto) -> None:
    params = PARAM_INPUTS.get(node.op_type, ())
    if any(
        n in an.size_tainted and n not in an.spatial
        for k, n in enumerate(node.input)
        if k not in params
    ):
        an.mark(node, an.size_dependent)  # values computed from the image size
    states = [an.spatial[i] for i in node.input if i in an.spatial]
    merged = an.union(states, node)
    if node.op_type == "ReorderInput":  # NCHW(c) -> blocked NCHWc: 5-D, H/W stay at 2, 3
        dims = merged.dims
        if attr(node, "channels_last", 0):
            dims = (dims[0], dims[3], dims[1], dims[2])
        merged = replace(merged, dims=(*dims[:4], ("c", None)))
    elif node.op_type == "ReorderOutput":
        d = merged.dims
        merged = replace(
            merged,
            dims=(d[0], d[2], d[3], d[1]) if attr(node, "channels_last", 0) else d[:4],
        )
    an.assign(node, merged, outputs=0)


def conv(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.canonical(node)
    w_index = 3 if node.op_type == "QLinearConv" else 1
    kernel = attr(node, "kernel_shape")
    if kernel is None:
        shape = an.weight_shape(node.input[w_index]) if len(node.input) > w_index else None
        if shape is None or len(shape) != 4 or None in shape[2:]:
            raise Unsupported
        kernel = list(shape[2:])
    kernel = ints(kernel)
    w_shape = an.weight_shape(node.input[w_index]) if len(node.input) > w_index else None
    out_c = Val.of(w_shape[0]) if w_shape and w_shape[0] else None
    new = _windowed(an, node, state, kernel)
    an.assign(node, replace(new, dims=(new.dims[0], ("c", out_c), *new.dims[2:])))


def pool(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.canonical(node)
    if len(node.output) > 1 and node.output[1]:
        raise Unsupported  # MaxPool indices are absolute positions
    kernel = attr(node, "kernel_shape")
    if kernel is None:
        raise Unsupported
    an.assign(node, _windowed(an, node, state, ints(kernel)))


def _windowed(an: Analysis, node: onnx.NodeProto, state: Spatial, kernel: list[int]) -> Spatial:
    if len(kernel) != 2:
        raise Unsupported
    strides = ints(attr(node, "strides", [1, 1]))
    dilations = ints(attr(node, "dilations", [1, 1]))
    pads = ints(attr(node, "pads", [0, 0, 0, 0]))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    reaches = []
    for axis, kind in enumerate(("y", "x")):
        k, s, d = kernel[axis], strides[axis], dilations[axis]
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            # total = max(0, (ceil(n/s) - 1)·s + span - n): depends on n mod s
            begins, totals = set(), set()
            for n_mod in range(s):
                total = max(0, (math.ceil((s + n_mod) / s) - 1) * s + span - (s + n_mod))
                upper = auto_pad == "SAME_UPPER"
                begins.add(total // 2 if upper else total - total // 2)
                totals.add(total)
            if len(begins) > 1:
                an.mark(node, an.size_dependent)
        elif auto_pad == "VALID":
            begins, totals = {0}, {0}
        else:
            begins, totals = {pads[axis]}, {pads[axis] + pads[axis + 2]}
        reaches.append(state.reach(kind).window(s, begins, totals, k, d))
    return replace(state, y=reaches[0], x=reaches[1])


def conv_transpose(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.canonical(node)
    kernel = attr(node, "kernel_shape")
    if kernel is None:
        shape = an.weight_shape(node.input[1])
        if shape is None or len(shape) != 4 or None in shape[2:]:
            raise Unsupported
        kernel = list(shape[2:])
    kernel = ints(kernel)
    strides = ints(attr(node, "strides", [1, 1]))
    dilations = ints(attr(node, "dilations", [1, 1]))
    pads = ints(attr(node, "pads", [0, 0, 0, 0]))
    out_pad = ints(attr(node, "output_padding", [0, 0]))
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if attr(node, "output_shape") is not None:
        an.mark(node, an.size_dependent)  # pads follow from the requested size
    reaches = []
    for axis, kind in enumerate(("y", "x")):
        k, s, d = kernel[axis], strides[axis], dilations[axis]
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = out_pad[axis] + span - s
            p = total - total // 2 if auto_pad == "SAME_UPPER" else total // 2
        elif auto_pad == "VALID":
            p, total = 0, 0
        else:
            p, total = pads[axis], pads[axis] + pads[axis + 2]
        r = state.reach(kind)
        a = r.stride
        # output size (n - 1)·s + output_padding + span - total
        reaches.append(
            Reach(
                a / s,
                r.lo + a * Fraction(p - (k - 1) * d, s),
                r.hi + a * Fraction(p, s),
                r.ext - a + a * Fraction(out_pad[axis] + span - total, s),
            )
        )
    w_shape = an.weight_shape(node.input[1])
    groups = int_attr(node, "group", 1)
    out_c = Val.of(w_shape[1] * groups) if w_shape and w_shape[1] else None
    an.assign(
        node,
        Spatial((state.dims[0], ("c", out_c), *state.dims[2:]), reaches[0], reaches[1]),
    )


def depth_to_space(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.canonical(node)
    b = int_attr(node, "blocksize", 1)
    if b < 1:
        raise Unsupported
    if node.op_type == "DepthToSpace":
        y, x = state.y.depth_to_space(b), state.x.depth_to_space(b)
    else:
        y, x = state.y.space_to_depth(b), state.x.space_to_depth(b)
    an.assign(node, Spatial((state.dims[0], ("c", None), *state.dims[2:]), y, x))


def resize(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.canonical(node)
    upsample = node.op_type == "Upsample"
    rank = state.rank
    axes = attr(node, "axes")
    axes = [an.axis(state, a) for a in ints(axes)] if axes is not None else list(range(rank))
    # which input holds what (Resize-10: X, scales; Resize-11+: X, roi, scales, sizes)
    if upsample:
        scales_in = "" if attr(node, "scales") is not None else node.input[1]
        sizes_in = ""
    elif an.opset < 11:
        scales_in, sizes_in = node.input[1], ""
    else:
        scales_in = node.input[2] if len(node.input) > 2 else ""
        sizes_in = node.input[3] if len(node.input) > 3 else ""
    scales: Vals | None
    if upsample and attr(node, "scales") is not None:
        scales = [Val.of(float(v)) for v in floats(attr(node, "scales"))]
    else:
        scales = an.consts(scales_in) if scales_in else None
    sizes = an.consts(sizes_in) if sizes_in else None
    if scales is not None and len(scales) == 0:
        scales = None
    if scales is None and sizes is None:
        raise Unsupported
    by_axis = dict(zip(axes, (scales if scales is not None else sizes) or [], strict=False))
    if len(by_axis) != len(axes):
        raise Unsupported
    mode = str(attr(node, "mode", "nearest"))
    if upsample or an.opset < 11:  # Upsample and Resize-10: asymmetric coordinates
        coord, nearest = "asymmetric", "upsample"
    else:
        coord = str(attr(node, "coordinate_transformation_mode", "half_pixel"))
        nearest = str(attr(node, "nearest_mode", "round_prefer_floor"))
    antialias = bool(attr(node, "antialias", 0))
    size_dependent = False
    new = state
    for kind in ("y", "x"):
        axis = state.pos(kind)
        value = by_axis.get(axis)
        reach = state.reach(kind)
        if value is None:
            raise Unsupported
        if scales is not None:
            if not value.is_const or value.coef <= 0:
                raise Unsupported
            f = value.coef
            size_dependent |= bool(value.srcs)  # a scale computed from shapes
        else:
            dim = (0, 1, 0) if kind == "y" else (0, 0, 1)
            if value.exps != dim or value.coef <= 0:
                raise Unsupported  # a fixed output size: cannot be tiled
            f = reach.stride * value.coef
            own = value.srcs == frozenset([node.input[0]])
            size_dependent |= not (own and f.denominator == 1 and not value.off)
            if str(attr(node, "keep_aspect_ratio_policy", "stretch")) != "stretch":
                size_dependent = True
        if coord == "align_corners" and f != 1:
            size_dependent = True
        elif coord == "half_pixel_symmetric" and f.denominator != 1:
            size_dependent = True
        elif coord == "tf_crop_and_resize":
            raise Unsupported
        out = resample(reach, f, mode, coord, nearest, antialias)
        if scales is None and len(value.srcs) == 1:
            # as many elements as the tensor whose shape was read (scaled, plus off)
            (src,) = value.srcs
            if src in an.spatial:
                ext = an.spatial[src].reach(kind).ext + out.stride * value.off
                out = replace(out, ext=ext)
        new = new.with_reach(kind, out)
    for axis, value in by_axis.items():
        if axis not in state.spatial_axes() and scales is not None:
            if value is None or not value.same(ONE):
                raise Unsupported  # resizing channels or batch
    if size_dependent:
        an.mark(node, an.size_dependent)
    an.assign(node, new)


def pad(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    mode = str(attr(node, "mode", "constant"))
    if mode == "wrap":
        raise Unsupported  # reads the far side of the image
    if an.opset < 11:
        pads = ints(attr(node, "pads", []))
        axes = list(range(state.rank))
    else:
        got = an.const_ints(node.input[1]) if len(node.input) > 1 else None
        if got is None:
            raise Unsupported
        pads = got
        axes_vals = an.const_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axes = (
            [an.axis(state, a) for a in axes_vals]
            if axes_vals is not None
            else list(range(state.rank))
        )
    if len(pads) != 2 * len(axes):
        raise Unsupported
    new = state
    for i, axis in enumerate(axes):
        kind = state.dims[axis][0]
        begin, end = pads[i], pads[i + len(axes)]
        if kind == "c":
            if begin or end:
                new = replace(new, dims=set_dim(new.dims, axis, ("c", None)))
            continue
        r = new.reach(kind)
        a = r.stride
        # padded element j is input j - begin (crops are negative pads)
        new = new.with_reach(
            kind, Reach(a, r.lo - a * begin, r.hi - a * begin, r.ext + a * (begin + end))
        )
    an.assign(node, new)


def slice_op(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    if an.opset < 10:
        starts = ints(attr(node, "starts", []))
        ends_vals: Vals = [Val.of(e) for e in ints(attr(node, "ends", []))]
        axes = ints(attr(node, "axes", list(range(len(starts)))))
        steps = [1] * len(starts)
    else:
        got = an.const_ints(node.input[1])
        ends_got = an.consts(node.input[2])
        if got is None or ends_got is None:
            raise Unsupported
        starts, ends_vals = got, ends_got
        axes_got = an.const_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axes = axes_got if axes_got is not None else list(range(len(starts)))
        steps_got = an.const_ints(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        steps = steps_got if steps_got is not None else [1] * len(starts)
    new = state
    for start, end, axis, step in zip(starts, ends_vals, axes, steps, strict=True):
        axis = an.axis(state, axis)
        kind = state.dims[axis][0]
        if kind == "c":
            new = replace(new, dims=set_dim(new.dims, axis, ("c", None)))
            continue
        if start < 0 or step < 1 or end is None:
            raise Unsupported
        size = state.size(axis)
        assert size is not None
        if end.is_const and end.coef >= 2**30:
            cut = 0
        elif end.is_const and end.coef < 0:
            cut = int(-end.coef)
        elif not end.is_const and end.coef == size.coef and end.exps == size.exps:
            cut = int(-end.off)  # the size read from a shape, minus a constant
            if cut < 0:
                cut = 0
        else:
            raise Unsupported  # a fixed-size crop of a dynamic axis
        r = new.reach(kind)
        a = r.stride
        # element j is input start + step·j; ceil((n - start - cut)/step) elements remain
        new = new.with_reach(
            kind,
            Reach(a * step, r.lo + a * start, r.hi + a * start, r.ext - a * (start + cut)),
        )
    an.assign(node, new)


def along_axis(an: Analysis, node: onnx.NodeProto) -> None:
    op = node.op_type
    data_index = next(k for k, n in enumerate(node.input) if n in an.spatial)
    state = an.spatial[node.input[data_index]]
    if op == "Gather" and data_index != 0:
        raise Unsupported  # spatial indices
    axis = an.axis(state, int_attr(node, "axis", 0))
    if not 0 <= axis < state.rank or state.dims[axis][0] != "c":
        raise Unsupported  # along H or W
    dims = set_dim(state.dims, axis, ("c", None))
    if op == "Gather":
        idx_shape = an.static.get(node.input[1])
        if idx_shape == ():
            dims = dims[:axis] + dims[axis + 1 :]
        elif idx_shape is not None and len(idx_shape) != 1:
            raise Unsupported
    merged = an.union([an.spatial[n] for n in node.input if n in an.spatial], node)
    an.assign(node, replace(merged, dims=dims), outputs=0)


def reshape(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    target = an.consts(node.input[1])
    if target is None:
        raise Unsupported
    allowzero = bool(attr(node, "allowzero", 0))
    an.assign(node, reshape_spatial(state, target, allowzero))


def transpose(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    perm = attr(node, "perm")
    order = ints(perm) if perm is not None else list(range(state.rank))[::-1]
    if sorted(order) != list(range(state.rank)):
        raise Unsupported
    an.assign(node, replace(state, dims=tuple(state.dims[p] for p in order)))


def squeeze(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    axes = an.axes_values(node, "axes", 1)
    dims = list(state.dims)
    if node.op_type == "Squeeze":
        if axes is None:
            raise Unsupported  # squeezes whatever has size 1: unknown here
        drop = {an.axis(state, a) for a in axes}
        if any(dims[a][0] != "c" for a in drop):
            raise Unsupported
        dims = [d for i, d in enumerate(dims) if i not in drop]
    else:
        if axes is None:
            raise Unsupported
        out_rank = len(dims) + len(axes)
        for a in sorted(a + out_rank if a < 0 else a for a in axes):
            dims.insert(a, ("c", ONE))
    an.assign(node, replace(state, dims=tuple(dims)))


def tile_op(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    reps = an.const_ints(node.input[1])
    if reps is None or any(reps[i] != 1 for i in state.spatial_axes()):
        raise Unsupported
    an.assign(node, state)


def reduce_op(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    op = node.op_type
    if op in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [int_attr(node, "axis", 0)]
    elif op == "TopK":
        axes = [int_attr(node, "axis", -1)]
    elif op == "CumSum":
        got = an.const_ints(node.input[1])
        if got is None:
            raise Unsupported
        axes = got
    elif an.opset >= AXES_INPUT_FROM.get(op, 18):
        axes = an.axes_values(node, "axes", 1)
    else:
        axes = ints(attr(node, "axes")) if attr(node, "axes") is not None else None
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            an.assign(node, state)
            return
        axes = list(range(state.rank))
    axes = [an.axis(state, a) for a in axes]
    if set(axes) & set(state.spatial_axes()):
        an.mark(node, an.global_nodes)
        return
    keep = op in ("TopK", "CumSum") or bool(attr(node, "keepdims", 1))
    dims = [("c", None) if i in axes else d for i, d in enumerate(state.dims)]
    if not keep:
        dims = [d for i, d in enumerate(dims) if i not in axes]
    an.assign(node, replace(state, dims=tuple(dims)), outputs=0)


def softmax(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    old = an.opset < 13 and node.op_type != "LpNormalization"
    axis = an.axis(state, int_attr(node, "axis", 1 if old else -1))
    covered = set(range(axis, state.rank)) if old else {axis}
    if covered & set(state.spatial_axes()):
        an.mark(node, an.global_nodes)
        return
    an.assign(node, state)


def normalization(an: Analysis, node: onnx.NodeProto) -> None:
    state = an.data(node)
    if node.op_type == "LayerNormalization":
        axis = an.axis(state, int_attr(node, "axis", -1))
        covered = set(range(axis, state.rank))
    else:
        covered = {an.axis(state, a) for a in ints(attr(node, "axes", [0, 2, 3]))}
    if covered & set(state.spatial_axes()):
        an.mark(node, an.global_nodes)
        return
    an.assign(node, state, outputs=1)


def matmul(an: Analysis, node: onnx.NodeProto) -> None:
    a_name = node.input[0]
    b_name = node.input[3] if node.op_type == "QLinearMatMul" else node.input[1]
    a, b = an.spatial.get(a_name), an.spatial.get(b_name)
    if a is not None and a.dims[-1][0] != "c":
        raise Unsupported  # contracts H or W
    if b is not None and (b.rank < 2 or b.dims[-2][0] != "c" or b.dims[-1][0] != "c"):
        raise Unsupported
    if a is None or b is not None:
        raise Unsupported
    an.assign(node, replace(a, dims=(*a.dims[:-1], ("c", None))))


def whole_image(an: Analysis, node: onnx.NodeProto) -> None:
    """Global pooling, instance/group normalisation, ...: the output depends on every pixel."""
    an.mark(node, an.global_nodes)


def _table(*entries: tuple[Iterable[str], Rule]) -> dict[str, Rule]:
    table: dict[str, Rule] = {}
    for op_types, rule in entries:
        for op in op_types:
            table.setdefault(op, rule)  # the first entry naming an op wins
    return table


#: op type → rule
RULES: dict[str, Rule] = _table(
    (("Shape", "Size"), shape),
    (GLOBAL_POOLS | WHOLE_IMAGE, whole_image),
    (ELEMENTWISE, elementwise),
    (CONVS, conv),
    (POOLS, pool),
    (("ConvTranspose",), conv_transpose),
    (("DepthToSpace", "SpaceToDepth"), depth_to_space),
    (("Resize", "Upsample"), resize),
    (("Pad",), pad),
    (("Slice",), slice_op),
    (("Concat", "QLinearConcat", "Split", "Gather"), along_axis),
    (("Reshape",), reshape),
    (("Transpose",), transpose),
    (("Squeeze", "Unsqueeze"), squeeze),
    (("Tile",), tile_op),
    ((*REDUCES, "ArgMax", "ArgMin", "TopK", "CumSum"), reduce_op),
    (("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"), softmax),
    (("LayerNormalization", "MeanVarianceNormalization"), normalization),
    (("MatMul", "MatMulInteger", "QLinearMatMul"), matmul),
)
#: ops whose rule applies in any domain (they read shapes or the whole image)
ANY_DOMAIN = frozenset({"Shape", "Size"} | GLOBAL_POOLS | WHOLE_IMAGE)
#: domains whose ops the rules know (ONNX, and ONNX Runtime's optimised graphs)
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft", "com.microsoft.nchwc"})
