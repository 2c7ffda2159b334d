"""Progress of the long commands (simulate, import, bench, rotate-keys), for a person at a terminal.

Library code reports units of work to a `Progress`; the command line hands it a bar drawn on
stderr (counts, rate, elapsed time) when stderr is a terminal, and `SILENT` otherwise, so a log
file, a pipe or CI's output holds the commands' results and nothing else.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import ProgressColumn, TaskID


class Progress(Protocol):
    def step(self, description: str, total: int | None = None, unit: str = "") -> None:
        """Start the next piece of work (the one before it counts as done): `total` units, or an
        unknown amount (`None`: a spinner and the time taken)."""

    def advance(self, n: int = 1) -> None:
        """`n` more units of the current piece are done."""

    def status(self, description: str) -> None:
        """Say what the current piece is doing now."""


class _Silent:
    def step(self, description: str, total: int | None = None, unit: str = "") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def status(self, description: str) -> None:
        pass


SILENT: Progress = _Silent()


class _Bar:
    """A line per step: what it is, a bar, `done/total unit`, the rate, the time taken."""

    def __init__(self, progress: RichProgress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def step(self, description: str, total: int | None = None, unit: str = "") -> None:
        self.finish()
        self._task = self._progress.add_task(description, total=total, unit=unit, sized=total is not None)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def status(self, description: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, description=description)

    def finish(self, *, done: bool = True) -> None:
        if self._task is None:
            return
        task = next(t for t in self._progress.tasks if t.id == self._task)
        if done and task.total is None:  # a step of unknown size is done when the next starts
            self._progress.update(self._task, total=task.completed)
        self._progress.stop_task(self._task)
        self._task = None


def _columns() -> list[ProgressColumn]:
    from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
    from rich.table import Column
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task: Task) -> Text:
            unit = task.fields.get("unit", "")
            if not task.fields.get("sized"):
                return Text(f"{task.completed:,.0f} {unit}" if task.completed else "")
            return Text(f"{task.completed:,.0f}/{task.total or 0:,.0f} {unit}".rstrip())

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            # when done, the whole step's average (a step done in one go has no running estimate)
            speed = task.completed / task.finished_time if task.finished_time else task.speed
            unit = task.fields.get("unit", "")
            if not speed or not unit:
                return Text("")
            return Text(f"{speed:,.{0 if speed >= 10 else 1}f} {unit}/s", style="progress.data.speed")

    def fixed() -> Column:
        return Column(no_wrap=True)

    return [SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}", table_column=fixed()),
            BarColumn(bar_width=30), Count(table_column=fixed()), Rate(table_column=fixed()),
            TimeElapsedColumn(table_column=fixed())]


@contextmanager
def on_terminal(console: Console | None = None) -> Iterator[Progress]:
    """A bar on stderr while the block runs, if stderr is a terminal (or `console` is given: tests)."""
    if console is None and not sys.stderr.isatty():
        yield SILENT
        return
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    console = console or Console(stderr=True)
    # what the command prints meanwhile goes above the bar, but only if it is bound for the same
    # terminal: stdout sent to a file or a pipe stays there
    with RichProgress(*_columns(), console=console, redirect_stdout=sys.stdout.isatty(),
                      redirect_stderr=console.file is sys.stderr) as progress:
        bar = _Bar(progress)
        try:
            yield bar
        except BaseException:
            bar.finish(done=False)  # the line stays where the work stopped
            raise
        bar.finish()
