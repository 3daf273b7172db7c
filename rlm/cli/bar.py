"""The progress of a command that runs many items (`rlm batch`, `rlm bench run`), on stderr: a
bar on a terminal, one numbered line per finished item otherwise, nothing with --quiet."""

from __future__ import annotations

import sys
import threading
from typing import Any

from rlm._text import terminal_safe
from rlm.cli.output import say

__all__ = ["ItemsBar"]

_WIDTH = 60  # characters of the last item's line shown beside the bar


class ItemsBar:
    """Use as a context manager; `begin(total)`, then `advance(line)` per item (from any thread)."""

    def __init__(self, quiet: bool) -> None:
        self.mode = "off" if quiet else "rich" if sys.stderr.isatty() else "plain"
        self._bar: Any = None
        self._task: Any = None
        self._done = 0
        self._total = 0
        self._lock = threading.Lock()

    def __enter__(self) -> "ItemsBar":
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def begin(self, total: int) -> None:
        """`total` items are about to run."""
        self._total = total
        if self._bar is not None:
            self._task = self._bar.add_task("", total=total)

    def advance(self, line: str) -> None:
        """One more item ended; `line` says how."""
        with self._lock:
            self._done += 1
            if self._bar is not None:
                self._bar.update(self._task, advance=1, description=_short(line))
            elif self.mode == "plain":
                say(f"[{self._done}/{self._total}] {line}")

    def say(self, line: str) -> None:
        """A message of its own (above the bar on a terminal)."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.console.print("rlm: " + terminal_safe(line), markup=False, highlight=False)
        else:
            say(line)


def _short(text: str) -> str:
    line = " ".join(terminal_safe(text).split())
    return line if len(line) <= _WIDTH else line[: _WIDTH - 3] + "..."
