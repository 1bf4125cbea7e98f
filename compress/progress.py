"""Progress display: rich bars on stderr, or nothing in quiet mode. Injected, so tests and scripts stay silent."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Advance = Callable[[int], None]


def no_progress(n: int = 1) -> None:
    """An `Advance` that shows nothing."""


class Reporter:
    """Shows one bar per long step."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        if not self.enabled:
            yield no_progress
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                progress.advance(task_id, n)

            yield advance

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner for a step with no natural count (loading a model)."""
        if not self.enabled:
            yield
            return
        with self.console.status(message):
            yield


SILENT = Reporter(enabled=False)
