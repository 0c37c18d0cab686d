"""Weight normalisation and other parametrizations folded into plain weights (issue 18,
class 1): the fold itself on real modules, copies of models with non-leaf tensor attributes,
and user networks trained with weight normalisation compiled end to end through the default
passes (which used to fail: ``copy.deepcopy`` refused the hook's non-leaf ``weight``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from user_models.weight_norm_sr import (
    HookWeightNormSR,
    NonLeafAttributeSR,
    ParametrizedWeightNormSR,
)

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.detect import ModelSource
from esr_deploy.passes.base import copy_model
from esr_deploy.passes.weight_norm import fold_weight_normalisation

REPO = Path(__file__).resolve().parents[2]
MODULE = "tests.user_models.weight_norm_sr"


def _randomised(model: nn.Module) -> nn.Module:
    """Random magnitudes ``g`` (a trained net's are far from the norms of ``v``)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 + 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "factory",
    [
        HookWeightNormSR,
        ParametrizedWeightNormSR,
        lambda: nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))),
        lambda: nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3))),
    ],
    ids=["weight_norm-hook", "weight_norm-parametrization", "spectral-param", "spectral-hook"],
)
def test_fold_is_exact_and_leaves_plain_parameters(factory) -> None:
    torch.manual_seed(0)
    model = _randomised(factory())
    x = torch.rand(1, 3, 11, 13)
    with torch.no_grad():
        before = model(x)
    folded = fold_weight_normalisation(model)
    assert folded, "nothing was folded"
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    for module in model.modules():
        assert not parametrize.is_parametrized(module)
        assert not module._forward_pre_hooks
        assert not any(
            n.endswith(("_g", "_v", "_orig", "_u")) for n, _ in module.named_parameters()
        )
    copy.deepcopy(model)  # a plain model copies


def test_fold_does_nothing_to_a_plain_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3))
    keys = list(model.state_dict())
    assert fold_weight_normalisation(model) == []
    assert list(model.state_dict()) == keys


def test_copy_model_copies_non_leaf_tensor_attributes() -> None:
    model = NonLeafAttributeSR()
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    clone = copy_model(model)
    assert clone.gain is not model.gain and torch.equal(clone.gain, model.gain.detach())
    assert clone.head.weight is not model.head.weight
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize(
    "arch", ["HookWeightNormSR", "ParametrizedWeightNormSR", "NonLeafAttributeSR"]
)
def test_weight_normalised_user_network_compiles(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = _randomised({"HookWeightNormSR": HookWeightNormSR,
                         "ParametrizedWeightNormSR": ParametrizedWeightNormSR,
                         "NonLeafAttributeSR": NonLeafAttributeSR}[arch]())  # fmt: skip
    ckpt = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), ckpt)
    monkeypatch.chdir(REPO)
    result = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=ckpt, arch=f"{MODULE}:{arch}", scale=4, data_range=1),
            out=tmp_path / "bundle",
            latency_shapes=(),
        )
    )
    m = result.manifest
    assert m["validation"]["set5_crops"]["parity_min_psnr"] >= 60.0
    assert [p["name"] for p in m["passes"]][:1] == ["fold-reparam"]
    if arch != "NonLeafAttributeSR":
        assert any("Weight normalisation folded" in n for n in result.notes), result.notes
        # the three branches of the block fold into one conv once the weights are plain
        assert m["metrics"]["convs"] < m["metrics"]["training_form"]["convs"]
