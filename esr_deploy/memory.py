"""This process's memory and the machine's, read from ``/proc`` (Linux).

- :func:`available_memory`: ``MemAvailable`` of ``/proc/meminfo``, what can still be
  allocated without swapping;
- :func:`resident_bytes` / :func:`peak_bytes`: this process's ``VmRSS`` and ``VmHWM``
  (``/proc/self/status``);
- :func:`reset_peak`: writes ``5`` to ``/proc/self/clear_refs``, which sets ``VmHWM`` back to
  the current ``VmRSS`` (Linux ≥ 4.0), so the peak of one step can be read on its own.

Where ``/proc`` cannot be read (another OS, a sandbox), the readers say so with their
fallbacks (documented per function) rather than raising: callers use these numbers to
decide how much to hold at once, never for correctness.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["available_memory", "peak_bytes", "reset_peak", "resident_bytes"]

#: what :func:`available_memory` says where ``/proc/meminfo`` cannot be read
UNKNOWN_AVAILABLE = 4 << 30


def _kib_field(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``), or 4 GiB where it cannot be read."""
    found = _kib_field("/proc/meminfo", "MemAvailable")
    return UNKNOWN_AVAILABLE if found is None else found


def resident_bytes() -> int:
    """This process's resident set (``VmRSS``), or 0 where it cannot be read."""
    return _kib_field("/proc/self/status", "VmRSS") or 0


def peak_bytes() -> int:
    """This process's peak resident set (``VmHWM``) since start or the last
    :func:`reset_peak`, or 0 where it cannot be read."""
    return _kib_field("/proc/self/status", "VmHWM") or 0


def reset_peak() -> bool:
    """Set the peak resident set back to the current one; False where the kernel does not
    allow it (then :func:`peak_bytes` keeps counting from the process's start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
