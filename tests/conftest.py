"""Shared fixtures: where the official checkpoints and benchmark images are.

Tests that need ``../shared`` find it through ``ESR_SHARED`` (default: ``../shared`` beside
the checkout). When ``CI`` is set they fail instead of skipping if it is missing, so a
green CI always means the real-data tests ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    return Path(os.environ.get("ESR_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = _shared_dir()
    if not (d / "weights").is_dir() or not (d / "data" / "sr").is_dir():
        msg = f"shared test data not found at {d} (set ESR_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return shared_dir / "weights"


@pytest.fixture(scope="session")
def sr_data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "sr"
