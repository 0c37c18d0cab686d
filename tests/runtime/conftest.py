"""The runtime tests' one real bundle, compiled once per session and shared by the modules
that read it (bundle reader, manifest, torch-free serving)."""

from __future__ import annotations

import pytest
from tiny_bundle import SCALE
from user_models import tiny_source

from esr_deploy.compiling.options import CompileOptions, CompileResult
from esr_deploy.compiling.pipeline import compile_model


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> CompileResult:
    """A random-weight user network at :data:`tiny_bundle.SCALE`, no validation set, no
    latency (seconds). Tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("compiled")
    options = CompileOptions(
        source=tiny_source(tmp, SCALE), val_dirs=(), out=tmp / "bundle", latency_shapes=()
    )
    return compile_model(options)
