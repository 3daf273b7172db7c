"""Replies that make no progress: each is pointed out to the model, and a run of them stops the loop.

A root reply makes no progress when it reaches the reply cap (`finish_reason` "length") with
no ```repl code and no FINAL, or repeats the previous reply word for word (small models loop
like that). Each such reply gets a note saying which it was; after `STALL_LIMIT` in a row the
run stops with status "no_progress" instead of spending its remaining turns the same way.
"""

from __future__ import annotations

from rlm.parsing import ParsedReply
from rlm.utils.llm import Completion

__all__ = ["STALL_LIMIT", "StallWatch"]

STALL_LIMIT = 3

_CAPPED_NOTE = (
    "Your reply reached the reply length limit without a ```repl code block or a FINAL(...) line, so nothing "
    "ran. Keep replies short: one ```repl block that looks at the context, or FINAL(answer)."
)
_REPEATED_NOTE = (
    "Your reply repeats your previous one word for word, so it makes no progress. Read the REPL output above "
    "and do something different: new ```repl code, or FINAL(answer)."
)


class StallWatch:
    """Counts root replies that make no progress in a row (see the module's docstring)."""

    def __init__(self, limit: int = STALL_LIMIT) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.reason: str | None = None  # why the run stopped, once `stalled`
        self._previous: str | None = None
        self._kinds: list[str] = []

    @property
    def stalled(self) -> bool:
        """True once `limit` replies in a row made no progress."""
        return self.in_a_row >= self.limit

    def check(self, reply: Completion, parsed: ParsedReply) -> str | None:
        """The note for `reply` when it made no progress (and count it), else None."""
        text = reply.text.strip()
        repeated = bool(text) and text == self._previous
        self._previous = text
        capped = reply.finish_reason == "length" and not parsed.repl_blocks and parsed.final is None
        if not (repeated or capped):
            self.in_a_row, self._kinds = 0, []
            return None
        self.in_a_row += 1
        self._kinds.append(
            "repeated the previous reply" if repeated else "reached the reply cap with no code and no FINAL"
        )
        if self.stalled:
            kinds = " or ".join(sorted(set(self._kinds)))
            self.reason = f"the model made no progress in {self.in_a_row} replies in a row (each {kinds})"
        return _REPEATED_NOTE if repeated else _CAPPED_NOTE
