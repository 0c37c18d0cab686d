"""End-to-end compile tests: real checkpoints → validated engine bundles, no mocks.

- The five official zoo checkpoints in ``../shared/weights``, with no recipe named: the recipe
  is detected, the ort-fp32 engine reproduces the published reference PSNR table of
  ``../shared/weights/README.md`` (hard-coded below: it is the spec) on Set5 and Set14, and
  the bundle is complete and checksummed. These compile full Set14 images and probe the input
  range on the real networks, so they are marked ``slow`` (about a minute each on 2 cores).
- A user architecture defined here in the test suite (``tests/user_models/tiny_sr.py``),
  compiled through ``--arch`` from a nested, ``module.``-prefixed, CUDA-tagged checkpoint,
  in-process and through the real CLI.
- The bundled example checkpoint with the packaged validation set and a latency measurement.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# The CUDA re-tagging helper of the checkpoint tests (tests/ is on sys.path under pytest;
# tests/loading/ is a namespace package, so this works when this module runs alone too).
from loading.test_checkpoint import _retag_cuda

from esr_deploy.bundle import MANIFEST, REFERENCE_ONNX, REPORT, sha256_file
from esr_deploy.compiling import CompileOptions, CompileResult, compile_model
from esr_deploy.data import imresize, load_validation_set, mod_crop, read_image, to_tensor, to_uint8
from esr_deploy.loading.detect import ModelSource
from esr_deploy.paths import default_val_dir, example_checkpoint
from esr_deploy.runtime.bundle_reader import DIGEST_FILE, manifest_digest, open_bundle
from esr_deploy.targets import require_available
from esr_deploy.validate.quality import psnr_y
from esr_deploy.validate.report import REPORT_HTML

REPO = Path(__file__).resolve().parent.parent
ENGINE_FILE = "engine.onnx"  # the ort-fp32 engine file
BUNDLE_FILES = {ENGINE_FILE, REFERENCE_ONNX, REPORT}  # checksummed in manifest["files"]
PSNR_TOLERANCE_DB = 0.01  # "A compiled fp32 engine must reproduce ... to 0.01 dB"
FP32_PARITY_DB = 60.0
FP32_MAX_DROP_DB = 0.01


# ----------------------------------------------------------------------------- zoo


@dataclass(frozen=True)
class ZooCase:
    checkpoint: str
    recipe: str
    data_range: float
    #: LR minimum H×W the exporter derives. RLFN, RFDN and DIPNet have an ESA block
    #: (3×3 stride-2 conv without padding, then a 7×7 stride-3 max-pool), which needs
    #: floor((n - 3) / 2) + 1 >= 7, i.e. n >= 15; IMDN (CCA: global average pooling) and FMEN
    #: (plain convs) run on a 1×1 LR input.
    min_hw: tuple[int, int]
    set5_y: float  # README "Set5 Y" (dB)
    set14_y: float  # README "Set14 Y" (dB)


#: ../shared/weights/README.md, "Reference PSNR (dB), x4, PyTorch fp32" — the spec.
ZOO = (
    ZooCase("imdn_x4.pth", "imdn_x4", 1.0, (1, 1), 32.2096, 28.5820),
    ZooCase("rlfn_x4.pth", "rlfn_x4", 255.0, (15, 15), 32.2379, 28.6205),
    ZooCase("rfdn_aim2020.pth", "rfdn_x4", 255.0, (15, 15), 32.1589, 28.6451),
    ZooCase("fmen_ntire2022.pth", "fmen_x4", 255.0, (1, 1), 32.0289, 28.5732),
    ZooCase("dipnet_ntire2023.pth", "dipnet_x4", 1.0, (15, 15), 31.8053, 28.4416),
)


@dataclass(frozen=True)
class Compiled:
    case: Any
    result: CompileResult
    seconds: float
    notes: tuple[str, ...]


def _compile(options: CompileOptions) -> tuple[CompileResult, float, tuple[str, ...]]:
    notes: list[str] = []
    start = time.perf_counter()
    result = compile_model(options, on_note=notes.append)
    return result, time.perf_counter() - start, tuple(notes)


@pytest.fixture(scope="module", params=ZOO, ids=[c.recipe for c in ZOO])
def zoo_bundle(
    request: pytest.FixtureRequest,
    weights_dir: Path,
    sr_data_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Compiled:
    case: ZooCase = request.param
    out = tmp_path_factory.mktemp(case.recipe) / "bundle"
    result, seconds, notes = _compile(
        CompileOptions(
            source=ModelSource(checkpoint=weights_dir / case.checkpoint),  # no recipe named
            target="ort-fp32",
            val_dirs=(sr_data_dir / "Set5", sr_data_dir / "Set14"),
            out=out,
            latency_shapes=(),
        )
    )
    return Compiled(case, result, seconds, notes)


def _assert_complete_bundle(bundle: Path, manifest: dict[str, Any]) -> None:
    """The four files are there, nothing else is, and every checksum matches."""
    pictures = {f["file"] for f in manifest["report_figures"]}
    assert len(pictures) == 4  # comparison and difference pictures of two validation images
    expected = BUNDLE_FILES | {REPORT_HTML} | pictures
    assert {p.name for p in bundle.iterdir()} == expected | {MANIFEST, DIGEST_FILE}
    assert set(manifest["files"]) == expected
    assert (bundle / DIGEST_FILE).read_text().strip() == manifest_digest(manifest)
    for name, digest in manifest["files"].items():
        assert sha256_file(bundle / name) == digest, name
    assert json.loads((bundle / MANIFEST).read_text(encoding="utf-8")) == manifest
    # The staging folder was renamed into place, not left beside it.
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(f".{bundle.name}.")]


@pytest.mark.slow
def test_zoo_checkpoint_reproduces_reference_psnr(
    zoo_bundle: Compiled, record_property: Any
) -> None:
    case, result = zoo_bundle.case, zoo_bundle.result
    m = result.manifest
    record_property("compile_seconds", round(zoo_bundle.seconds, 1))

    # Detected, not named, and said so.
    assert m["name"] == case.recipe
    assert Path(m["recipe"]["source"]).name == f"{case.recipe}.toml"
    assert any(f"detected recipe '{case.recipe}'" in n for n in zoo_bundle.notes), zoo_bundle.notes
    assert (m["target"], m["precision"], m["backend"]) == ("ort-fp32", "fp32", "onnxruntime")
    assert m["scale"] == 4
    assert m["data_range"] == case.data_range

    # Task quality against the published table, and parity with the PyTorch reference.
    assert list(m["validation"]) == ["Set5", "Set14"]
    for set_name, images, expected in (("Set5", 5, case.set5_y), ("Set14", 14, case.set14_y)):
        v = m["validation"][set_name]
        assert v["images"] == images
        assert v["lr_generated"] is False  # the given LR_bicubic/X4 images were used
        assert v["engine_psnr_y"] == pytest.approx(expected, abs=PSNR_TOLERANCE_DB), set_name
        assert v["reference_psnr_y"] == pytest.approx(expected, abs=PSNR_TOLERANCE_DB), set_name
        assert v["parity_min_psnr"] >= FP32_PARITY_DB, set_name
        assert v["psnr_drop"] <= FP32_MAX_DROP_DB, set_name
        assert v["passed"] is True
        assert all(i["parity_psnr"] >= FP32_PARITY_DB for i in v["per_image"])
    assert "failures" not in m

    # Shape profile: the minimum is what the exporter derived by running the model.
    assert m["profile"]["min"] == list(case.min_hw)
    assert m["export"]["input_range"]["min_hw"] == list(case.min_hw)
    assert m["export"]["input_range"]["failing_above_min"] == []
    assert m["profile"]["opt"] == [256, 256] and m["profile"]["max"] == [1080, 1920]

    assert result.bundle == result.bundle.resolve()
    _assert_complete_bundle(result.bundle, m)


@pytest.mark.slow
def test_zoo_bundle_serves_in_its_data_range(zoo_bundle: Compiled, sr_data_dir: Path) -> None:
    """A serving team loads the bundle and feeds LR in manifest["data_range"]: it gets the
    validated PSNR; feeding the other range (0..1 vs 0..255) visibly breaks the output."""
    m = zoo_bundle.result.manifest
    bundle = open_bundle(zoo_bundle.result.bundle)  # verifies every checksum
    _, backend = require_available(m["target"])
    session = backend.load(bundle.engine_path, m["engine"]["settings"])
    data_range = float(m["data_range"])
    assert data_range == zoo_bundle.case.data_range
    wrong_range = 1.0 if data_range == 255.0 else 255.0

    hr = mod_crop(read_image(sr_data_dir / "Set5" / "HR" / "bird.png"), 4)
    lr = read_image(sr_data_dir / "Set5" / "LR_bicubic" / "X4" / "birdx4.png")

    out = session.run(to_tensor(lr, data_range).numpy())
    got = psnr_y(to_uint8(out, data_range), hr, 4)
    (bird,) = [i for i in m["validation"]["Set5"]["per_image"] if i["name"] == "bird"]
    assert got == pytest.approx(bird["engine_psnr_y"], abs=1e-3)

    wrong = session.run(to_tensor(lr, wrong_range).numpy())
    assert psnr_y(to_uint8(wrong, data_range), hr, 4) < got - 10.0


# ----------------------------------------------------------------------------- user arch

USER_ARCH = "tests.user_models.tiny_sr:TinyGatedSR"
USER_ARGS = {"channels": 16, "num_units": 2, "upscale": 3, "negative_slope": 0.05}
USER_SCALE = 3
TRAIN_STEPS = 30
TRAIN_BATCH = 8
TRAIN_PATCH = 16  # LR patch side


def _user_class() -> type[torch.nn.Module]:
    if str(REPO) not in sys.path:  # as --arch does: the module is found from the repo root
        sys.path.insert(0, str(REPO))
    module_name, _, cls = USER_ARCH.partition(":")
    return getattr(importlib.import_module(module_name), cls)  # type: ignore[no-any-return]


def _set5_x3(sr_data_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for path in sorted((sr_data_dir / "Set5" / "HR").glob("*.png")):
        hr = mod_crop(read_image(path), USER_SCALE)
        pairs.append((imresize(hr, 1.0 / USER_SCALE), hr))
    return pairs


@dataclass(frozen=True)
class UserCheckpoint:
    path: Path
    set5_psnr_y: float  # of the trained PyTorch model, computed here independently
    untrained_set5_psnr_y: float


def _mean_psnr_y(model: torch.nn.Module, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    with torch.no_grad():
        return float(
            np.mean(
                [
                    psnr_y(to_uint8(model(to_tensor(lr, 1.0)), 1.0), hr, USER_SCALE)
                    for lr, hr in pairs
                ]
            )
        )


@pytest.fixture(scope="module")
def user_checkpoint(sr_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> UserCheckpoint:
    """TinyGatedSR trained for a few Adam steps on random Set5 crops (x3, LR = MATLAB bicubic),
    saved the way a multi-GPU training script does: nested, ``module.``-prefixed, CUDA tensors."""
    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    model = _user_class()(**USER_ARGS)
    pairs = _set5_x3(sr_data_dir)
    untrained = _mean_psnr_y(model.eval(), pairs)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    p, s = TRAIN_PATCH, USER_SCALE
    for _ in range(TRAIN_STEPS):
        xs, ys = [], []
        for _ in range(TRAIN_BATCH):
            lr, hr = pairs[int(gen.integers(len(pairs)))]
            y0 = int(gen.integers(lr.shape[0] - p + 1))
            x0 = int(gen.integers(lr.shape[1] - p + 1))
            xs.append(to_tensor(np.ascontiguousarray(lr[y0 : y0 + p, x0 : x0 + p]), 1.0))
            hr_patch = hr[s * y0 : s * (y0 + p), s * x0 : s * (x0 + p)]
            ys.append(to_tensor(np.ascontiguousarray(hr_patch), 1.0))
        loss = (model(torch.cat(xs)) - torch.cat(ys)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    folder = tmp_path_factory.mktemp("user_ckpt")
    cpu_file = folder / "tiny_cpu.pth"
    torch.save(
        {
            "epoch": 3,
            "state_dict": {
                f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()
            },
            "optimizer": opt.state_dict(),
        },
        cpu_file,
    )
    cuda_file = folder / "tiny_gated_sr_x3.pth"
    _retag_cuda(cpu_file, cuda_file)
    with zipfile.ZipFile(cuda_file) as z:
        (pkl,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        data = z.read(pkl)
    assert b"cuda:0" in data and b"X\x03\x00\x00\x00cpu" not in data
    return UserCheckpoint(cuda_file, _mean_psnr_y(model, pairs), untrained)


def _assert_user_manifest(m: dict[str, Any], ckpt: UserCheckpoint) -> None:
    assert m["arch"] == USER_ARCH
    assert m["arch_args"] == USER_ARGS
    assert m["scale"] == USER_SCALE
    assert m["data_range"] == 1.0
    assert m["name"] == "tinygatedsr"
    assert m["checkpoint"]["nested_key"] == "state_dict"
    assert m["checkpoint"]["sha256"] == sha256_file(ckpt.path)
    assert m["profile"]["min"] == [1, 1]  # only padded convs, 1x1 conv and PixelShuffle
    assert m["outputs"][0]["shape"] == ["N", 3, "H*3", "W*3"]
    assert m["latency_ms"] == {}
    assert "failures" not in m


def test_user_architecture_from_nested_cuda_checkpoint(
    user_checkpoint: UserCheckpoint,
    sr_data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(REPO)  # the CLI's situation: --arch resolved from the current directory
    result, seconds, notes = _compile(
        CompileOptions(
            source=ModelSource(
                checkpoint=user_checkpoint.path,
                arch=USER_ARCH,
                arch_args=json.dumps(USER_ARGS),
                scale=USER_SCALE,
                data_range=1.0,
            ),
            val_dirs=(sr_data_dir / "Set5",),
            out=tmp_path / "tiny",
            latency_shapes=(),
        )
    )
    m = result.manifest
    _assert_user_manifest(m, user_checkpoint)
    assert any(f"architecture {USER_ARCH} given with --arch" in n for n in notes), notes

    v = m["validation"]["Set5"]
    assert v["images"] == 5
    assert v["lr_generated"] is True  # Set5 has only LR_bicubic/X4: x3 LR made by imresize
    assert v["parity_min_psnr"] >= FP32_PARITY_DB
    assert v["psnr_drop"] <= FP32_MAX_DROP_DB
    # The trained weights were loaded (not left random): the reference PSNR is the one this
    # test measured on its own model, and training made it meaningful.
    assert v["reference_psnr_y"] == pytest.approx(user_checkpoint.set5_psnr_y, abs=1e-3)
    assert v["engine_psnr_y"] == pytest.approx(user_checkpoint.set5_psnr_y, abs=PSNR_TOLERANCE_DB)
    assert user_checkpoint.set5_psnr_y > user_checkpoint.untrained_set5_psnr_y + 5.0
    assert user_checkpoint.set5_psnr_y > 20.0
    _assert_complete_bundle(result.bundle, m)
    assert seconds > 0


def test_user_architecture_through_cli(user_checkpoint: UserCheckpoint, tmp_path: Path) -> None:
    out = tmp_path / "cli-bundle"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "esr_deploy.cli",
            "compile",
            str(user_checkpoint.path),
            "--arch",
            USER_ARCH,
            "--arch-args",
            json.dumps(USER_ARGS),
            "--scale",
            "3",
            "--data-range",
            "1",
            "--no-latency",
            "--json",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout)  # stdout is the manifest and nothing else
    _assert_user_manifest(m, user_checkpoint)
    assert f"architecture {USER_ARCH} given with --arch" in proc.stderr
    # Default validation set: the packaged Set5 crops, x3 LR generated (only X4 ships).
    (name,) = m["validation"]
    assert name == default_val_dir().name
    v = m["validation"][name]
    assert v["images"] == 3 and v["lr_generated"] is True
    assert v["parity_min_psnr"] >= FP32_PARITY_DB
    assert v["psnr_drop"] <= FP32_MAX_DROP_DB
    _assert_complete_bundle(out, m)


# ----------------------------------------------------------------------------- bundled RLFN

LATENCY_SHAPE = (64, 64)
BELOW_MIN_SHAPE = (8, 8)  # RLFN needs an LR side >= 15: skipped with a warning
LATENCY_RUNS = 3


@pytest.fixture(scope="module")
def bundled_rlfn(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    """One compile serves the latency and default-validation tests (a compile costs most of
    its time in export and validation, not in three 64×64 runs)."""
    result, seconds, notes = _compile(
        CompileOptions(
            source=ModelSource(checkpoint=example_checkpoint()),
            val_dirs=(),  # the packaged default set
            out=tmp_path_factory.mktemp("bundled") / "rlfn",
            latency_shapes=(LATENCY_SHAPE, BELOW_MIN_SHAPE),
            latency_runs=LATENCY_RUNS,
        )
    )
    return Compiled(None, result, seconds, notes)


def test_latency_measured_at_requested_shape(bundled_rlfn: Compiled) -> None:
    lat = bundled_rlfn.result.manifest["latency_ms"]
    h, w = LATENCY_SHAPE
    assert list(lat) == [f"1x3x{h}x{w}"]  # the 8×8 shape is below the minimum: not timed
    stats = lat[f"1x3x{h}x{w}"]
    assert stats["runs"] == LATENCY_RUNS
    assert 0.0 < stats["p10"] <= stats["median"] <= stats["p90"]


def test_default_validation_set_is_packaged_crops(bundled_rlfn: Compiled) -> None:
    m = bundled_rlfn.result.manifest
    assert m["name"] == "rlfn_x4" and m["data_range"] == 255.0
    assert any("detected recipe 'rlfn_x4'" in n for n in bundled_rlfn.notes)
    default = load_validation_set(default_val_dir(), 4)
    assert len(default) == 3
    assert list(m["validation"]) == [default.name]
    v = m["validation"][default.name]
    assert v["images"] == 3 and v["lr_generated"] is False
    assert [i["name"] for i in v["per_image"]] == ["bird", "butterfly", "head"]
    assert v["engine_psnr_y"] == pytest.approx(v["reference_psnr_y"], abs=PSNR_TOLERANCE_DB)
    assert v["parity_min_psnr"] >= FP32_PARITY_DB
    _assert_complete_bundle(bundled_rlfn.result.bundle, m)
