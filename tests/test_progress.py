"""The long commands' progress: a bar with counts and rate on a terminal, nothing anywhere else."""

from __future__ import annotations

import io
import re

from rich.console import Console

from app.core.progress import SILENT, on_terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen(console: Console) -> str:
    """The last frame the terminal shows, as text."""
    assert isinstance(console.file, io.StringIO)
    return ANSI.sub("", console.file.getvalue()).replace("\r", "\n")


def test_on_a_terminal_each_step_is_a_line_with_its_count_rate_and_time() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    with on_terminal(console) as progress:
        progress.step("simulating 2,000 participants")
        progress.step("enrolling and answering", total=2_000, unit="participants")
        for _ in range(8):
            progress.advance(250)
        progress.step("benchmark", total=3)
        progress.status("benchmark: ingest")
        progress.advance()
    shown = screen(console)
    last = shown.rstrip().splitlines()[-3:]
    assert last[0].startswith("✓ simulating 2,000 participants")
    assert last[1].startswith("✓ enrolling and answering")
    assert "2,000/2,000 participants" in last[1] and re.search(r"[\d,.]+ participants/s", last[1])
    assert re.search(r"\d:\d\d:\d\d$", last[1].rstrip())  # the time it took
    # a step cut short keeps its count where it stopped, with no rate for a unitless count
    assert "benchmark: ingest" in last[2] and "1/3" in last[2] and "/s" not in last[2]


def test_off_a_terminal_there_is_no_bar_at_all() -> None:
    # under pytest stderr is captured (not a terminal), as in a pipe, a log file or CI
    with on_terminal() as progress:
        assert progress is SILENT
        progress.step("anything", total=10, unit="rows")
        progress.advance(10)
        progress.status("still nothing")
