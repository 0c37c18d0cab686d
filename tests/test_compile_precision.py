"""Reduced precision end to end, on the official checkpoints in ``../shared/weights``:

- ``ort-int8``: RLFN compiled with calibration and the sensitivity search meets the int8
  budget on Set5, its engine runs ONNX Runtime's int8 kernels, its bundle carries the
  explicit Q/DQ ONNX, and a second compile reads the calibration cache;
- ``onnx-fp16``: IMDN's float16 ONNX meets the fp16 budget on Set5 and Set14 with its
  reductions kept in float32 (and says why);
- no float16 tensor of the fp16 ONNX of RLFN, IMDN or FMEN leaves the float16 range on any
  LR image of Set5 and Set14 (float16 rounding emulated at every op boundary);
- refusals: ``ort-fp16`` on a CPU without float16 kernels, bad calibration options, and a
  missed int8 budget (exit 3, nothing written, per-image numbers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import OUT, assert_refused, esr_deploy, one_error
from onnx import numpy_helper

from esr_deploy.compiling import CompileOptions, CompileResult, compile_model
from esr_deploy.compiling.backend import PRECISION_ONNX
from esr_deploy.compiling.frontend import load_sets
from esr_deploy.export import derive_input_range, export_onnx
from esr_deploy.loading.detect import ModelSource, load_model
from esr_deploy.paths import recipes_dir
from esr_deploy.precision.apply import PrecisionOptions
from esr_deploy.precision.base import fp16_range
from esr_deploy.precision.calibration import calibration_set, collect_stats
from esr_deploy.precision.fp16 import FP16_MAX, convert_fp16
from esr_deploy.precision.int8 import name_nodes
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.targets import availability, get_target
from esr_deploy.validate.parity import model_input

INT8_DROP_DB = 0.15
FP16_DROP_DB = 0.02


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("calibration-cache")


def _compile(
    weights: Path, target: str, sets: tuple[Path, ...], out: Path, **precision: object
) -> CompileResult:
    options = CompileOptions(
        source=ModelSource(checkpoint=weights),
        target=target,
        val_dirs=sets,
        out=out,
        latency_shapes=((64, 64),),
        latency_runs=2,
        precision=PrecisionOptions(**precision),  # type: ignore[arg-type]
    )
    return compile_model(options)


@pytest.fixture(scope="module")
def rlfn_int8(
    weights_dir: Path, sr_data_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> CompileResult:
    out = tmp_path_factory.mktemp("int8") / "rlfn-int8"
    return _compile(
        weights_dir / "rlfn_x4.pth", "ort-int8", (sr_data_dir / "Set5",), out, cache_dir=cache_dir
    )


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_rlfn_int8_meets_the_budget_on_set5(rlfn_int8: CompileResult) -> None:
    m = rlfn_int8.manifest
    assert (m["target"], m["precision"], m["backend"]) == ("ort-int8", "int8", "onnxruntime")
    v = m["validation"]["Set5"]
    assert v["psnr_drop"] <= INT8_DROP_DB, v
    assert v["parity_min_psnr"] >= 32.0, v
    assert v["reference_psnr_y"] == pytest.approx(32.2379, abs=1e-3)  # the README's table
    assert m["latency_ms"]["1x3x64x64"]["median"] > 0
    search = m["precision_onnx"]["search"]
    assert search["passed"] and search["steps"][-1]["passed"] in (True, False)
    assert any(step["passed"] for step in search["steps"])
    cal = m["precision_onnx"]["calibration"]
    assert cal["images"] == 5 and cal["from_cache"] is False and cal["method"] == "mse"


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_rlfn_int8_bundle_holds_explicit_qdq_and_runs_int8_kernels(
    rlfn_int8: CompileResult,
) -> None:
    bundle = rlfn_int8.bundle
    assert PRECISION_ONNX in rlfn_int8.manifest["files"]
    model = onnx.load(str(bundle / PRECISION_ONNX))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    kept = {k["node"] for k in rlfn_int8.manifest["precision_onnx"]["search"]["kept_float"]}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    int8_convs = [c for c in convs if c.name not in kept]
    assert len(int8_convs) >= 0.8 * len(convs)  # most convs int8, a few kept float
    for conv in convs:
        w = conv.input[1]
        if conv.name in kept:
            assert inits[w].dtype == np.float32
        else:
            dq = producer[w]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        assert inits[q.input[2]].dtype == np.int8 and int(inits[q.input[2]]) == 0
    # ONNX Runtime runs as QLinearConv every conv with int8 weights whose input is
    # dequantised and whose output is quantised (next to a layer kept in float, one side is
    # float and the conv runs in float)
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    sandwiched = [
        c
        for c in int8_convs
        if producer[c.input[0]].op_type == "DequantizeLinear"
        and consumers.get(c.output[0]) == ["QuantizeLinear"]
    ]
    assert len(sandwiched) >= 0.8 * len(convs)
    engine = onnx.load(str(bundle / rlfn_int8.manifest["engine"]["file"]))
    fused = sum(n.op_type == "QLinearConv" for n in engine.graph.node)
    assert fused == len(sandwiched)


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_second_compile_reads_the_calibration_cache(
    rlfn_int8: CompileResult, weights_dir: Path, sr_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    # the search's choice given by hand (--keep-float) and no search: same int8 model
    kept = tuple(k["node"] for k in rlfn_int8.manifest["precision_onnx"]["search"]["kept_float"])
    again = _compile(
        weights_dir / "rlfn_x4.pth",
        "ort-int8",
        (sr_data_dir / "Set5",),
        tmp_path / "again",
        cache_dir=cache_dir,
        search=False,
        keep_float=kept,
    )
    assert again.manifest["validation"]["Set5"] == rlfn_int8.manifest["validation"]["Set5"]
    first = rlfn_int8.manifest["precision_onnx"]["calibration"]
    second = again.manifest["precision_onnx"]["calibration"]
    assert second["from_cache"] is True and second["sha256"] == first["sha256"]
    assert list(cache_dir.rglob("*.npz"))


@pytest.mark.slow
def test_imdn_fp16_onnx_meets_the_budget_and_keeps_reductions_float32(
    weights_dir: Path, sr_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    sets = (sr_data_dir / "Set5", sr_data_dir / "Set14")
    result = _compile(
        weights_dir / "imdn_x4.pth", "onnx-fp16", sets, tmp_path / "imdn", cache_dir=cache_dir
    )
    m = result.manifest
    for name in ("Set5", "Set14"):
        v = m["validation"][name]
        assert v["psnr_drop"] <= FP16_DROP_DB and v["parity_min_psnr"] >= 45.0, v
    assert m["latency_ms"] == {}  # an emulated check is not a latency
    fp16 = m["precision_onnx"]["fp16"]
    kept = {k["op_type"] for k in fp16["kept_float32"]}
    assert kept == {"ReduceMean", "Pow"}, fp16["kept_float32"]  # IMDN's contrast layer
    assert all(k["reason"] for k in fp16["kept_float32"])
    model = onnx.load(str(result.bundle / PRECISION_ONNX))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["rlfn_x4", "imdn_x4", "fmen_ntire2022"])
def test_fp16_onnx_stays_in_float16_range_on_set5_and_set14(
    checkpoint: str, weights_dir: Path, sr_data_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    loaded = load_model(ModelSource(weights_dir / f"{checkpoint}.pth"))
    recipe = loaded.recipe
    sets = load_sets([sr_data_dir / "Set5", sr_data_dir / "Set14"], recipe.scale)
    input_range = derive_input_range(loaded.model, recipe.scale)
    path = tmp_path / "fp32.onnx"
    export_onnx(loaded.model, path, recipe.scale, recipe.data_range, input_range=input_range)
    model = name_nodes(onnx.load(str(path)))
    calib = calibration_set(None, sets, recipe, input_range.min_hw)
    stats = collect_stats(model, calib, cache_dir=cache_dir)
    fp16 = convert_fp16(model, stats.absmax()).model
    images = [model_input(p.lr, recipe).numpy() for s in sets for p in s.pairs]  # whole images
    assert len(images) == 19
    worst, where = fp16_range(fp16, images)
    assert np.isfinite(worst) and worst < FP16_MAX, f"{where} reaches {worst}"
    # the check can fail: the same graph with inputs scaled past float16 overflows
    huge, _ = fp16_range(fp16, [images[0] * 1e4])
    assert not huge < FP16_MAX


# -- refusals ------------------------------------------------------------------------------


def test_ort_fp16_without_float16_kernels_is_refused_with_the_reason(tmp_path: Path) -> None:
    status = availability(get_target("ort-fp16"))
    if status.ok:  # a CPU with float16 Conv kernels (Arm): the probe found no Casts
        from esr_deploy.backends.onnxruntime import native_fp16

        assert native_fp16().ok
        return
    run = esr_deploy("compile", _example(), "--target", "ort-fp16", "--out", OUT, cwd=tmp_path)
    assert_refused(run, 4, ["'ort-fp16' cannot run", "float16 Conv kernel", "onnx-fp16"], tmp_path)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--calib", "no_such_dir"], ["Calibration folder", "no_such_dir", "--calib"]),
        (["--calib-method", "median"], ["Unknown calibration method 'median'", "entropy"]),
        (["--calib-percentile", "10"], ["--calib-percentile", "99.999"]),
    ],
)
def test_bad_calibration_options_are_refused(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    run = esr_deploy(
        "compile", _example(), "--target", "ort-int8", *args, "--out", OUT, cwd=tmp_path
    )
    assert_refused(run, 2, words, tmp_path)


def _example() -> Path:
    return Path(__file__).resolve().parent.parent / "esr_deploy" / "assets" / "rlfn_x4.pth"


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_missed_int8_budget_exits_3_with_per_image_numbers(tmp_path: Path) -> None:
    recipe = tmp_path / "strict.toml"
    recipe.write_text(
        (recipes_dir() / "rlfn_x4.toml").read_text()
        + "\n[tolerances.int8]\nparity_min_psnr = 60.0\n"
    )
    args = ["--recipe", recipe, "--target", "ort-int8", "--no-search", "--no-latency", "--json"]
    run = esr_deploy("compile", _example(), *args, "--out", OUT, cwd=tmp_path)
    assert run.code == 3, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    message = one_error(run)
    manifest = json.loads(run.stdout)
    for image in manifest["validation"]["set5_crops"]["per_image"]:
        assert f"set5_crops/{image['name']}: parity PSNR {image['parity_psnr']:.2f} dB" in message
    assert "required 60.00 dB" in message and "nothing was written" in message
    assert not (tmp_path / OUT).exists()


# -- --target auto ---------------------------------------------------------------------------


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
def test_auto_keeps_the_fastest_target_that_passes_and_says_why(tmp_path: Path) -> None:
    """ort-int8 without the search misses the int8 budget on RLFN: it is reported and left
    out; the two fp32 engines pass and the faster one (timed side by side) is published."""
    options = CompileOptions(
        source=ModelSource(checkpoint=_example()),
        target="auto",
        out=tmp_path / "auto",
        latency_shapes=((64, 64),),
        latency_runs=2,
        precision=PrecisionOptions(search=False, cache_dir=tmp_path / "cache"),
        auto_candidates=("ort-int8", "ov-fp32", "ort-fp32"),
    )
    result = compile_model(options)
    auto = result.manifest["auto"]
    by_target = {c["target"]: c for c in auto["candidates"]}
    assert set(by_target) == {"ort-int8", "ov-fp32", "ort-fp32"}
    assert by_target["ort-int8"]["passed"] is False
    assert "PSNR-Y drop" in by_target["ort-int8"]["failure"]
    passed = {t: c["median_ms"] for t, c in by_target.items() if c.get("passed")}
    assert set(passed) == {"ov-fp32", "ort-fp32"}
    assert auto["chosen"] == min(passed, key=passed.__getitem__) == result.manifest["target"]
    assert auto["chosen"] in auto["reason"] and "interleaved" in auto["reason"]
    assert auto["max_psnr_drop"] == 0.02  # one budget for every candidate
    # every passing target's latency, with the CPU it was measured on
    assert auto["device"]["model"] and "avx2" in auto["device"]["flags"]
    for target in passed:
        lat = by_target[target]["latency_ms"]["1x3x64x64"]
        assert lat["median"] == pytest.approx(by_target[target]["median_ms"], abs=1e-3)
        assert 0 < lat["p10"] <= lat["median"] <= lat["p90"] and lat["runs"] == 7
    assert result.manifest["latency_ms"]["1x3x64x64"]["median"] > 0
    # the peers a user would run instead, timed in the same interleaving
    from esr_deploy.compiling.auto import AUTO_PEERS
    from esr_deploy.cpu import bf16_unavailable_reason

    peers = {p["peer"]: p for p in auto["peers"]}
    assert tuple(peers) == AUTO_PEERS
    assert ("skipped" in peers["eager-bf16"]) == bool(bf16_unavailable_reason())
    ran = {n: p["latency_ms"]["1x3x64x64"] for n, p in peers.items() if "latency_ms" in p}
    assert {"eager-fp32", "ort-plain-fp32", "ov-plain-fp32"} <= set(ran)
    assert all(t["runs"] == 7 and t["median"] > 0 for t in ran.values())
    best = min(ran, key=lambda n: ran[n]["median"])
    vs = auto["vs_best_peer"]
    assert vs["peer"] == best
    assert vs["ratio"] == pytest.approx(ran[best]["median"] / passed[auto["chosen"]], rel=1e-2)
    assert "fastest peer" in auto["reason"]
    bundle = open_bundle(result.bundle)  # checksums of the republished bundle hold
    assert bundle.manifest["auto"] == auto
    assert not list(tmp_path.glob("esr-deploy-auto-*"))
