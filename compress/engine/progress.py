"""Progress display, injected so tests and scripts stay silent.

Three modes:
- bars: rich progress bars on stderr with time remaining, when stderr is a terminal;
- lines: one plain line per step (throttled to about ten per task) when it is not, so cluster logs stay readable;
- off: nothing (`--quiet`, `--json`).
Whatever the mode, every task's start, milestones and end also go to the `compress` logger, which the runner
writes to `run.log` in the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]
log = logging.getLogger("compress")


def no_progress(n: int = 1) -> None:
    """An `Advance` that shows nothing."""


class Reporter:
    """Shows one bar (or a few plain lines) per long step."""

    def __init__(self, console: Console | None = None, enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.bars = enabled and self.console.is_terminal
        self.clock = clock

    def note(self, message: str) -> None:
        """Something the person watching should know (a fallback taken); also logged."""
        log.warning(message)
        if self.enabled:
            self.console.print(f"[yellow]note:[/] {message}", highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int, unit: str = "step") -> Iterator[Advance]:
        log.info("%s: %d %ss", description, total, unit)
        if self.bars:
            with self._bar(description, total) as advance:
                yield advance
            return
        with self._lines(description, total, unit) as advance:
            yield advance

    @contextlib.contextmanager
    def _bar(self, description: str, total: int) -> Iterator[Advance]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                progress.advance(task_id, n)

            yield advance

    @contextlib.contextmanager
    def _lines(self, description: str, total: int, unit: str) -> Iterator[Advance]:
        started = self.clock()
        done = 0
        every = max(1, total // 10)

        def advance(n: int = 1) -> None:
            nonlocal done
            before, done = done, done + n
            if n and (done // every != before // every or done == total):
                elapsed = self.clock() - started
                remaining = elapsed / done * (total - done) if done else 0.0
                units = unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")  # batches, layers
                line = f"{description}: {done}/{total} {units}, {elapsed:.1f}s elapsed, ~{remaining:.1f}s left"
                log.info(line)
                if self.enabled:
                    self.console.print(line, highlight=False, markup=False)

        yield advance

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner (or one line) for a step with no natural count (loading a model)."""
        log.info(message)
        if self.bars:
            with self.console.status(message):
                yield
            return
        if self.enabled:
            self.console.print(message, highlight=False, markup=False)
        yield


SILENT = Reporter(enabled=False)
