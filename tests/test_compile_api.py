"""``esr_deploy.compile``: the Python API, from an ``nn.Module``, an ONNX file and a
checkpoint path, with real components (PyTorch, the ONNX exporter, ONNX Runtime, OpenVINO)
on the validation crops that ship with esr-deploy; and ``--target auto`` runs the frontend
once (the exporter and the input-range probe are counted, calling through to the real ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from user_models import tiny_args
from user_models.tiny_sr import TinyGatedSR

import esr_deploy
from esr_deploy.compiling import frontend as frontend_module
from esr_deploy.compiling.api import state_sha256
from esr_deploy.compiling.onnx_source import ONNX_SOURCE, onnx_metrics
from esr_deploy.errors import CheckpointError, EsrDeployError
from esr_deploy.paths import example_checkpoint
from esr_deploy.runtime.bundle_reader import open_bundle

SCALE = 4
FP32_PARITY_DB = 60.0
FRONTEND_STAGES = {"load", "probe", "passes", "export"}
#: the TorchScript exporter: the same checks as dynamo, a fraction of its time on a tiny model
FAST = {"exporter": "torchscript", "latency_shapes": ()}
BACKEND_STAGES = {"build", "validate"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyGatedSR(**tiny_args(SCALE))


def export_tiny(path: Path, dynamic: bool = True, model: nn.Module | None = None) -> Path:
    """A plain TorchScript-exporter ONNX with its own input/output names."""
    model = (model or tiny_model()).eval()
    axes = {"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "h2", 3: "w2"}}
    torch.onnx.export(
        model, (torch.rand(1, 3, 24, 24),), str(path), input_names=["lr"], output_names=["sr"],
        dynamic_axes=axes if dynamic else None, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


def assert_stages(seconds: dict[str, float], stages: set[str]) -> None:
    assert stages | {"total"} <= set(seconds), seconds
    assert all(v >= 0.0 for v in seconds.values())
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"] + 1e-3


def test_compile_an_nn_module(tmp_path: Path) -> None:
    model = tiny_model().train()  # the caller's module and its mode are left alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = esr_deploy.compile(model, "ort-fp32", scale=SCALE, out=tmp_path / "b", **FAST)
    m = result.manifest
    assert result.bundle == (tmp_path / "b").resolve() and result.digest.startswith("sha256:")
    assert m["scale"] == SCALE and m["data_range"] == 1.0
    assert m["arch"] == "user_models.tiny_sr:TinyGatedSR"
    assert m["checkpoint"]["sha256"] == state_sha256(model)
    assert m["checkpoint"]["path"] == "<nn.Module user_models.tiny_sr:TinyGatedSR>"
    assert all(v["parity_min_psnr"] >= FP32_PARITY_DB for v in m["validation"].values())
    assert_stages(m["compile_seconds"], FRONTEND_STAGES | BACKEND_STAGES | {"report"})
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the bundle serves what the module computes
    x = np.random.default_rng(0).random((20, 28, 3), dtype=np.float32)
    up = esr_deploy.load(result.bundle, digest=result.digest).upscale(x)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x).permute(2, 0, 1)[None]).clamp(0, 1)
    assert up.shape == (80, 112, 3)
    assert np.abs(up.astype(np.float32) - want[0].permute(1, 2, 0).numpy()).max() < 1e-3


def test_compile_an_onnx_file(tmp_path: Path) -> None:
    model = tiny_model().eval()
    path = export_tiny(tmp_path / "tiny.onnx", model=model)
    result = esr_deploy.compile(path, "ort-fp32", out=tmp_path / "b", latency_shapes=())
    m = result.manifest
    assert m["scale"] == SCALE  # read from shapes
    assert m["export"]["exporter"] == ONNX_SOURCE and m["passes"] == []
    assert m["checkpoint"]["path"] == str(path.resolve())
    assert m["metrics"]["convs"] == sum(isinstance(x, nn.Conv2d) for x in model.modules())
    assert m["metrics"]["flops_256"] > 0 and m["metrics"]["activations_256"] > 0
    assert all(v["parity_min_psnr"] >= FP32_PARITY_DB for v in m["validation"].values())
    assert_stages(m["compile_seconds"], {"load", "probe", "export", "build", "validate"})
    bundle = open_bundle(result.bundle, digest=result.digest)
    graph = onnx.load(str(bundle.file(m["reference_onnx"])))
    assert [i.name for i in graph.graph.input] == [m["inputs"][0]["name"]]
    assert [o.name for o in graph.graph.output] == [m["outputs"][0]["name"]]


def test_onnx_conv_counts_match_the_model(tmp_path: Path) -> None:
    """MACs counted on the ONNX graph equal those of the module's own convs at 256×256."""
    model = tiny_model().eval()
    graph = onnx.load(str(export_tiny(tmp_path / "t.onnx", model=model)))
    counted = onnx_metrics(graph)
    convs = [c for c in model.modules() if isinstance(c, nn.Conv2d)]
    assert counted["convs"] == len(convs)
    # every conv here keeps H×W at 256×256 (padding 'same'): weight numel × 256²
    assert counted["flops"] == sum(c.weight.numel() for c in convs) * 256 * 256


class Stretch(nn.Module):
    """Not an SR network: x2 in height, x3 in width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, scale_factor=(2.0, 3.0), mode="nearest")


class Gray(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


def test_onnx_that_cannot_work_is_refused(tmp_path: Path) -> None:
    fixed = export_tiny(tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(CheckpointError, match="fixed N=1, H=24, W=24"):
        esr_deploy.compile(fixed, out=tmp_path / "a")
    axes = {"lr": {0: "n", 2: "h", 3: "w"}}
    stretch = tmp_path / "stretch.onnx"
    torch.onnx.export(Stretch(), (torch.rand(1, 3, 8, 8),), str(stretch), input_names=["lr"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="scale cannot be read from shapes"):
        esr_deploy.compile(stretch, out=tmp_path / "b")
    gray = tmp_path / "gray.onnx"
    torch.onnx.export(Gray(), (torch.rand(1, 1, 8, 8),), str(gray), input_names=["lr"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="has 1 channels, not 3"):
        esr_deploy.compile(gray, out=tmp_path / "c")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x89PNG not a model")
    with pytest.raises(CheckpointError, match="not a valid ONNX model"):
        esr_deploy.compile(garbage, out=tmp_path / "d")
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing written


def test_api_refuses_what_it_cannot_compile(tmp_path: Path) -> None:
    with pytest.raises(EsrDeployError, match="pass scale="):
        esr_deploy.compile(tiny_model(), out=tmp_path / "a")
    with pytest.raises(EsrDeployError, match="unknown option.*latency_shape\\b"):
        esr_deploy.compile(tiny_model(), scale=SCALE, latency_shape=(), out=tmp_path / "b")
    with pytest.raises(EsrDeployError, match="give a checkpoint path"):
        esr_deploy.compile(42, out=tmp_path / "c")  # type: ignore[arg-type]
    with pytest.raises(EsrDeployError, match="unknown peer.*eager-fp64"):  # before any build
        esr_deploy.compile(tiny_model(), "auto", scale=SCALE, auto_peers=("eager-fp64",),
                           out=tmp_path / "d")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_auto_runs_the_frontend_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"export_onnx": 0, "derive_input_range": 0}
    for name in calls:
        real = getattr(frontend_module, name)

        def counted(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(frontend_module, name, counted)
    candidates = ("ort-fp32", "ov-fp32")
    result = esr_deploy.compile(tiny_model(), "auto", scale=SCALE, out=tmp_path / "auto",
                                auto_candidates=candidates, passes=(), **FAST)  # fmt: skip
    assert calls == {"export_onnx": 1, "derive_input_range": 1}
    m = result.manifest
    ran = [c for c in m["auto"]["candidates"] if c.get("passed")]
    assert {c["target"] for c in ran} == set(candidates)
    for c in ran:  # per candidate: the backend step only
        assert_stages(c["compile_seconds"], BACKEND_STAGES)
        assert not FRONTEND_STAGES & set(c["compile_seconds"])
    assert_stages(m["compile_seconds"], FRONTEND_STAGES | {"candidates", "timing", "report"})
    assert m["target"] == m["auto"]["chosen"]
    assert not list(tmp_path.glob("esr-deploy-*"))


def test_auto_times_the_engines_of_an_onnx_source_without_peers(tmp_path: Path) -> None:
    """An ONNX file has no ``nn.Module`` for the peers: auto times its candidates alone."""
    source = export_tiny(tmp_path / "tiny.onnx")
    candidates = ("ort-fp32", "ov-fp32")
    result = esr_deploy.compile(source, "auto", out=tmp_path / "auto",
                                auto_candidates=candidates, latency_shapes=())  # fmt: skip
    auto = result.manifest["auto"]
    timed = [c for c in auto["candidates"] if c.get("passed")]
    assert {c["target"] for c in timed} == set(candidates)
    assert all(c["median_ms"] > 0 for c in timed)
    assert auto["chosen"] == min(timed, key=lambda c: c["median_ms"])["target"]
    assert not auto.get("peers") and not auto.get("vs_best_peer")


@pytest.mark.slow  # the bundled RLFN, probed and verified by every pass: about a minute
def test_compile_the_bundled_checkpoint(tmp_path: Path) -> None:
    result = esr_deploy.compile(example_checkpoint(), "ort-fp32", out=tmp_path / "rlfn",
                                latency_shapes=())  # fmt: skip
    m = result.manifest
    assert m["name"] == "rlfn_x4" and m["scale"] == 4
    assert [p["name"] for p in m["passes"]]  # the passes ran on the checkpoint's model
    assert all(v["parity_min_psnr"] >= FP32_PARITY_DB for v in m["validation"].values())
    assert_stages(m["compile_seconds"], FRONTEND_STAGES | BACKEND_STAGES)
