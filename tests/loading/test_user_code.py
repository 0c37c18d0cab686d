"""User code as it really is (issue 18, classes 2, 5, 6 and 7), through the real CLI.

Each case compiles a model from ``tests/user_models/`` with ``--arch``: a constructor that
calls ``.cuda()``, a factory function, code that prints, code that raises while importing,
building or running, a module whose own import is missing, and a broken ``torch_pruning``.
Every refusal is exit 2 with one ``error:`` message and no traceback; every success writes
a validated bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import Run, esr_deploy, one_error
from user_models.misbehaving import PlainSR

REPO = Path(__file__).resolve().parent.parent
MODELS = "tests.user_models.misbehaving"
FAST = ("--no-latency", "--passes", "none", "--target", "ort-fp32")


def cli(*args: object, cwd: Path, pythonpath: Path | None = None) -> Run:
    """``esr-deploy ARGS`` with ``pythonpath`` (the user's code) ahead of the repository."""
    path = os.pathsep.join(str(p) for p in (pythonpath, REPO, os.environ.get("PYTHONPATH")) if p)
    return esr_deploy(*args, cwd=cwd, timeout=600, env={"PYTHONPATH": path})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained-looking state dict of PlainSR (every misbehaving model has its keys)."""
    torch.manual_seed(0)
    model = PlainSR()
    path = tmp_path_factory.mktemp("ckpt") / "plain_sr.pth"
    torch.save(model.state_dict(), path)
    return path


def compile_arch(arch: str, checkpoint: Path, cwd: Path, *extra: object) -> Run:
    return cli(
        "compile", checkpoint, "--arch", arch, "--scale", 4, "--data-range", 1,
        "--out", cwd / "bundle", *FAST, *extra, cwd=cwd,
    )  # fmt: skip


def refused(run: Run, *words: str) -> str:
    shown = f"exit {run.code}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.code == 2, shown
    assert "Traceback" not in run.stdout + run.stderr, shown
    message = one_error(run)
    for word in words:
        assert word in message, f"{word!r} not in the message\n{shown}"
    return message


# ------------------------------------------------------------------ class 2: CUDA, raising


def test_cuda_pinned_constructor_is_built_on_the_cpu(checkpoint: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the .cuda() calls are real on a machine with CUDA")
    run = compile_arch(f"{MODELS}:CudaPinnedSR", checkpoint, tmp_path, "--json")
    assert run.code == 0, run.stderr
    manifest = json.loads(run.stdout)
    assert manifest["validation"]["set5_crops"]["parity_min_psnr"] >= 60.0
    assert "built on the CPU" in run.stderr
    assert "Conv2d.cuda(), Tensor.cuda()" in run.stderr


@pytest.mark.parametrize(
    ("arch", "words"),
    [
        (
            "BrokenConstructorSR",
            ["Building", "ValueError: this checkpoint needs config.yaml",
             "misbehaving.py:", "in __init__"],
        ),
        ("LookupForwardSR", ["KeyError: 'x4'", "misbehaving.py:", "in forward"]),
        (
            "BrokenForwardSR",
            ["NotImplementedError: inference path not written yet (8 channels)",
             "misbehaving.py:", "in forward"],
        ),
    ],
)  # fmt: skip
def test_user_code_that_raises_is_exit_2_with_file_and_line(
    arch: str, words: list[str], checkpoint: Path, tmp_path: Path
) -> None:
    run = compile_arch(f"{MODELS}:{arch}", checkpoint, tmp_path)
    refused(run, *words)
    assert not (tmp_path / "bundle").exists()


def test_module_that_raises_while_importing(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "raising_module.py").write_text(
        "import torch\nSETTINGS = {}\nCHANNELS = SETTINGS['channels']\n"
    )
    run = compile_arch("raising_module:Net", checkpoint, tmp_path)
    refused(run, "Importing 'raising_module'", "KeyError", "raising_module.py:3")


# ------------------------------------------------------------------ class 5: factories


def test_factory_function_as_arch(checkpoint: Path, tmp_path: Path) -> None:
    run = compile_arch(f"{MODELS}:make_model", checkpoint, tmp_path, "--json")
    assert run.code == 0, run.stderr
    manifest = json.loads(run.stdout)
    assert manifest["arch"] == f"{MODELS}:make_model"
    assert manifest["validation"]["set5_crops"]["parity_min_psnr"] >= 60.0


def test_factory_that_returns_no_module(checkpoint: Path, tmp_path: Path) -> None:
    run = compile_arch(f"{MODELS}:make_options", checkpoint, tmp_path)
    refused(run, "returned a dict, not a torch.nn.Module")


def test_arch_that_is_not_callable(checkpoint: Path, tmp_path: Path) -> None:
    run = compile_arch(f"{MODELS}:__doc__", checkpoint, tmp_path)
    refused(run, "is a str, not a class or function")


# ------------------------------------------------------------------ class 6: printing


def test_json_stdout_is_one_document_when_user_code_prints(
    checkpoint: Path, tmp_path: Path
) -> None:
    run = compile_arch(f"{MODELS}:ChattySR", checkpoint, tmp_path, "--json")
    assert run.code == 0, run.stderr
    manifest = json.loads(run.stdout)  # the whole of stdout is the manifest
    assert manifest["name"] == "chattysr"
    assert "building ChattySR with 8 channels" in run.stderr
    assert "forward (1, 3," in run.stderr


# ------------------------------------------------------------------ class 7: imports


def test_missing_dependency_of_a_found_module_says_install_it(
    checkpoint: Path, tmp_path: Path
) -> None:
    run = compile_arch("tests.user_models.needs_missing_dep:NeedsToolboxSR", checkpoint, tmp_path)
    message = refused(
        run,
        "'tests.user_models.needs_missing_dep' was found",
        "'sr_toolbox_that_is_not_installed', which is not installed",
        "pip install sr_toolbox_that_is_not_installed",
        "needs_missing_dep.py:6",
    )
    assert "PYTHONPATH" not in message


def test_module_that_is_not_found_says_where_to_run(checkpoint: Path, tmp_path: Path) -> None:
    run = compile_arch("no_such_user_module:Net", checkpoint, tmp_path)
    refused(run, "Could not import module 'no_such_user_module'", "PYTHONPATH")


@pytest.mark.slow  # two compiles through the CLI
def test_torch_pruning_is_imported_only_by_its_pass(checkpoint: Path, tmp_path: Path) -> None:
    """A broken torch_pruning (shadowed here by one that raises on import) breaks only the
    compiles that prune, with a clear message."""
    code = (
        "import sys, esr_deploy.compiling.pipeline, esr_deploy.cli; "
        "print('torch_pruning' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert proc.stdout.strip() == "False"
    broken = tmp_path / "site"
    (broken / "torch_pruning").mkdir(parents=True)
    (broken / "torch_pruning" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    arch = (f"{MODELS}:PlainSR", "--arch")
    args = ("compile", checkpoint, arch[1], arch[0], "--scale", 4, "--data-range", 1,
            "--no-latency", "--target", "ort-fp32")  # fmt: skip
    ok = cli(*args, "--passes", "fold-bn", "--out", tmp_path / "a", cwd=tmp_path, pythonpath=broken)
    assert ok.code == 0, ok.stderr
    pruning = cli(*args, "--out", tmp_path / "b", cwd=tmp_path, pythonpath=broken)
    refused(
        pruning,
        "prune-channels pass needs torch_pruning, which failed to import",
        "RuntimeError: operator torchvision::nms does not exist",
        "--passes",
    )
