"""Issue acceptance: every training-form zoo model compiles to its published deploy form.

For each training-form recipe: random weights with BatchNorm statistics calibrated on a real
LR image (``randomize``; folding must be exact whatever the weights), saved as a checkpoint,
compiled with the default passes to ``ort-fp32`` and validated on Set5. The deploy ONNX must
have exactly the closed-form conv and parameter counts of the published deploy architecture
(``deploy_spec``), no BatchNormalization node, and parity >= 70 dB against the training form.
"""

from __future__ import annotations

import onnx
import pytest
import torch

from esr_deploy.compiling import CompileOptions, compile_model
from esr_deploy.export import graph_stats
from esr_deploy.loading.detect import ModelSource
from esr_deploy.recipe import find_recipe
from esr_deploy.zoo.training import calibration_image, deploy_spec, randomize

TRAINING_FORMS = ["ecbsr_m4c16_x4", "fmen_train_x4", "rlfn_rep_x4", "repvgg_sr_x4", "dbb_sr_x4"]
PARITY_FLOOR_DB = 70.0


@pytest.mark.slow  # an end-to-end compile or emulation: make test runs it, test-fast skips it
@pytest.mark.parametrize("name", TRAINING_FORMS)
def test_training_form_compiles_to_closed_form_deploy(name, tmp_path, sr_data_dir) -> None:
    recipe = find_recipe(name)
    model = recipe.build_model()
    randomize(model, seed=0, calibration=calibration_image(recipe.data_range))
    ckpt = tmp_path / f"{name}.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)

    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=ckpt, recipe=name),
            val_dirs=(sr_data_dir / "Set5",),
            out=tmp_path / "bundle",
            latency_shapes=(),
        )
    )
    manifest = result.manifest
    graph = onnx.load(str(result.bundle / "model.fp32.onnx"))
    stats = graph_stats(graph)
    spec = deploy_spec(name)

    assert "BatchNormalization" not in stats.op_types
    assert (stats.convs, stats.params) == (spec.convs, spec.params)
    assert manifest["validation"]["Set5"]["parity_min_psnr"] >= PARITY_FLOOR_DB
    folded = [p for p in manifest["passes"] if p["modified"]]
    assert folded and folded[0]["name"] == "fold-reparam"
    assert manifest["passes"][-1]["convs_after"] == spec.convs
    assert manifest["metrics"]["training_form"]["params"] > spec.params


def test_passes_none_keeps_the_training_form(tmp_path) -> None:
    """`--passes none`: nothing folded, BatchNormalization (or its decomposition) stays."""
    name = "repvgg_sr_x4"
    recipe = find_recipe(name)
    model = recipe.build_model()
    randomize(model, seed=1)
    ckpt = tmp_path / "m.pth"
    torch.save(model.state_dict(), ckpt)
    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=ckpt, recipe=name),
            out=tmp_path / "b",
            latency_shapes=(),
            passes=(),
        )
    )
    assert result.manifest["passes"] == []
    stats = graph_stats(onnx.load(str(result.bundle / "model.fp32.onnx")))
    assert stats.convs > deploy_spec(name).convs
