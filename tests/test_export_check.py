"""The export check on real LR crops, the float64 reference and the exporter fallback
(issue 18, classes 3 and 4), with user networks from ``tests/user_models/``, the real
exporters and ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from user_models.noise_unstable_sr import Float32OnlySR, NoiseUnstableSR
from user_models.window_sr import AdaptivePoolSR, WindowGateSR

from esr_deploy.data import load_validation_set, to_tensor
from esr_deploy.errors import ExportError
from esr_deploy.export import EXPORT_TOLERANCE, export_onnx
from esr_deploy.export_check import check_graph, export_check_inputs
from esr_deploy.paths import default_val_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def real_inputs() -> list[tuple[str, torch.Tensor]]:
    pairs = load_validation_set(default_val_dir(), 4).pairs
    return export_check_inputs(
        [(p.name, p.lr) for p in pairs], lambda a: to_tensor(a, 1.0), (1, 1), 1.0
    )


def test_check_inputs_are_real_crops_at_odd_and_minimal_sizes(real_inputs) -> None:
    labels = [label for label, _ in real_inputs]
    assert labels[0] == "bird 48×48"
    sizes = {tuple(x.shape[-2:]) for _, x in real_inputs}
    assert {(1, 1), (37, 53), (45, 27), (48, 48)} <= sizes
    for _, x in real_inputs:  # images, not noise: neighbouring pixels are close
        if x.shape[-1] > 8:
            assert float((x[..., 1:] - x[..., :-1]).abs().mean()) < 0.1
    assert [label for label, _ in export_check_inputs([], torch.from_numpy, (2, 3), 1.0)] == [
        "random 2×3",
        "random 37×53",
        "random 45×27",
    ]


@pytest.mark.slow  # two exports (dynamo and TorchScript): 30-60 s on 2 busy cores
def test_sound_model_unstable_on_noise_compiles_on_real_crops(real_inputs, tmp_path: Path) -> None:
    """Class 3: on uniform noise PyTorch's float32 result is itself far from float64, so the
    old check on noise rejected this sound model; on real crops it is exact to float32."""
    torch.manual_seed(0)
    model = NoiseUnstableSR().eval()
    result = export_onnx(model, tmp_path / "m.onnx", 4, 1.0, check_inputs=real_inputs)
    assert result.max_abs_error <= EXPORT_TOLERANCE
    assert result.checked_on[0] == "bird 48×48"
    noise = export_check_inputs([], torch.from_numpy, (1, 1), 1.0)
    on_noise = check_graph(result.path, model, 1.0, noise, EXPORT_TOLERANCE)
    assert on_noise.failure is None  # accepted against float64, and it says why
    assert on_noise.max_error > EXPORT_TOLERANCE  # what the check on noise used to reject
    assert any("float32 is unstable here" in n for n in on_noise.notes), on_noise.notes


@pytest.mark.slow  # two exports (dynamo and TorchScript): 30-60 s on 2 busy cores
def test_graph_that_differs_names_the_input_and_the_first_differing_node(
    real_inputs, tmp_path: Path
) -> None:
    """A graph that differs from PyTorch beyond the tolerance (and no float64 reference to
    excuse it) is rejected by both exporters, naming the input and where it departs."""
    torch.manual_seed(0)
    model = Float32OnlySR(gain=3e-3).eval()
    with pytest.raises(ExportError) as info:
        export_onnx(model, tmp_path / "m.onnx", 4, 1.0, check_inputs=real_inputs[:1])
    message = str(info.value)
    assert "the dynamo export fails on bird 48×48 at node 'pow" in message
    assert "torchscript export fails on bird 48×48" in message
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow  # two exports (dynamo and TorchScript): 30-60 s on 2 busy cores
def test_export_that_loses_dynamic_size_falls_back_to_the_other_exporter(
    real_inputs, tmp_path: Path
) -> None:
    """Class 4: window padding under ``if``: dynamo's graph fails at other sizes inside ONNX
    Runtime; the TorchScript exporter, traced at an odd size, records the padding."""
    torch.manual_seed(0)
    model = WindowGateSR().eval()
    result = export_onnx(model, tmp_path / "m.onnx", 4, 1.0, check_inputs=real_inputs)
    assert result.exporter == "torchscript"
    assert any("dynamo export rejected" in n and "cropped to" in n for n in result.notes)
    assert result.max_abs_error <= EXPORT_TOLERANCE
    with pytest.raises(ExportError, match="the dynamo export fails on .* at node"):
        export_onnx(model, tmp_path / "d.onnx", 4, 1.0, check_inputs=real_inputs, exporter="dynamo")


@pytest.mark.slow  # two exports (dynamo and TorchScript): 30-60 s on 2 busy cores
def test_export_that_holds_at_no_other_size_is_exit_2_naming_the_size(tmp_path: Path) -> None:
    """Class 4: pooling to a size computed from the input: no dynamic export holds; the CLI
    says at which size, and that a fixed-size export (with tiling) would work."""
    torch.manual_seed(0)
    ckpt = tmp_path / "pool.pth"
    torch.save(AdaptivePoolSR().state_dict(), ckpt)
    proc = subprocess.run(
        [sys.executable, "-m", "esr_deploy.cli", "compile", str(ckpt), "--arch",
         "tests.user_models.window_sr:AdaptivePoolSR", "--scale", "4", "--data-range", "1",
         "--no-latency", "--passes", "none", "--out", str(tmp_path / "b")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("error: ") :].replace("\n", " ")
    for words in ("Could not export a graph that matches PyTorch at every size",
                  "the dynamo export fails on", "cropped to", "lost the dynamic H×W",
                  "a fixed-size export would work", "tiling can then serve any size"):  # fmt: skip
        assert words in message, message
    assert not (tmp_path / "b").exists()


def test_exporter_option_is_checked_before_any_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "esr_deploy.cli", "compile", "missing.pth", "--exporter", "jit"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--exporter 'jit' is not an exporter" in proc.stderr


def test_noise_unstable_model_compiles_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Class 3 through the whole compile: the pass verification (also run on noise) and the
    export check accept it; parity on the Set5 crops is far above the floor."""
    from esr_deploy.compiling.options import CompileOptions
    from esr_deploy.compiling.pipeline import compile_model
    from esr_deploy.loading.detect import ModelSource

    torch.manual_seed(0)
    ckpt = tmp_path / "noise.pth"
    torch.save(NoiseUnstableSR().state_dict(), ckpt)
    monkeypatch.chdir(REPO)
    arch = "tests.user_models.noise_unstable_sr:NoiseUnstableSR"
    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=ckpt, arch=arch, scale=4, data_range=1),
            out=tmp_path / "b",
            latency_shapes=(),
        )
    )
    m = result.manifest
    assert m["validation"]["set5_crops"]["parity_min_psnr"] >= 60.0
    assert any(p["name"] == "fold-reparam" and p["modified"] for p in m["passes"])
