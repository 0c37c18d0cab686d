"""PyTorch's intra-op thread count, set for a block and restored after it.

Tiny probe convolutions (the input-size probe, the fold verification) run about 1000× faster
on one thread than on a thread pool that wakes up for each of them, and far worse still when
the cores are oversubscribed (seen on 2-core VMs); peers and engines are timed on the same
number of threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the duration, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """One thread for the duration (:func:`torch_threads` with 1)."""
    return torch_threads(1)
