"""prune-channels: dead channels removed exactly across coupled layers; lossy mode reports."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.loading.checkpoint import load_checkpoint
from esr_deploy.loading.detect import ModelSource
from esr_deploy.loading.keys import load_weights
from esr_deploy.passes.base import PassContext
from esr_deploy.passes.prune_channels import PruneChannels
from esr_deploy.recipe import find_recipe
from esr_deploy.validate.rerun import validate_bundle

C = 8
CONTEXT = PassContext(data_range=1.0, sample_hw=(16, 16))


class Residual(nn.Module):
    """head -> [conv1 -> relu -> conv2] + skip -> tail -> pixel shuffle (the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, C, 3, padding=1)
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.tail = nn.Conv2d(C, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.shuffle(self.tail(self.conv2(torch.relu(self.conv1(h))) + h))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, C, 3, padding=1)
        self.b = nn.Conv2d(3, C, 3, padding=1)
        self.mix = nn.Conv2d(2 * C, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


class InnerShuffle(nn.Module):
    """A pixel shuffle inside the network: its input channels come in groups of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv2d(3, 4 * C, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.shuffle(self.up(x))))


class ConstantChannel(nn.Module):
    """conv1's channel 2 has a zero filter and a non-zero bias: a constant after the ReLU."""

    def __init__(self, consumer_kernel: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, 3, consumer_kernel, padding=consumer_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.leaky_relu(self.conv1(x), 0.1))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.3)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


def _kill(conv: nn.Conv2d, channels: list[int], bias: float | None = 0.0) -> None:
    with torch.no_grad():
        conv.weight[channels] = 0
        if bias is not None:
            conv.bias[channels] = bias


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _same(a: nn.Module, b: nn.Module, tol: float = 1e-5) -> None:
    for h, w in ((13, 17), (16, 16)):
        x = torch.rand(2, 3, h, w)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert ya.shape == yb.shape
        assert float((ya - yb).abs().max()) <= tol * max(float(ya.abs().max()), 1.0)


def _prune(model: nn.Module, **kwargs: object):
    return PruneChannels(**kwargs).run(copy.deepcopy(model), CONTEXT)  # type: ignore[arg-type]


def test_dead_channels_are_removed_with_their_consumer_slices() -> None:
    model = _seeded(Residual())
    _kill(model.conv1, [1, 5])
    out = _prune(model)
    assert out.modified and out.extra["removed"] == {"conv1": 2}
    pruned = out.model
    assert (pruned.conv1.out_channels, pruned.conv2.in_channels) == (C - 2, C - 2)
    # removed: 2 filters (C*9 + bias) and 2 input slices of conv2 (C*9 each)
    assert _params(model) - _params(pruned) == 2 * (C * 9 + 1) + 2 * C * 9
    _same(model, pruned)


def test_live_channels_and_output_groups_are_kept() -> None:
    model = _seeded(Residual())
    out = _prune(model)
    assert not out.modified and _params(out.model) == _params(model)
    # a dead channel of the tail reaches the network output through the pixel shuffle
    _kill(model.tail, [0])
    out = _prune(model)
    assert not out.modified
    assert any("tail" in d and "network output" in d for d in out.details), out.details


def test_residual_group_needs_every_producer_dead() -> None:
    model = _seeded(Residual())
    _kill(model.head, [3])  # the skip still carries conv2's channel 3
    out = _prune(model)
    assert not out.modified
    assert any("another conv in their group" in d for d in out.details), out.details
    _kill(model.conv2, [3])  # now channel 3 of the residual sum is zero everywhere
    out = _prune(model)
    assert out.modified
    pruned = out.model
    assert pruned.head.out_channels == pruned.conv2.out_channels == C - 1
    assert pruned.conv1.in_channels == pruned.tail.in_channels == C - 1
    _same(model, pruned)


def test_concat_offsets_are_respected() -> None:
    model = _seeded(Concat())
    _kill(model.b, [0, 6])  # channels 8 and 14 of the concat
    out = _prune(model)
    assert out.modified and out.model.mix.in_channels == 2 * C - 2
    _same(model, out.model)


def test_inner_pixel_shuffle_group_is_not_pruned() -> None:
    model = _seeded(InnerShuffle())
    _kill(model.up, [4, 5, 6, 7])  # one whole output channel of the shuffle
    out = _prune(model)
    assert not out.modified
    assert any("pixel shuffle" in d for d in out.details), out.details
    _same(model, out.model)


def test_constant_channel_before_zero_padded_conv_is_kept() -> None:
    model = _seeded(ConstantChannel(consumer_kernel=3))
    _kill(model.conv1, [2], bias=0.7)
    out = _prune(model)
    assert not out.modified
    assert any("zero-pads" in d for d in out.details), out.details


def test_constant_channel_before_1x1_conv_is_folded_into_its_bias() -> None:
    model = _seeded(ConstantChannel(consumer_kernel=1))
    _kill(model.conv1, [2], bias=0.7)
    out = _prune(model)
    assert out.modified and out.model.conv2.in_channels == C - 1
    _same(model, out.model)


def test_prune_mask_buffer_marks_pruned_filters() -> None:
    model = _seeded(Residual())
    mask = torch.ones(C)
    mask[[0, 2, 4]] = 0
    model.conv1.register_buffer("prune_mask", mask)
    out = _prune(model)
    assert out.modified and out.model.conv1.out_channels == C - 3
    assert any("prune_mask" in d for d in out.details)


def test_lossy_ratio_removes_lowest_l1_channels_of_single_producer_groups() -> None:
    model = _seeded(Residual())
    with torch.no_grad():
        model.conv1.weight[[3, 6]] *= 1e-3  # the two least important filters of conv1
    out = _prune(model, ratio=0.25)
    assert out.modified and out.extra["mode"] == "lossy"
    assert out.model.conv1.out_channels == C - 2
    assert out.model.head.out_channels == C  # the residual trunk is kept
    assert any("residual sum" in d for d in out.details), out.details
    kept = out.model.conv1.weight.detach().flatten(1).abs().sum(1)
    dropped = model.conv1.weight.detach()[[3, 6]].abs().flatten(1).sum(1)
    assert float(kept.min()) > float(dropped.max())


def test_bad_ratio_is_refused() -> None:
    from esr_deploy.errors import PassError

    with pytest.raises(PassError, match="between 0 and 1"):
        PruneChannels(ratio=1.5)


def test_rlfn_with_zeroed_filters_compiles_to_a_smaller_engine(weights_dir, tmp_path) -> None:
    """Issue acceptance: the 4 lowest-L1 filters of each block's c1_r and c2_r zeroed."""
    recipe = find_recipe("rlfn_x4")
    model = recipe.build_model()
    load_weights(model, load_checkpoint(weights_dir / "rlfn_x4.pth"))
    nf = model.conv_1.out_channels
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("c1_r", "c2_r")):
                idx = torch.argsort(m.weight.abs().flatten(1).sum(1))[:4]
                m.weight[idx] = 0
                m.bias[idx] = 0
    ckpt = tmp_path / "zeroed.pth"
    torch.save(model.state_dict(), ckpt)
    manifest = compile_model(
        CompileOptions(
            source=ModelSource(checkpoint=ckpt, recipe="rlfn_x4"),
            out=tmp_path / "b",
            latency_shapes=(),
        )
    ).manifest
    blocks = sum(1 for n, _ in model.named_modules() if n.endswith("c1_r"))
    # per block: 4 filters of c1_r and of c2_r (nf*9 + 1 each), their input slices in c2_r
    # (of its remaining nf - 4 filters) and in c3_r (nf filters)
    per_block = 2 * 4 * (nf * 9 + 1) + 4 * (nf - 4) * 9 + 4 * nf * 9
    report = manifest["pruning"]
    assert report["mode"] == "exact"
    assert report["params_before"] - report["params_after"] == blocks * per_block
    assert manifest["metrics"]["onnx_params"] == report["params_after"]
    assert manifest["validation"]["set5_crops"]["parity_min_psnr"] >= 70.0


def test_lossy_compile_reports_its_cost(tmp_path) -> None:
    """--prune-ratio: params, FLOPs, latency ratio and PSNR drop in the manifest."""
    model = _seeded(Residual())
    ckpt = tmp_path / "m.pth"
    torch.save(model.state_dict(), ckpt)
    manifest = compile_model(
        CompileOptions(
            source=ModelSource(
                checkpoint=ckpt, arch=f"{__name__}:Residual", scale=2, data_range=1.0
            ),
            out=tmp_path / "b",
            latency_shapes=((32, 32),),
            latency_runs=2,
            prune_ratio=0.5,
        )
    ).manifest
    report = manifest["pruning"]
    assert report["mode"] == "lossy" and report["ratio"] == 0.5
    assert report["params_after"] < report["params_before"]
    assert report["flops_256_after"] < report["flops_256_before"]
    assert report["latency_ratio_before_over_after"] > 0
    assert set(report["psnr_drop"]) == {"set5_crops"}
    assert not manifest["validation"]["set5_crops"]["drop_gated"]
    assert manifest["validation"]["set5_crops"]["parity_min_psnr"] >= 60.0
    # re-validating the bundle measures parity against the pruned model it was built from
    report = validate_bundle(tmp_path / "b", (), None)
    assert report["failures"] == [] and "pruned fp32 ONNX" in report["reference"]
    assert report["validation"]["set5_crops"]["parity_min_psnr"] >= 60.0
