"""Process and machine memory read from /proc, on this machine."""

from __future__ import annotations

import numpy as np
import pytest

from esr_deploy import memory


def test_available_memory_is_what_meminfo_says() -> None:
    text = open("/proc/meminfo").read()
    kib = int(
        next(line for line in text.splitlines() if line.startswith("MemAvailable:")).split()[1]
    )
    assert abs(memory.available_memory() - kib * 1024) < 1 << 30  # read a moment apart


@pytest.mark.skipif(not memory.reset_peak(), reason="no /proc/self/clear_refs on this kernel")
def test_peak_counts_from_the_reset() -> None:
    block = np.ones(16 << 20, dtype=np.uint8)  # resident once touched
    del block
    memory.reset_peak()
    base = memory.resident_bytes()
    assert memory.peak_bytes() - base < 8 << 20  # the 16 MiB block no longer counts
    block = np.ones(96 << 20, dtype=np.uint8)
    assert memory.peak_bytes() - base >= 90 << 20
    assert memory.resident_bytes() - base >= 90 << 20
    del block


def test_unreadable_proc_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_kib_field", lambda path, key: None)
    assert memory.available_memory() == memory.UNKNOWN_AVAILABLE
    assert memory.resident_bytes() == 0 and memory.peak_bytes() == 0
