"""Fixtures of the pass tests: every model here is tiny."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny convs: one thread is ~1000× faster than two contending ones on a 2-core box
    (thread-pool wake-ups dominate); the setting is restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
