"""Wall time of each compile stage, for the manifest's ``compile_seconds``.

``compile_seconds`` maps a stage name (``load``, ``probe`` (the input-size probe),
``passes``, ``export``, ``metrics``, ``precision``, ``build``, ``validate``, ``latency``,
``report``, and for ``--target auto`` ``candidates`` and ``timing``) to the seconds spent in
it, plus ``total``: the seconds from the start of the compile to the moment the manifest is written.
A stage entered twice adds up. Seconds are rounded to milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class StageTimer:
    """Accumulates wall time per stage name (``time.perf_counter``)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block as stage ``name`` (even when it raises)."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - begin)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def merge(self, other: Mapping[str, float]) -> None:
        """Add another timer's stages (``total`` excluded) into this one."""
        for name, seconds in other.items():
            if name != "total":
                self.add(name, seconds)

    def seconds(self) -> dict[str, float]:
        """Every stage so far and ``total`` (since this timer was made), rounded to ms."""
        out = {name: round(s, 3) for name, s in self._seconds.items()}
        out["total"] = round(time.perf_counter() - self._start, 3)
        return out
