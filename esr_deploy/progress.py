"""Progress reporting for long work (validation over a dataset, latency runs).

Library code takes a :class:`Progress` and calls ``progress.task(description, total)``; the
CLI passes :class:`RichProgress` (bars on stderr, so ``--json`` keeps stdout clean) and
everything else gets :class:`NullProgress`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Advance = Callable[[], None]


class Progress:
    """No-op base: subclasses show bars."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda: None


NullProgress = Progress


class RichProgress(Progress):
    def __init__(self, console: Any) -> None:
        self._console = console

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        with Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
            disable=not self._console.is_terminal,  # no bars (nor blank lines) in logs
        ) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda: bar.advance(task_id)
