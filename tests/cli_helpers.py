"""What the command-line tests share: run the real ``esr-deploy`` in a subprocess the way a
user does (``python -m esr_deploy.cli``, in a temporary working directory) and check what it
printed and left behind.

What is checked is what a user sees: the exit code (:mod:`esr_deploy.errors`: 2 bad input,
3 validation failed, 4 target unavailable), a one-paragraph message that says what was seen
and what to do, no traceback, and nothing left where the bundle would have gone (no bundle,
no hidden ``.bundle.partial-*`` staging folder).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from esr_deploy.paths import default_val_dir, example_checkpoint

RLFN = example_checkpoint()
SCALE = 4
OUT = "out/bundle"  # --out, relative to the working directory of each run
ZOO = ("dipnet_x4", "fmen_x4", "imdn_x4", "rfdn_x4", "rlfn_x4")
#: Keys of the design's manifest example (``../shared/design.md``) that scripts read.
MANIFEST_KEYS = {
    "schema_version", "name", "target", "precision", "backend", "scale", "data_range",
    "checkpoint", "passes", "metrics", "validation", "latency_ms", "files",
}  # fmt: skip
SET_KEYS = {
    "images", "reference_psnr_y", "engine_psnr_y", "psnr_drop", "reference_ssim_y",
    "engine_ssim_y", "parity_min_psnr", "parity_max_abs_error",
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float


def esr_deploy(
    *args: object, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> Run:
    """Run ``esr-deploy ARGS`` in ``cwd`` the way a user does, and capture what it prints
    (``env``: variables set on top of this process's)."""
    # COLUMNS: no wrapping of table rows. One torch thread: these runs check behaviour, not
    # speed (no latency is measured), and on a busy 2-core machine two spinning OpenMP
    # threads per process make a compile about five times slower.
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "esr_deploy.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def assert_refused(run: Run, code: int, words: list[str], cwd: Path) -> str:
    """A clean refusal: exit ``code``, one ``error:`` message containing ``words``, no
    traceback, nothing on stdout and nothing where the bundle would have gone."""
    shown = f"exit {run.code}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.code == code, shown
    assert "Traceback" not in run.stdout + run.stderr, shown
    assert run.stdout == "", shown
    message = one_error(run)
    for word in words:
        assert word in message, f"{word!r} not in the message\n{shown}"
    assert_nothing_written(cwd)
    return message


def one_error(run: Run) -> str:
    """The ``error: ...`` message, from its line to the end of stderr; there is one."""
    lines = run.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, run.stderr
    return "\n".join(lines[starts[0] :])


def assert_nothing_written(cwd: Path) -> None:
    parent = (cwd / OUT).parent
    left = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert left == [], f"left behind in {parent}: {left}"
    assert list(cwd.rglob("*.partial-*")) == []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rlfn_state_dict() -> dict[str, torch.Tensor]:
    return dict(torch.load(RLFN, map_location="cpu", weights_only=True))


def copy_val_set(dst: Path) -> Path:
    """A copy of the packaged validation set (HR/ and LR_bicubic/X4/) to damage."""
    return Path(shutil.copytree(default_val_dir(), dst))


class RunsShell:
    """Pickles as ``os.system("touch MARKER")``: what a malicious checkpoint does."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch MARKER",))
