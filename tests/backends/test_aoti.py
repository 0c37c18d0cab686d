"""AOTInductor backend (``aoti-cpu-fp32``, ``aoti-cpu-bf16``, ``aoti-cuda-fp32``,
``aoti-cuda-fp16``).

On any machine: the availability probes say the right thing for this machine (CUDA targets
refused with the reason where no GPU is visible; bf16 offered exactly where the CPU has
native bf16), the compatibility check refuses another torch, GPU or CPU with both values,
the export finds the smallest input torch.export accepts (RLFN), and one real CPU package
(compiled once for the module) is validated, run on odd, batched and refused shapes, and
loaded in a fresh process that never imports the model's code. bf16 is compiled and
validated where the CPU has it.

On a GPU machine (``pytest -m gpu``, ``bench/gpu.sh``): fp32 and fp16 CUDA packages checked
against the PyTorch reference, CUDA-graph replay equal to plain runs, fp16 keeping an
overflowing layer in float32 where a blind ``.half()`` gives inf, and another GPU refused.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from esr_deploy.backends.aoti import (
    ENGINE_FILE,
    AOTInductor,
    check_aoti_engine,
    export_dynamic,
    export_program,
    native_bf16,
)
from esr_deploy.compiling.options import CompileOptions, CompileResult
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.cpu import cpu_info
from esr_deploy.errors import BundleError, DataError, TargetUnavailable
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.detect import ModelSource
from esr_deploy.loading.keys import load_weights
from esr_deploy.precision.calibration import CalibrationSet
from esr_deploy.precision.torch_graph import apply_precision, measure_ranges, plan_precision
from esr_deploy.recipe import find_recipe
from esr_deploy.runtime.bundle_reader import open_bundle
from esr_deploy.shapes import ShapeProfile
from esr_deploy.targets import availability, get_target
from esr_deploy.validate.rerun import validate_bundle

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the test models are imported from the repo root
    sys.path.insert(0, str(REPO))
from tests.user_models.loud_sr import LoudSR  # noqa: E402
from tests.user_models.tiny_sr import TinyGatedSR  # noqa: E402

USER_ARCH = "tests.user_models.tiny_sr:TinyGatedSR"
BF16 = torch.bfloat16


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyGatedSR().eval()


def _compile(ckpt: Path, target: str, out: Path) -> CompileResult:
    source = ModelSource(ckpt, arch=USER_ARCH, scale=3, data_range=1.0)
    return compile_model(CompileOptions(source=source, target=target, out=out, latency_shapes=()))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aoti") / "tiny.pth"
    torch.save(_tiny().state_dict(), path)
    return path


def _lr(h: int, w: int, n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---------------------------------------------------------------------- what runs here


@pytest.mark.parametrize("target", ["aoti-cuda-fp32", "aoti-cuda-fp16"])
def test_cuda_targets_say_why_they_cannot_run_without_a_gpu(target: str) -> None:
    status = availability(get_target(target))
    if torch.cuda.is_available():
        assert status.ok or "Triton" in status.reason, status.reason
    else:
        assert not status.ok
        assert "no CUDA GPU is visible to PyTorch" in status.reason, status.reason
        assert torch.__version__ in status.reason


def test_bf16_is_offered_exactly_where_the_cpu_computes_bf16_natively() -> None:
    flags = set(cpu_info().get("flags", []))
    status = availability(get_target("aoti-cpu-bf16"))
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert status.ok, status.reason
    else:
        assert not status.ok and "bf16 is not native" in status.reason, status.reason
    zen3 = native_bf16(frozenset({"avx2", "fma"}))
    assert not zen3.ok and "AVX-512 BF16 or AMX-BF16" in zen3.reason
    assert native_bf16(frozenset({"avx2", "amx_bf16"})).ok
    assert native_bf16(frozenset({"avx512f", "avx512_bf16"})).ok


def test_precisions_outside_a_device_are_refused() -> None:
    for kind, precision in (("cpu", "fp16"), ("cpu", "int8"), ("cuda", "bf16")):
        status = AOTInductor(kind).availability(precision)
        assert not status.ok and precision in status.reason


# ------------------------------------------------------------- compatibility of a package


def _engine(device: dict[str, Any], torch_version: str = "2.13.0+cu130") -> dict[str, Any]:
    return {"file": ENGINE_FILE, "backend_version": torch_version, "device": device}


H100 = {"kind": "gpu", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
H200 = {"kind": "gpu", "name": "NVIDIA H200", "compute_capability": "9.0"}
L4 = {"kind": "gpu", "name": "NVIDIA L4", "compute_capability": "8.9"}


def test_another_torch_version_is_refused_with_both_versions() -> None:
    with pytest.raises(BundleError) as err:
        check_aoti_engine(_engine(H100), H100, "2.11.0+cu130")
    assert "2.13.0+cu130" in str(err.value) and "2.11.0+cu130" in str(err.value)
    check_aoti_engine(_engine(H100), H100, "2.13.0+cu130")  # the same: accepted


@pytest.mark.parametrize("found", [H200, L4], ids=["same-cc", "other-cc"])
def test_another_gpu_is_refused_with_both_gpus(found: dict[str, Any]) -> None:
    with pytest.raises(BundleError) as err:
        check_aoti_engine(_engine(H100), found, "2.13.0+cu130")
    message = str(err.value)
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in message
    assert f"{found['name']} (compute capability {found['compute_capability']})" in message


def test_a_gpu_package_without_a_gpu_is_refused() -> None:
    none = {"kind": "gpu", "name": None, "compute_capability": None}
    with pytest.raises(BundleError, match="no CUDA GPU is visible"):
        check_aoti_engine(_engine(H100), none, "2.13.0+cu130")


def test_a_cpu_package_needs_the_cpu_flags_it_was_compiled_for() -> None:
    amx = {"kind": "cpu", "flags": ["avx2", "avx512f", "amx_bf16"]}
    zen3 = {"kind": "cpu", "flags": ["avx2", "fma"]}
    with pytest.raises(BundleError, match="amx_bf16"):
        check_aoti_engine(_engine(amx, "2.13.0+cpu"), zen3, "2.13.0+cpu")
    check_aoti_engine(_engine(zen3, "2.13.0+cpu"), amx | {"flags": ["avx2", "fma"]}, "2.13.0+cpu")


# ------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_finds_the_smallest_input_it_accepts(weights_dir: Path) -> None:
    """RLFN runs from 15×15 LR, but its ESA pools to 1×1 up to 20×20, a size torch.export
    specialises: the package is compiled from 21×21 on and says so."""
    recipe = find_recipe("rlfn_x4")
    model = recipe.build_model()
    load_weights(model, load_checkpoint(weights_dir / "rlfn_x4.pth"))
    program, min_hw = export_dynamic(model.eval(), (15, 15), 96, torch.device("cpu"))
    assert min_hw == (21, 21)
    x = torch.rand(1, 3, 21, 23) * 255
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(program.module()(x), ref, rtol=0, atol=1e-3)
    # its bf16 form re-exports over the same range (export cannot prove a guard of bf16
    # bilinear resizing on its own; the float32 program's range holds, casts change no shape)
    graph = program.module()
    plan = plan_precision(graph, measure_ranges(graph, [torch.rand(1, 3, 32, 32) * 255]), BF16)
    mixed = export_program(
        apply_precision(graph, plan)[0], min_hw, 96, torch.device("cpu"), proven=True
    )
    with torch.no_grad():
        got = mixed.module()(x)
    assert got.dtype == torch.float32 and 0 < float((got - ref).abs().max()) < 0.1 * 255


# ------------------------------------------------------------------ a real CPU package


@pytest.fixture(scope="module")
def cpu_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    return _compile(tiny_ckpt, "aoti-cpu-fp32", tmp_path_factory.mktemp("aoti") / "fp32")


def test_cpu_fp32_bundle_is_validated_and_describes_its_package(cpu_bundle: CompileResult) -> None:
    m = cpu_bundle.manifest
    assert (m["target"], m["backend"], m["precision"]) == ("aoti-cpu-fp32", "aotinductor", "fp32")
    assert m["engine"]["file"] == ENGINE_FILE and ENGINE_FILE in m["files"]
    assert m["engine"]["backend_version"] == torch.__version__
    device = m["engine"]["device"]
    assert device["kind"] == "cpu" and device["torch"] == torch.__version__
    assert device["flags"] == cpu_info()["flags"]
    settings = m["engine"]["settings"]
    assert settings["device"] == "cpu" and settings["max_side"] == 1920
    assert settings["inductor_configs"] == {"freezing": True}
    for result in m["validation"].values():
        assert result["passed"] and result["parity_min_psnr"] > 100  # float32: reordered sums
    assert "precision_onnx" not in m
    assert validate_bundle(cpu_bundle.bundle, [], None)["failures"] == []


def test_cpu_package_runs_odd_batched_and_refuses_shapes_outside_its_range(
    cpu_bundle: CompileResult,
) -> None:
    bundle = open_bundle(cpu_bundle.bundle)
    session = AOTInductor("cpu").load(bundle.engine_path, bundle.manifest["engine"]["settings"])
    model = _tiny()
    for n, h, w in ((1, 37, 53), (2, 20, 31), (1, 1, 1)):
        x = _lr(h, w, n)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = session.run(x)
        assert got.shape == ref.shape == (n, 3, 3 * h, 3 * w) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="1×3×1921×8"):
        session.run(_lr(1921, 8))


def test_package_loads_in_a_process_that_never_imports_the_model_code(
    cpu_bundle: CompileResult, tmp_path: Path
) -> None:
    x = _lr(29, 41)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import json, sys, numpy as np\n"
        "from esr_deploy.runtime.bundle_reader import open_bundle\n"
        "from esr_deploy.targets import require_available\n"
        f"b = open_bundle({str(cpu_bundle.bundle)!r})\n"
        "_, backend = require_available(b.manifest['target'])\n"
        "backend.check_engine(b.manifest)\n"
        "s = backend.load(b.engine_path, b.manifest['engine']['settings'])\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, s.run(np.load({str(tmp_path / 'x.npy')!r})))\n"
        "print(json.dumps(sorted(m for m in sys.modules if 'tiny_sr' in m or 'zoo' in m)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    with torch.no_grad():
        ref = _tiny()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, atol=1e-5, rtol=0)


def test_a_bundle_from_another_torch_is_refused(cpu_bundle: CompileResult) -> None:
    manifest = json.loads((cpu_bundle.bundle / "manifest.json").read_text())
    manifest["engine"]["backend_version"] = "2.4.0+cpu"
    with pytest.raises(BundleError) as err:
        AOTInductor("cpu").check_engine(manifest)
    assert "2.4.0+cpu" in str(err.value) and torch.__version__ in str(err.value)


@pytest.mark.slow
def test_cpu_bf16_compiles_where_native_and_is_refused_elsewhere(
    tiny_ckpt: Path, tmp_path: Path
) -> None:
    status = availability(get_target("aoti-cpu-bf16"))
    if not status.ok:
        with pytest.raises(TargetUnavailable, match="bf16 is not native"):
            _compile(tiny_ckpt, "aoti-cpu-bf16", tmp_path / "bf16")
        return
    m = _compile(tiny_ckpt, "aoti-cpu-bf16", tmp_path / "bf16").manifest
    low = m["precision_onnx"]["low_precision"]
    assert low["dtype"] == "bfloat16" and low["low_precision_nodes"] > 0
    for result in m["validation"].values():
        assert result["passed"]
        # bfloat16 for real: far from float32's parity, above the bf16 floor
        assert 45 <= result["parity_min_psnr"] < 90, result["parity_min_psnr"]


# ------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def cuda_bundles(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One aoti-cuda-fp32 and one aoti-cuda-fp16 bundle of the tiny model (skips without
    a usable GPU); each compile is validated by compile_model itself."""
    folder = tmp_path_factory.mktemp("aoti-cuda")
    bundles = {}
    for precision in ("fp32", "fp16"):
        status = AOTInductor("cuda").availability(precision)
        if not status.ok:
            pytest.skip(status.reason)
        bundles[precision] = _compile(
            tiny_ckpt, f"aoti-cuda-{precision}", folder / precision
        ).bundle
    return bundles


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "floor"), [("fp32", 90.0), ("fp16", 45.0)])
def test_cuda_bundle_matches_the_reference(
    cuda_bundles: dict[str, Path], precision: str, floor: float
) -> None:
    bundle = open_bundle(cuda_bundles[precision])
    m = bundle.manifest
    device = m["engine"]["device"]
    assert device["name"] == torch.cuda.get_device_name()
    assert device["compute_capability"] and device["cuda"] == torch.version.cuda
    assert device["driver"] and device["torch"] == torch.__version__
    for result in m["validation"].values():
        assert result["passed"] and result["parity_min_psnr"] >= floor
    if precision == "fp16":
        assert m["precision_onnx"]["low_precision"]["dtype"] == "float16"
    session = AOTInductor("cuda").load(bundle.engine_path, m["engine"]["settings"])
    model = _tiny()
    for n, h, w in ((1, 37, 53), (2, 64, 48), (1, 90, 30), (1, 1, 1)):
        x = _lr(h, w, n)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = session.run(x)
        assert got.shape == ref.shape and _psnr(got, ref) >= floor


@pytest.mark.gpu
def test_cuda_graph_replay_equals_plain_runs(cuda_bundles: dict[str, Path]) -> None:
    bundle = open_bundle(cuda_bundles["fp16"])
    settings = bundle.manifest["engine"]["settings"]
    assert settings["cuda_graph"] is True
    graphed = AOTInductor("cuda").load(bundle.engine_path, settings)
    plain = AOTInductor("cuda").load(bundle.engine_path, {**settings, "cuda_graph": False})
    for h, w in ((64, 64), (64, 64), (64, 64), (40, 56), (40, 56)):
        x = _lr(h, w, seed=h + w)
        np.testing.assert_array_equal(graphed.run(x), plain.run(x))
    assert graphed.cuda_graph, "the capture fell back to plain runs"


@pytest.mark.gpu
def test_cuda_fp16_keeps_the_overflowing_layer_in_float32(tmp_path: Path) -> None:
    _require_cuda("fp16")
    model = LoudSR().eval()
    calib = CalibrationSet(tuple(_lr(32, 32, seed=s) * 255 for s in range(2)), ("a", "b"), "test")
    built = AOTInductor("cuda").build_model(
        model, tmp_path, "fp16", ShapeProfile(opt=(32, 32), max=(128, 128), min=(4, 4)), calib, []
    )
    assert built.precision_info is not None
    kept = built.precision_info["low_precision"]["kept_float32"]
    assert any("reaches |x|" in k["reason"] for k in kept)
    session = AOTInductor("cuda").load(tmp_path / ENGINE_FILE, built.engine.settings)
    x = _lr(48, 40) * 255
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
        blind = copy.deepcopy(model).cuda().half()(torch.from_numpy(x).cuda().half())
    got = session.run(x)
    assert not torch.isfinite(blind).all() and np.isfinite(got).all()
    assert _psnr(got / 255, ref / 255) >= 45


def _require_cuda(precision: str) -> None:
    status = AOTInductor("cuda").availability(precision)
    if not status.ok:
        pytest.skip(status.reason)


@pytest.mark.gpu
def test_a_cuda_bundle_for_another_gpu_is_refused(cuda_bundles: dict[str, Path]) -> None:
    m = open_bundle(cuda_bundles["fp32"]).manifest
    backend = AOTInductor("cuda")
    backend.check_engine(m)  # this GPU, this torch: accepted
    engine = {**m["engine"]}
    engine["device"] = {**engine["device"], "name": "NVIDIA A100-SXM4-80GB"}
    engine["device"]["compute_capability"] = "8.0"
    with pytest.raises(BundleError) as err:
        backend.check_engine({**m, "engine": engine})
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in str(err.value)
    assert torch.cuda.get_device_name() in str(err.value)
