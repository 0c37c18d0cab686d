"""The runtime half runs without torch: the serving API and the runtime commands on a real
bundle in a process where torch is not imported (or cannot be), and the compile side refused
there with what to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_bundle import SCALE

from esr_deploy.compiling.options import CompileResult

REPO = Path(__file__).resolve().parents[2]


_SERVE_WITHOUT_TORCH = """
import sys
import numpy as np
import esr_deploy
from esr_deploy.cli import main
up = esr_deploy.load(sys.argv[1])
assert up.upscale(np.zeros((20, 24, 3), dtype=np.uint8)).shape == (20 * {s}, 24 * {s}, 3)
print("API torch:", "torch" in sys.modules, flush=True)
sys.argv = ["esr-deploy", "upscale", sys.argv[1], sys.argv[2], "-o", sys.argv[3]]
try:
    main()
finally:
    print("CLI torch:", "torch" in sys.modules, flush=True)
"""


def test_the_serving_path_runs_without_importing_torch(
    compiled: CompileResult,
    tmp_path: Path,
) -> None:
    """esr_deploy.load(...).upscale and `esr-deploy upscale` on a real bundle: torch (and the
    compile side) is never imported by the runtime."""
    image = tmp_path / "lr.png"
    Image.fromarray(np.full((20, 24, 3), 128, dtype=np.uint8)).save(image)
    run = subprocess.run(
        [sys.executable, "-c", _SERVE_WITHOUT_TORCH.format(s=SCALE), str(compiled.bundle),
         str(image), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "API torch: False" in run.stdout and "CLI torch: False" in run.stdout, run.stdout
    assert (tmp_path / "out" / "lr.png").is_file()


_BLOCKED = """
import sys
sys.modules["torch"] = None  # as if torch were not installed
from esr_deploy.cli import main
sys.argv = ["esr-deploy", *sys.argv[1:]]
main()
"""


def _without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED, *args], capture_output=True, text=True, timeout=300
    )


def test_runtime_commands_work_and_compile_says_what_to_install_without_torch(
    compiled: CompileResult,
    tmp_path: Path,
) -> None:
    inspect = _without_torch("inspect", str(compiled.bundle), "--json")
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert '"files_verified"' in inspect.stdout
    targets = _without_torch("targets")
    assert targets.returncode == 0, targets.stderr[-2000:]
    assert "ort-fp32" in targets.stdout and "esr-deploy[compile]" in targets.stdout
    refused = _without_torch("compile", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "torch is not installed" in refused.stderr and "esr-deploy[compile]" in refused.stderr
    assert not (tmp_path / "o").exists()


def test_the_base_install_is_the_runtime_and_compile_is_an_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for compile_side in ("torch", "onnxsim", "onnxscript", "torch-pruning"):
        assert compile_side not in base
        assert any(compile_side in d for d in project["optional-dependencies"]["compile"])
    assert "onnxruntime" in base and "onnx" in base


def test_esr_deploy_load_stays_the_function_whatever_is_imported() -> None:
    """No subpackage may be named ``load``: importing it would replace the API function."""
    import esr_deploy
    import esr_deploy.loading.checkpoint  # noqa: F401 (the compile side, imported first)

    assert callable(esr_deploy.load) and not isinstance(esr_deploy.load, type(esr_deploy))
