"""The one successful compile of the bundled RLFN that the command-line tests look at."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import OUT, RLFN, Run, esr_deploy


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """``compile RLFN --no-latency --json --profile``: its run and its bundle."""
    cwd = tmp_path_factory.mktemp("ok")
    run = esr_deploy("compile", RLFN, "--no-latency", "--json", "--profile", "--out", OUT, cwd=cwd)
    assert run.code == 0, run.stderr
    return run, cwd / OUT
