"""int8 pass, calibration and sensitivity search on a small SR-shaped network exported by the
real exporter: numerical checks against fp32 and numpy, the expected Q/DQ structure, graphs
where it must do nothing, ONNX Runtime's int8 lowering and fusion, and the calibration
cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from esr_deploy.backends.onnxruntime import OnnxRuntimeCPU, cpu_session, lower_int8_activations
from esr_deploy.errors import DataError, ExportError
from esr_deploy.export import export_onnx
from esr_deploy.precision.calibration import (
    HIST_BINS,
    ActivationStats,
    CalibrationSet,
    TensorStats,
    calibration_set,
    centre_crop,
    collect_stats,
    threshold,
)
from esr_deploy.precision.int8 import (
    INT8_MAX,
    Int8Result,
    Quantizer,
    _quantize_weight,
    name_nodes,
    quantize_int8,
    sensitivity_candidates,
    weight_conv_names,
)
from esr_deploy.precision.sensitivity import RANK_CROP, RANK_IMAGES, probe_batches, search
from esr_deploy.recipe import Recipe, ShapeProfile


class TinySR(nn.Module):
    """conv → (lrelu conv)×2 + residual → sigmoid gate (max-pool, resize) → pixel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body1 = nn.Conv2d(8, 8, 3, padding=1)
        self.body2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        f = self.head(x)
        r = self.body2(F.leaky_relu(self.body1(f), 0.05))
        f = f + r
        g = F.max_pool2d(self.gate(f), 3, stride=2, padding=1)
        g = F.interpolate(g, size=f.shape[2:], mode="nearest")
        f = f * torch.sigmoid(g)
        return F.pixel_shuffle(self.tail(f), 2) * 255.0


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("int8") / "tiny.onnx"
    export_onnx(TinySR().eval(), path, scale=2, data_range=255.0)
    return name_nodes(onnx.load(str(path)))


def _images(n: int = 3, hw: tuple[int, int] = (24, 28), seed: int = 0) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    # smooth images (like real LR content), not white noise
    base = rng.random((n, 3, hw[0] // 4, hw[1] // 4))
    up = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3)
    inputs = tuple((up[i : i + 1] * 255).astype(np.float32) for i in range(n))
    return CalibrationSet(inputs, tuple(f"img{i}" for i in range(n)), "synthetic")


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = cpu_session(model.SerializeToString(), threads=1, optimize=False)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 255) / 255.0 - np.clip(b, 0, 255) / 255.0) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-20))


@pytest.fixture(scope="module")
def stats(fp32_model: onnx.ModelProto, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return collect_stats(fp32_model, _images(), cache_dir=tmp_path_factory.mktemp("cache"))


# -- weights and thresholds ------------------------------------------------------------------


def test_weight_quantisation_is_per_channel_symmetric_and_within_half_a_step() -> None:
    w = np.random.default_rng(0).normal(size=(6, 4, 3, 3)).astype(np.float32)
    w[2] *= 100.0  # one channel far larger must not coarsen the others
    q, scale = _quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and scale.shape == (6,)
    assert np.all(np.abs(q).reshape(6, -1).max(axis=1) == INT8_MAX)
    err = np.abs(q.astype(np.float64) * scale[:, None, None, None] - w)
    assert np.all(err <= scale[:, None, None, None] / 2 + 1e-6)


def _stats_of(values: np.ndarray) -> TensorStats:
    a = np.abs(values)
    hist = np.histogram(a, bins=HIST_BINS, range=(0.0, float(a.max())))[0]
    return TensorStats(float(values.min()), float(values.max()), float(a.max()), hist)


def test_thresholds_minmax_percentile_entropy() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=200_000), [80.0]])  # one far outlier
    s = _stats_of(values)
    assert threshold(s, "minmax") == pytest.approx(80.0)
    p = threshold(s, "percentile", 99.9)
    assert p == pytest.approx(np.quantile(np.abs(values), 0.999), rel=0.02)
    e = threshold(s, "entropy")
    assert 1.0 < e < 40.0  # clips the outlier, keeps the bulk of the distribution
    m = threshold(s, "mse")
    # clips part of the way: one value's clipping error against every value's rounding error
    assert p < m < 0.6 * 80.0
    bounded = _stats_of(rng.uniform(-1.0, 1.0, size=100_000))
    assert threshold(bounded, "mse") == pytest.approx(1.0, abs=0.01)  # nothing to clip
    with pytest.raises(DataError, match="Unknown calibration method"):
        threshold(s, "median")


# -- calibration -----------------------------------------------------------------------------


def test_collect_stats_matches_numpy_and_is_cached(
    fp32_model: onnx.ModelProto, tmp_path: Path
) -> None:
    calib = _images()
    first = collect_stats(fp32_model, calib, cache_dir=tmp_path)
    assert not first.from_cache
    assert first.tensors["lr"].absmax == pytest.approx(max(float(x.max()) for x in calib.inputs))
    assert int(first.tensors["lr"].hist.sum()) == sum(x.size for x in calib.inputs)
    again = collect_stats(fp32_model, calib, cache_dir=tmp_path)
    assert again.from_cache and again.key == first.key
    assert again.absmax() == first.absmax()
    other = collect_stats(fp32_model, _images(seed=1), cache_dir=tmp_path)
    assert not other.from_cache and other.key != first.key


def test_calibration_set_crops_to_the_opt_shape_and_rejects_bad_folders(tmp_path: Path) -> None:
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (300, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    recipe = Recipe(
        name="t", arch="x:y", scale=2, data_range=255.0, profile=ShapeProfile(opt=(64, 64))
    )
    calib = calibration_set(tmp_path, [], recipe)
    assert calib.inputs[0].shape == (1, 3, 64, 40)
    np.testing.assert_array_equal(
        calib.inputs[0][0].transpose(1, 2, 0), centre_crop(img, (64, 64)).astype(np.float32)
    )
    with pytest.raises(DataError, match="does not exist"):
        calibration_set(tmp_path / "missing", [], recipe)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="No images"):
        calibration_set(empty, [], recipe)


# -- the int8 pass ---------------------------------------------------------------------------


def test_int8_structure_is_explicit_symmetric_qdq(fp32_model: onnx.ModelProto, stats) -> None:  # type: ignore[no-untyped-def]
    result = quantize_int8(fp32_model, lambda t: stats.amax(t, "minmax"))
    graph = result.model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert result.int8_weights == len(convs) == 5
    for conv in convs:
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].dtype == np.int8
        assert {a.name: a.i for a in dq.attribute}["axis"] == 0
        assert not np.any(inits[dq.input[2]])  # symmetric: zero points 0
        data = producer[conv.input[0]]
        assert data.op_type == "DequantizeLinear"  # activations quantised too
        assert len(conv.input) < 3 or conv.input[2] in inits  # bias stays float
        assert len(conv.input) < 3 or inits[conv.input[2]].dtype == np.float32
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        zp = inits[q.input[2]]
        assert zp.dtype == np.int8 and zp.size == 1 and int(zp) == 0
    # graph IO stays float32; the output is not quantised
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert producer[graph.output[0].name].op_type != "DequantizeLinear"
    # max-pool, resize and pixel shuffle reuse their input's scale
    for node in (n for n in fp32_model.graph.node if n.op_type in ("MaxPool", "DepthToSpace")):
        if node.output[0] in result.scales:
            assert result.scales[node.output[0]] == result.scales[node.input[0]]


def test_int8_output_close_to_fp32_and_scales_match_calibration(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
) -> None:
    result = quantize_int8(fp32_model, lambda t: stats.amax(t, "minmax"))
    head = next(n for n in fp32_model.graph.node if n.op_type == "Conv")
    t = head.input[0]  # x / 255: quantised although its producer (Div) is not
    assert result.scales[t] == pytest.approx(stats.tensors[t].absmax / INT8_MAX)
    x = _images(1, seed=5).inputs[0]
    assert 25.0 < _psnr(_run(result.model, x), _run(fp32_model, x)) < 90.0  # changed, close


def test_excluded_conv_reads_float_and_keeps_float_weights(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
) -> None:
    head = weight_conv_names(fp32_model)[0]
    result = quantize_int8(fp32_model, lambda t: stats.amax(t, "minmax"), exclude=[head])
    node = next(n for n in result.model.graph.node if n.name == head)
    inits = {i.name: i for i in result.model.graph.initializer}
    original = next(n for n in fp32_model.graph.node if n.name == head)
    assert node.input[0] == original.input[0]  # the float tensor, no Q/DQ
    assert inits[node.input[1]].data_type == TensorProto.FLOAT
    assert result.int8_weights == 4
    x = _images(1, seed=5).inputs[0]
    full = quantize_int8(fp32_model, lambda t: stats.amax(t, "minmax"))
    ref = _run(fp32_model, x)
    assert _psnr(_run(result.model, x), ref) > _psnr(_run(full.model, x), ref)
    with pytest.raises(ExportError, match="not found"):
        quantize_int8(fp32_model, lambda t: 1.0, exclude=["no_such_node"])


def test_graph_without_quantisable_ops_is_left_alone() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Sqrt", ["lr"], ["r"], name="sqrt"),
            helper.make_node("Neg", ["r"], ["sr"], name="neg"),
        ],
        "g",
        [helper.make_tensor_value_info("lr", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    result = quantize_int8(model, lambda t: 1.0)
    assert result.quantized_tensors == 0 and result.int8_weights == 0
    assert [n.op_type for n in result.model.graph.node] == ["Sqrt", "Neg"]


def test_old_opset_is_refused(fp32_model: onnx.ModelProto) -> None:
    old = onnx.ModelProto()
    old.CopyFrom(fp32_model)
    for o in old.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 11
    with pytest.raises(ExportError, match="opset 13"):
        quantize_int8(old, lambda t: 1.0)


# -- ONNX Runtime: exact uint8 lowering, int8 kernels ---------------------------------------


def test_ort_lowering_is_exact_and_fuses_into_qlinear_kernels(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    backend = OnnxRuntimeCPU()
    weight_max = backend.int8_kernels().weight_max  # what this CPU's kernels compute exactly
    assert weight_max is not None
    result = quantize_int8(fp32_model, lambda t: stats.amax(t, "percentile"), weight_max=weight_max)
    lowered = lower_int8_activations(result.model)
    inits = {i.name: numpy_helper.to_array(i) for i in lowered.graph.initializer}
    for q in (n for n in lowered.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].dtype == np.uint8 and int(inits[q.input[2]]) == 128
    x = _images(1, seed=3).inputs[0]
    np.testing.assert_array_equal(_run(lowered, x), _run(result.model, x))  # exact
    path = tmp_path / "model.onnx"
    onnx.save(result.model, str(path))
    built = backend.build(path, tmp_path, "int8")
    engine = onnx.load(str(tmp_path / built.engine_file))
    ops = [n.op_type for n in engine.graph.node]
    assert ops.count("QLinearConv") == 5, ops  # every conv runs the int8 kernel
    out = backend.load(tmp_path / built.engine_file, built.settings).run(x)
    assert _psnr(out, _run(result.model, x)) > 45.0  # int32 accumulation vs float


# -- sensitivity search ----------------------------------------------------------------------


def test_search_keeps_the_fewest_layers_that_meet_the_budget(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
) -> None:
    calib = _images()
    x = _images(1, seed=9).inputs[0]
    ref = _run(fp32_model, x)

    def quantize(exclude, check=True):  # type: ignore[no-untyped-def]
        return quantize_int8(fp32_model, lambda t: stats.amax(t, "minmax"), exclude, check=check)

    candidates = weight_conv_names(fp32_model)
    full = _psnr(_run(quantize(()).model, x), ref)
    budget = full + 0.5 * (_psnr(_run(quantize(candidates[:1]).model, x), ref) - full)

    def accept(result):  # type: ignore[no-untyped-def]
        p = _psnr(_run(result.model, x), ref)
        return p >= budget, f"{p:.2f} dB"

    found = search(fp32_model, quantize, candidates, calib.inputs, accept)
    assert found.passed
    assert accept(found.result)[0]
    kept = len(found.result.excluded)
    assert kept >= 1
    ranked = [n for n, _ in found.ranking]
    assert list(found.result.excluded) == ranked[:kept]
    assert not accept(quantize(ranked[: kept - 1]))[0]  # one fewer in float fails
    # a budget met by the fully quantised model keeps nothing in float
    easy = search(fp32_model, quantize, candidates, calib.inputs, lambda r: (True, "ok"))
    assert easy.result.excluded == () and easy.ranking == ()


def test_quantizer_reused_across_exclude_sets_gives_what_a_fresh_pass_gives(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
) -> None:
    """The search's Quantizer caches the analysis and the int8 weights: every exclude set,
    in any order, must give the model a fresh quantize_int8 gives, byte for byte."""
    amax = lambda t: stats.amax(t, "mse")  # noqa: E731
    candidates = sensitivity_candidates(fp32_model)
    quantizer = Quantizer(fp32_model, amax, 63)
    for exclude in [(), candidates[:1], candidates[2:5], (), candidates, candidates[:1]]:
        fresh = quantize_int8(fp32_model, amax, exclude, 63)
        reused = quantizer(exclude)
        assert reused.model.SerializeToString() == fresh.model.SerializeToString()
        assert reused.int8_weights == fresh.int8_weights and reused.scales == fresh.scales
    # a probe skips only the final checks: the same nodes and initializers
    probe = quantizer(candidates[:1], check=False).model
    checked = quantizer(candidates[:1]).model
    assert [n.name for n in probe.graph.node] == [n.name for n in checked.graph.node]
    assert probe.graph.initializer == checked.graph.initializer
    x = _images(1, seed=3).inputs[0]
    np.testing.assert_array_equal(_run(probe, x), _run(checked, x))


def test_probe_batches_spread_crop_and_group_by_shape() -> None:
    rng = np.random.default_rng(0)
    ch, cw = RANK_CROP
    # 20 images, some larger than the crop, some smaller
    shapes = [(ch + 12, cw + 22), (30, 40), (2 * ch, 2 * cw + 8), (20, 50)] * 5
    inputs = [rng.random((1, 3, h, w), dtype=np.float32) for h, w in shapes]
    batches = probe_batches(inputs)
    assert sum(b.shape[0] for b in batches) == RANK_IMAGES
    assert len({b.shape[1:] for b in batches}) == len(batches)  # one batch per crop shape
    for b in batches:
        assert b.dtype == np.float32 and b.shape[1] == 3
        assert b.shape[2] <= RANK_CROP[0] and b.shape[3] <= RANK_CROP[1]
    # the first and the last image are probes; a probe is the centre crop of its image
    first = inputs[0][0, :, 6 : 6 + ch, 11 : 11 + cw]
    assert any(np.array_equal(first, img) for b in batches for img in b)
    last = inputs[-1][0]  # smaller than the crop: whole
    assert any(np.array_equal(last, img) for b in batches for img in b)
    assert probe_batches(inputs[:3])[0].shape[0] + probe_batches(inputs[:3])[1].shape[0] == 3
    assert probe_batches([]) == []


@pytest.mark.parametrize("needed", [1, 2, 3, 5, 8])
def test_search_finds_the_smallest_passing_k_in_few_gate_runs(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
    needed: int,
) -> None:
    """A gate that passes once ``needed`` of the ranked layers are in float (monotone): the
    search returns exactly ``needed`` and runs the gate at most 2·log2(needed) + 2 times."""
    quantizer = Quantizer(fp32_model, lambda t: stats.amax(t, "minmax"))
    candidates = sensitivity_candidates(fp32_model)
    assert len(candidates) >= 8
    calls: list[int] = []

    def accept(result: Int8Result) -> tuple[bool, str]:
        calls.append(len(result.excluded))
        return len(result.excluded) >= needed, ""

    found = search(fp32_model, quantizer, candidates, _images().inputs, accept)
    assert found.passed and len(found.result.excluded) == needed
    assert [s.kept_float for s in found.steps] == calls
    assert any(s.passed and s.kept_float == needed for s in found.steps)
    assert len(calls) <= 2 * np.ceil(np.log2(needed)) + 2
    ranked = [n for n, _ in found.ranking]
    assert sorted(ranked) == sorted(candidates)
    assert list(found.result.excluded) == ranked[:needed]


def test_search_reports_failure_when_all_in_float_still_fails(
    fp32_model: onnx.ModelProto,
    stats,  # type: ignore[no-untyped-def]
) -> None:
    quantizer = Quantizer(fp32_model, lambda t: stats.amax(t, "minmax"))
    candidates = sensitivity_candidates(fp32_model)
    found = search(fp32_model, quantizer, candidates, _images().inputs, lambda r: (False, "no"))
    assert not found.passed
    assert set(found.result.excluded) == set(candidates)
    assert found.steps[-1].kept_float == len(candidates) and not found.steps[-1].passed


def test_amax_is_the_threshold_of_the_histogram_computed_once_per_method(
    stats,  # type: ignore[no-untyped-def]
) -> None:
    fresh = ActivationStats(stats.tensors, stats.key)  # the fixture's cache is shared
    names = list(fresh.tensors)[:4]
    for _ in range(3):  # the search asks for the same thresholds once per candidate model
        for name in names:
            for method in ("mse", "entropy", "percentile"):
                assert fresh.amax(name, method, 99.9) == threshold(
                    fresh.tensors[name], method, 99.9
                )
    assert len(fresh._thresholds) == 3 * len(names)
    assert fresh.amax(names[0], "percentile", 99.0) == threshold(
        fresh.tensors[names[0]], "percentile", 99.0
    )  # another percentile is another threshold
    assert len(fresh._thresholds) == 3 * len(names) + 1
