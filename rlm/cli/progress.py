"""Live progress of a run on stderr: turn, the code running, batches, tokens and cost so far.

On a terminal it is a small live view (rich), redrawn in place and cleared at the end:

    ⠋ turn 3/20, 12 sub-calls, 45,210 tokens, $0.0123
      running cell 2 of 3: results = llm_query_batched([f"Summarize: {c}" for c in chunks])
      batch ━━━━━━━━━━━━━━━━━━━━╺━━━━━━━━━━━━━━━━━━━ 31/64

Otherwise (a pipe, a CI log) one short plain line per root turn, and one per finished batch.
Either way the run starts with the sandbox it runs in ("sandbox: bwrap (auto)") and a last
line sums it up. Nothing with --quiet. The model's code is shown with
its escape sequences and control characters taken out (`terminal_safe`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal

from rlm._text import terminal_safe
from rlm.cli.output import sandbox_line, say
from rlm.parsing import parse_reply
from rlm.utils.tracing import CodeExec, Event, LLMCall, RunEnd, RunStart, SubCall

__all__ = ["Progress"]

Mode = Literal["rich", "plain", "off"]
_CODE_LINES = 2  # lines of the running cell shown in the live view


@dataclass
class _Batch:
    """A batch of sub-calls in flight: how many of its `total` calls have come back."""

    total: int
    done: int = 0


class Progress:
    """Counts a run's trace events (pass the instance as `on_event`) and shows them on stderr.

    Events come from several threads at once (the event loop, cells, batched sub-calls): all
    state is changed under one lock, and the live view is only handed finished renderables.
    Use it as a context manager around the run: the live view lives inside the block.
    """

    def __init__(self, max_turns: int, mode: Mode, *, on_line: Callable[[str], None] | None = None) -> None:
        self.max_turns = max_turns
        self.mode = mode
        self._on_line = on_line or say  # where "plain" lines go (the front ends send them to their client)
        self.turn = 0
        self.sub_calls = 0
        self.tokens = 0
        self.cost = 0.0
        self.unpriced = False
        self.end: RunEnd | None = None
        self.child_runs = 0
        self._blocks: list[str] = []  # code blocks of the top run's latest reply
        self._running = 0  # index (from 1) of the block running now; 0 when waiting for the model
        self._batches: dict[tuple[str, int, int | None], _Batch] = {}
        self._lock = threading.Lock()
        self._live: Any = None  # rich.live.Live while running in "rich" mode

    @classmethod
    def for_stderr(cls, max_turns: int, *, quiet: bool) -> "Progress":
        """Rich on a terminal, plain lines otherwise, nothing when quiet."""
        mode: Mode = "off" if quiet else "rich" if sys.stderr.isatty() else "plain"
        return cls(max_turns, mode)

    def __call__(self, event: Event) -> None:
        with self._lock:
            said = self._count(event)
            live = self._live
            view = self._view() if live is not None else None
        if live is not None:
            live.update(view)  # rich's Live takes updates from any thread
            if isinstance(event, RunStart) and said:  # the sandbox line stays above the live view
                live.console.print(f"rlm: {said[0]}", markup=False, highlight=False)
        elif self.mode == "plain":
            for line in said:
                self._on_line(line)

    def __enter__(self) -> "Progress":
        if self.mode == "rich":
            from rich.console import Console
            from rich.live import Live

            with self._lock:
                self._live = Live(self._view(), console=Console(stderr=True, force_terminal=True),
                                  refresh_per_second=8, transient=True)
            self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            live.stop()
        if self.mode != "off" and self.end is not None and self.end.status != "error":
            outcome = "answered after" if self.end.status == "answered" else "ran"
            say(f"{outcome} {self.end.turns} turn(s): {self.totals()}, {self.end.duration:.1f} s")

    def line(self) -> str:
        """The status line: turn i/max and the totals so far."""
        return f"turn {max(self.turn, 1)}/{self.max_turns}, {self.totals()}"

    def totals(self) -> str:
        calls = "sub-call" if self.sub_calls == 1 else "sub-calls"
        cost = f"${self.cost:.4f}" + (" + unpriced calls" if self.unpriced else "")
        return f"{self.sub_calls} {calls}, {self.tokens:,} tokens, {cost}"

    # -- counting (under the lock) ---------------------------------------------------------------

    def _count(self, event: Event) -> list[str]:
        """Add the event to the state; return the plain lines it completes."""
        top = event.depth == 0 and event.parent_id is None
        if isinstance(event, RunStart):
            if top:
                self.turn = 1
                return [sandbox_line(event.sandbox, (event.settings or {}).get("sandbox"))]
            else:
                self.child_runs += 1
        elif isinstance(event, LLMCall):
            self._add(event.usage, event.cost)
            if top:
                self.turn = event.turn
                self._blocks, self._running = parse_reply(event.reply).repl_blocks, 1
                return [self.line()]
        elif isinstance(event, CodeExec) and top:
            self._running = self._running + 1 if self._running < len(self._blocks) else 0
        elif isinstance(event, SubCall):
            return self._count_sub_call(event)
        elif isinstance(event, RunEnd):
            self.end = event
        return []

    def _count_sub_call(self, event: SubCall) -> list[str]:
        self.sub_calls += 1
        if event.error is None:
            self._add(event.usage, event.cost)
        if not event.batch_size:
            return []
        key = (event.run_id, event.turn, event.cell)
        batch = self._batches.setdefault(key, _Batch(event.batch_size))
        batch.done += 1
        if batch.done < batch.total:
            return []
        del self._batches[key]
        return [f"turn {event.turn}: batch of {batch.total} sub-calls done"] if batch.total > 1 else []

    def _add(self, usage: dict, cost: float | None) -> None:
        self.tokens += int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
        if cost is None:
            self.unpriced = True
        else:
            self.cost += cost

    # -- the live view (built under the lock, drawn by rich's own thread) -----------------------

    def _view(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        rows: list[Any] = [Spinner("dots", Text(self.line() if self.turn else "starting"))]
        if self._running and self._blocks:
            code = [line for line in terminal_safe(self._blocks[self._running - 1]).splitlines() if line.strip()]
            label = f"running cell {self._running} of {len(self._blocks)}: "
            shown = "\n".join([code[0] if code else "", *("    " + line for line in code[1:_CODE_LINES])])
            rows.append(Text("  " + label + shown, style="dim", overflow="ellipsis", no_wrap=True))
        elif self.turn:
            rows.append(Text("  waiting for the model's reply", style="dim"))
        for batch in list(self._batches.values())[-2:]:
            grid = Table.grid(padding=(0, 1))
            grid.add_row(Text("  batch"), ProgressBar(total=batch.total, completed=batch.done, width=40),
                         Text(f"{batch.done}/{batch.total}"))
            rows.append(grid)
        if self.child_runs:
            rows.append(Text(f"  {self.child_runs} child run(s) started", style="dim"))
        return Group(*rows)

