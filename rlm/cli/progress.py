"""Live progress of a run on stderr: turn, sub-calls, tokens and cost so far.

On a terminal it is one transient rich status line; otherwise (a pipe, a CI log) one short
plain line per root turn. Either way a last line sums the run up. Nothing with --quiet.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Literal

from rlm.utils.tracing import Event, LLMCall, RunEnd, RunStart, SubCall

__all__ = ["Progress"]

Mode = Literal["rich", "plain", "off"]


class Progress:
    """Counts a run's trace events (pass the instance as `on_event`) and shows them on stderr.

    Events may come from several threads at once (batched sub-calls), hence the lock. Use it
    as a context manager around the run: the rich status line lives inside the block.
    """

    def __init__(self, max_turns: int, mode: Mode) -> None:
        self.max_turns = max_turns
        self.mode = mode
        self.turn = 0
        self.sub_calls = 0
        self.tokens = 0
        self.cost = 0.0
        self.unpriced = False
        self.end: RunEnd | None = None
        self._lock = threading.Lock()
        self._status: Any = None  # rich.status.Status while running in "rich" mode

    @classmethod
    def for_stderr(cls, max_turns: int, *, quiet: bool) -> "Progress":
        """Rich on a terminal, plain lines otherwise, nothing when quiet."""
        mode: Mode = "off" if quiet else "rich" if sys.stderr.isatty() else "plain"
        return cls(max_turns, mode)

    def __call__(self, event: Event) -> None:
        with self._lock:
            turn_done = self._count(event)
            line = self.line()
        if self._status is not None:
            from rich.text import Text

            self._status.update(Text(line))
        elif self.mode == "plain" and turn_done:
            _say(line)

    def __enter__(self) -> "Progress":
        if self.mode == "rich":
            from rich.console import Console

            self._status = Console(stderr=True, force_terminal=True).status("starting")
            self._status.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self.mode != "off" and self.end is not None and self.end.status != "error":
            outcome = "answered after" if self.end.status == "answered" else "ran"
            _say(f"{outcome} {self.end.turns} turn(s): {self.totals()}, {self.end.duration:.1f} s")

    def line(self) -> str:
        """The status line: turn i/max and the totals so far."""
        return f"turn {max(self.turn, 1)}/{self.max_turns}, {self.totals()}"

    def totals(self) -> str:
        calls = "sub-call" if self.sub_calls == 1 else "sub-calls"
        cost = f"${self.cost:.4f}" + (" + unpriced calls" if self.unpriced else "")
        return f"{self.sub_calls} {calls}, {self.tokens:,} tokens, {cost}"

    def _count(self, event: Event) -> bool:
        """Add the event to the totals; True when it ends a root model call."""
        if isinstance(event, RunStart):
            self.turn = 1
        elif isinstance(event, LLMCall):
            self.turn = event.turn
            self._add(event.usage, event.cost)
            return True
        elif isinstance(event, SubCall):
            self.sub_calls += 1
            if event.error is None:
                self._add(event.usage, event.cost)
        elif isinstance(event, RunEnd):
            self.end = event
        return False

    def _add(self, usage: dict, cost: float | None) -> None:
        self.tokens += int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
        if cost is None:
            self.unpriced = True
        else:
            self.cost += cost


def _say(line: str) -> None:
    print(f"rlm: {line}", file=sys.stderr, flush=True)
