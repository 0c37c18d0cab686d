"""``esr-deploy export --triton``: entries checked against Triton's own ``ModelConfig`` schema.

Every generated ``config.pbtxt`` is parsed with protobuf's text format into
``inference.ModelConfig`` from the ``tritonclient`` package (the schema Triton itself parses),
and its names, data types and dims are compared with the ONNX graph. The exported model file
is then run the way the Triton backend would run it (ONNX Runtime for ``onnxruntime``,
OpenVINO for ``openvino``) on a batch of four different Set5 crops, and each image is
compared with the bundle's own single-image output at the target's parity floor.

The RLFN ``ort-fp32`` bundle is compiled once for the module (about 40 s on a loaded 2-core
machine); the ``ov-fp32`` and ``onnx-fp16`` bundles are compiled too in ``make test``
(``slow``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest
import torch
import tritonclient
from google.protobuf import text_format
from manifest_samples import sample_manifest
from typer.testing import CliRunner

import esr_deploy
from esr_deploy.cli import app
from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.data import read_image
from esr_deploy.errors import BundleError, EsrDeployError, ExportError
from esr_deploy.loading.detect import ModelSource
from esr_deploy.paths import example_checkpoint
from esr_deploy.runtime.bundle_reader import Bundle
from esr_deploy.runtime.manifest import Manifest
from esr_deploy.serving.triton import (
    CONFIG,
    EntryPlan,
    TensorSpec,
    TritonRequest,
    batch_limit,
    config_text,
    export_triton,
    verify_version,
)
from esr_deploy.validate.quality import psnr

SET5 = ("baby", "bird", "butterfly", "head")
CROP = 48


def _model_config_module() -> ModuleType:
    """``tritonclient/grpc/model_config_pb2.py`` loaded by path: importing it as
    ``tritonclient.grpc.model_config_pb2`` runs that package's ``__init__``, which needs
    grpcio; the schema itself needs only protobuf."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PB = _model_config_module()
BUNDLES: dict[str, Path] = {}


def _bundle(target: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if target not in BUNDLES:
        torch.set_num_threads(1)
        result = compile_model(
            CompileOptions(
                source=ModelSource(checkpoint=example_checkpoint()),
                target=target,
                val_dirs=(),
                out=tmp_path_factory.mktemp(target) / "bundle",
                latency_shapes=(),
            )
        )
        BUNDLES[target] = result.bundle
    return BUNDLES[target]


def _parse(config: Path) -> Any:
    return text_format.Parse(config.read_text(encoding="utf-8"), PB.ModelConfig())


def _crops(sr_data_dir: Path) -> np.ndarray:
    """Four different Set5 LR images, centre 48×48, as 4×3×48×48 float32 in 0..255."""
    crops = []
    for name in SET5:
        img = read_image(sr_data_dir / "Set5" / "LR_bicubic" / "X4" / f"{name}x4.png")
        top, left = (img.shape[0] - CROP) // 2, (img.shape[1] - CROP) // 2
        crops.append(img[top : top + CROP, left : left + CROP].transpose(2, 0, 1))
    return np.stack(crops).astype(np.float32)


def _run_exported(version_dir: Path, backend: str, batch: np.ndarray) -> np.ndarray:
    """Run the exported model file the way Triton's backend would (on the CPU here)."""
    if backend == "onnxruntime":
        session = ort.InferenceSession(
            str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        return np.asarray(session.run(None, {session.get_inputs()[0].name: batch})[0])
    compiled = ov.Core().compile_model(
        str(version_dir / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    return np.asarray(compiled(batch)[0])


def _graph_io(path: Path) -> list[tuple[str, int, list[Any]]]:
    model = onnx.load(str(path))
    out = []
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]
        out.append((value.name, value.type.tensor_type.elem_type, dims))
    return out


_ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def _check_config(config: Any, bundle: Path, version_dir: Path, name: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    export = json.loads((version_dir / "export.json").read_text())
    graph = version_dir / "model.onnx"
    graph = graph if graph.exists() else bundle / manifest["reference_onnx"]
    assert config.name == name
    assert config.max_batch_size == 8  # the graph's batch is symbolic: default cap
    assert config.HasField("dynamic_batching")
    for tensors, (gname, elem, dims) in zip(
        (config.input, config.output), _graph_io(graph), strict=True
    ):
        assert len(tensors) == 1
        assert tensors[0].name == gname
        assert PB.DataType.Name(tensors[0].data_type) == _ONNX_TO_TRITON[elem]
        assert isinstance(dims[0], str) and dims[1] == 3  # symbolic batch, NCHW
        assert list(tensors[0].dims) == [3, -1, -1]
    assert export["bundle_digest"] == (bundle / "manifest.sha256").read_text().strip()


@pytest.mark.parametrize(
    "target",
    [
        "ort-fp32",
        pytest.param("ov-fp32", marks=pytest.mark.slow),
        pytest.param("onnx-fp16", marks=pytest.mark.slow),
    ],
)
def test_export_parses_into_model_config_and_batch_of_four_matches_bundle(
    target: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, sr_data_dir: Path
) -> None:
    """Done-when of issue 16: schema, names/dtypes/dims vs the graph, batch 4 vs 4 singles."""
    bundle = _bundle(target, tmp_path_factory)
    entry = export_triton(TritonRequest(bundle=bundle, repo=tmp_path / "repo", instances=2))
    name = f"rlfn_x4-{target}"
    config = _parse(tmp_path / "repo" / name / CONFIG)
    _check_config(config, bundle, entry.version_dir, name)
    assert verify_version(entry.version_dir) == entry.digest
    group = config.instance_group[0]
    assert group.count == 2
    gpu = target == "onnx-fp16"
    kind = PB.ModelInstanceGroup.Kind.Name(group.kind)
    assert kind == ("KIND_GPU" if gpu else "KIND_CPU")
    backend = "openvino" if target.startswith("ov-") else "onnxruntime"
    assert config.backend == backend and not config.platform
    params = {k: v.string_value for k, v in config.parameters.items()}
    settings = json.loads((bundle / "manifest.json").read_text())["engine"]["settings"]
    if target == "ort-fp32":
        assert params["intra_op_thread_count"] == str(settings["intra_op_num_threads"])
        assert params["execution_mode"] == "0"
        assert not config.optimization.HasField("graph")  # Triton default = ORT_ENABLE_ALL
        assert "model.fp32.onnx" in entry.plan.note  # the portable graph, not engine.onnx
    if target == "ov-fp32":
        assert params["INFERENCE_NUM_THREADS"] == str(settings["inference_num_threads"])
        assert params["HINT_BF16"] == "NO"
    if gpu:
        (accel,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accel.name == "tensorrt" and dict(accel.parameters) == {"precision_mode": "FP16"}

    lr = _crops(sr_data_dir)
    got = _run_exported(entry.version_dir, backend, lr)
    upscaler = esr_deploy.load(bundle)  # the bundle's own engine, one image per call
    manifest = json.loads((bundle / "manifest.json").read_text())
    validation = manifest["validation"]
    assert manifest["batch"]["range"] == {"min": 1, "max": 64}  # compile checked a batch too
    assert (
        manifest["batch"]["parity"]["min_psnr_vs_single"]
        >= validation["set5_crops"]["required"]["parity_min_psnr"]
    )
    floor_db = min(v["required"]["parity_min_psnr"] for v in validation.values())
    assert got.shape == (4, 3, 4 * CROP, 4 * CROP)
    for i in range(4):
        single = upscaler.run(lr[i : i + 1])[0]
        value = psnr(np.clip(got[i] / 255.0, 0, 1), np.clip(single / 255.0, 0, 1), peak=1.0)
        assert value >= floor_db, f"{SET5[i]}: {value:.1f} dB < {floor_db} dB"
    # the four crops differ, so a batch that returned one image four times would fail above
    assert np.abs(got[0] - got[1]).max() > 10


def test_cli_export_refuses_what_it_must_and_leaves_nothing_half_written(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle = _bundle("ort-fp32", tmp_path_factory)
    repo = tmp_path / "repo"
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(bundle), "--triton", str(repo), "--name", "sr"])
    assert ok.exit_code == 0, ok.output
    assert "model.fp32.onnx" in ok.output  # says which file was exported
    cases = {
        "same version again": ["--name", "sr"],
        "batch above the graph's": ["--name", "b", "--max-batch-size", "1000"],
        "wrong digest": ["--name", "d", "--expect-digest", "sha256:" + "0" * 64],
        "bad name": ["--name", "../x"],
        "version 0": ["--name", "v", "--version", "0"],
    }
    for why, extra in cases.items():
        bad = runner.invoke(app, ["export", str(bundle), "--triton", str(repo), *extra])
        assert bad.exit_code == 2, (why, bad.output)
        assert "Traceback" not in bad.output
    assert sorted(p.name for p in repo.iterdir()) == ["sr"]  # no staging folder left
    # a second version with the same config joins the model; another config is refused
    two = runner.invoke(app, ["export", str(bundle), "--triton", str(repo), "--name", "sr",
                              "--version", "2"])  # fmt: skip
    assert two.exit_code == 0, two.output
    other = runner.invoke(app, ["export", str(bundle), "--triton", str(repo), "--name", "sr",
                                "--version", "3", "--instances", "4"])  # fmt: skip
    assert other.exit_code == 2 and "different config.pbtxt" in other.output
    assert sorted(p.name for p in (repo / "sr").iterdir()) == ["1", "2", CONFIG]


def test_serving_side_detects_a_swapped_model_file(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bundle = _bundle("ort-fp32", tmp_path_factory)
    entry = export_triton(TritonRequest(bundle=bundle, repo=tmp_path / "repo"))
    model = onnx.load(str(entry.version_dir / "model.onnx"))
    model.producer_name = "someone else"
    onnx.save(model, str(entry.version_dir / "model.onnx"))
    with pytest.raises(BundleError, match="not the bundle's model.fp32.onnx"):
        verify_version(entry.version_dir)
    shutil.copyfile(bundle / "manifest.json", entry.version_dir / "manifest.json")
    (entry.version_dir / "manifest.sha256").write_text("sha256:" + "1" * 64)
    with pytest.raises(BundleError, match="manifest was edited"):
        verify_version(entry.version_dir)


def test_tensorrt_plan_config_from_profiles() -> None:
    """trt-* cannot be built here: the config of a plan is checked against the schema from a
    manifest whose profiles allow batches up to 4 (and one that allows only 1)."""

    def bundle(max_batch: int) -> Bundle:
        profile = {"min": [1, 3, 16, 16], "opt": [max_batch, 3, 256, 256],
                   "max": [max_batch, 3, 1080, 1920]}  # fmt: skip
        manifest = sample_manifest(
            target="trt-fp32", backend="tensorrt", export={"input_range": {"min_hw": [16, 16]}}
        )  # no batch: the profiles say it
        manifest["engine"]["settings"] = {"profiles": [profile]}
        return Bundle(Path("."), Manifest.from_json(manifest), "sha256:" + "0" * 64)

    plan = EntryPlan((("engine.plan", "model.plan"),), 'platform: "tensorrt_plan"', True,
                     "model.fp32.onnx", "plan")  # fmt: skip
    io = (TensorSpec("lr", "float32", 3, None), TensorSpec("sr", "float32", 3, None))
    assert batch_limit(bundle(4), plan, io[0]) == 4
    config = text_format.Parse(config_text("sr", plan, io, 4, 1), PB.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert PB.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"
    assert list(config.input[0].dims) == [3, -1, -1]
    assert batch_limit(bundle(1), plan, io[0]) == 1
    fixed = text_format.Parse(config_text("sr", plan, io, 0, 1), PB.ModelConfig())
    assert fixed.max_batch_size == 0 and list(fixed.output[0].dims) == [-1, 3, -1, -1]
    assert not fixed.HasField("dynamic_batching")


def test_request_errors_are_typed() -> None:
    from esr_deploy.serving.triton import check_request, resolve_max_batch

    with pytest.raises(EsrDeployError, match="instance"):
        check_request(TritonRequest(Path("b"), Path("r"), instances=0))
    with pytest.raises(ExportError, match="at most 1"):
        resolve_max_batch(2, 1)
    assert resolve_max_batch(None, 1) == 0 and resolve_max_batch(None, 64) == 8
