"""spandrel as a front end (issue 18): architectures recognised from a state dict alone.

The corpus is built from spandrel's own architecture classes with seeded random weights, at
small sizes: SPAN, Real-ESRGAN's SRVGG "Compact", OmniSR, SAFMN, PLKSR and a small ESRGAN
(RRDBNet). Each is saved as a plain state dict and compiled to ``ort-fp32`` with no recipe
and no ``--arch``; the manifest must name the architecture spandrel detected and parity
against the PyTorch model must be at least 60 dB on the packaged Set5 crops. The compiles
that take longer than a few seconds on 2 cores are marked ``slow``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from esr_deploy.compiling.options import CompileOptions
from esr_deploy.compiling.pipeline import compile_model
from esr_deploy.errors import NoRecipeMatch, RecipeError
from esr_deploy.loading.detect import ModelSource, load_model
from esr_deploy.loading.spandrel import (
    NEEDS_TORCHVISION,
    build_spandrel,
    spandrel_architectures,
    spandrel_module,
)
from esr_deploy.validate.rerun import validate_bundle

REPO = Path(__file__).resolve().parent.parent
FP32_PARITY_DB = 60.0


def spandrel_class(arch: str) -> Callable[..., nn.Module]:
    assert spandrel_module() is not None, "spandrel is part of the install (Makefile)"
    return getattr(importlib.import_module(f"spandrel.architectures.{arch}"), arch)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Case:
    arch: str  # spandrel's architecture id, and the class name its package exports
    args: dict[str, Any]
    marks: tuple[Any, ...] = field(default=())
    scale: int = 4


SLOW = (pytest.mark.slow,)  # 30 s to 2 min each on a busy 2-core machine
CORPUS = (
    Case("Compact", {"num_feat": 16, "num_conv": 4, "upscale": 4}),
    Case("SPAN", {"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 16, "upscale": 4}, SLOW),
    Case("OmniSR", {"num_feat": 16, "block_num": 1, "up_scale": 4}, SLOW),
    Case("SAFMN", {"dim": 16, "n_blocks": 2, "upscaling_factor": 4}, SLOW),
    Case("PLKSR", {"dim": 16, "n_blocks": 2, "upscaling_factor": 4, "kernel_size": 9}, SLOW),
    Case("ESRGAN", {"num_filters": 16, "num_blocks": 1, "scale": 4}, SLOW),
)


def corpus_checkpoint(case: Case, folder: Path) -> Path:
    torch.manual_seed(0)
    model = spandrel_class(case.arch)(**case.args).eval()
    path = folder / f"{case.arch.lower()}.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("case", [pytest.param(c, id=c.arch, marks=c.marks) for c in CORPUS])
def test_corpus_compiles_without_arch(case: Case, tmp_path: Path) -> None:
    ckpt = corpus_checkpoint(case, tmp_path)
    start = time.perf_counter()
    result = compile_model(
        CompileOptions(source=ModelSource(checkpoint=ckpt), out=tmp_path / "b", latency_shapes=())
    )
    seconds = time.perf_counter() - start
    m = result.manifest
    assert m["detection"]["architecture"] == case.arch
    assert m["detection"]["by"].startswith("spandrel ")
    assert m["name"] == f"{case.arch.lower()}_x{case.scale}"
    assert m["arch_args"]["architecture"] == case.arch
    assert (m["scale"], m["data_range"], m["color_order"]) == (case.scale, 1.0, "RGB")
    assert any(f"{case.arch} detected by spandrel" in n for n in result.notes)
    for name, v in m["validation"].items():
        assert v["parity_min_psnr"] >= FP32_PARITY_DB, (name, v)
        assert v["passed"]
    # the bundle re-validates against the network spandrel detects again in the checkpoint
    # the user names (nothing recorded in the bundle is imported)
    report = validate_bundle(result.bundle, (), ModelSource(checkpoint=ckpt))
    assert report["failures"] == [] and report["reference"].startswith("PyTorch fp32 model")
    print(
        f"\n{case.arch}: {seconds:.1f} s, convs {m['metrics']['training_form']['convs']} -> "
        f"{m['metrics']['convs']} (ONNX {m['metrics']['onnx_convs']}), exporter "
        f"{m['export']['exporter']}"
    )


@pytest.mark.parametrize("case", [pytest.param(c, id=c.arch) for c in CORPUS])
def test_corpus_is_detected_from_the_state_dict(case: Case, tmp_path: Path) -> None:
    loaded = load_model(ModelSource(checkpoint=corpus_checkpoint(case, tmp_path)))
    assert loaded.detection is not None and loaded.detection["architecture"] == case.arch
    assert (loaded.recipe.scale, loaded.recipe.data_range) == (case.scale, 1.0)
    x = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        assert loaded.model(x).shape == (1, 3, 13 * case.scale, 11 * case.scale)


def test_rebuilt_from_the_manifest_arch_matches_detection(tmp_path: Path) -> None:
    """A detection's recipe rebuilds the same network (what ``validate`` relies on)."""
    case = next(c for c in CORPUS if c.arch == "SAFMN")  # wrapped: pads to a multiple of 8
    loaded = load_model(ModelSource(checkpoint=corpus_checkpoint(case, tmp_path)))
    rebuilt = loaded.recipe.build_model()
    assert type(rebuilt) is type(loaded.model)
    rebuilt.load_state_dict(loaded.model.state_dict())
    x = torch.rand(1, 3, 21, 19)  # not a multiple of 8
    with torch.no_grad():
        out = loaded.model(x)
        assert out.shape == (1, 3, 84, 76)
        assert torch.equal(rebuilt(x), out)
    with pytest.raises(ValueError, match="not a spandrel architecture"):
        build_spandrel("X", "os:system", {})


def test_what_spandrel_does_not_recognise_still_says_so(tmp_path: Path) -> None:
    path = tmp_path / "unknown.pth"
    torch.save({"encoder.w": torch.zeros(3, 3), "decoder.w": torch.zeros(2)}, path)
    with pytest.raises(NoRecipeMatch, match="spandrel recognises none"):
        load_model(ModelSource(checkpoint=path))


def test_recognised_but_not_rgb_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    grey = spandrel_class("Compact")(num_in_ch=1, num_out_ch=1, num_feat=8, num_conv=2, upscale=2)
    path = tmp_path / "grey.pth"
    torch.save(grey.state_dict(), path)
    with pytest.raises(RecipeError, match="1 input and 1 output channels; esr-deploy compiles RGB"):
        load_model(ModelSource(checkpoint=path))


def test_spandrel_imports_without_torchvision() -> None:
    """spandrel's package imports LaMa and RestoreFormer, which import torchvision; without
    torchvision they are not offered, and torchvision stays absent for everyone else."""
    code = (
        "import importlib.util, sys\n"
        "from esr_deploy.loading.spandrel import spandrel_architectures, spandrel_module\n"
        "sp = spandrel_module()\n"
        "usable = {a.id: a.usable for a in spandrel_architectures()}\n"
        "print(sp.with_torchvision, 'torchvision' in sys.modules, usable['SPAN'],"
        " usable['LaMa'])\n"
        "from spandrel.architectures.LaMa.__arch import LaMa as lama\n"
        "try:\n"
        "    lama.rotate(None, 0)\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('call:', exc)\n"
    )
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: the stand-in is not used")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "False False True False", proc.stdout
    assert "torchvision is not installed" in lines[1]


def test_recipes_lists_what_spandrel_recognises() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "esr_deploy.cli", "recipes"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            "COLUMNS": "200",
            "NO_COLOR": "1",
            **{k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"},
        },
        check=True,
    )
    for arch in ("SPAN", "Compact", "OmniSR", "SAFMN", "PLKSR", "ESRGAN", "DITN"):
        assert f" {arch} " in proc.stdout, proc.stdout
    infos = {a.id: a for a in spandrel_architectures()}
    for arch in NEEDS_TORCHVISION:
        if not infos[arch].usable:
            assert "needs torchvision" in proc.stdout
