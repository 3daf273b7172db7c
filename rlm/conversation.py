"""The root conversation of one run: append-only, so that servers can reuse a cached prefix,
and fitted to the model's context window before each request.

Counting. Every message has a token count. Those of a request the server answered come from
its usage (`add_reply`): the messages it had not counted before share what it counted beyond
the others, and the model's reply gets its output tokens. A message no server has counted yet
(the newest REPL output, a note) is estimated at `CHARS_PER_TOKEN` characters a token (fewer
when this conversation's own counts showed denser text) plus `MESSAGE_OVERHEAD` tokens for the
chat template. A server's refusal that states the request's size corrects the counts (`learn`).

Fitting (`fit`). A request must leave room for the reply: the budget is the window less the
reply cap (a quarter of the window, at most 8,192 tokens, when no cap is set). When a request
would pass it, whole old turns (one reply of the model with the REPL output that answered it)
are taken out, oldest first, until the request is down to `REFILL` of the budget (of
`compact_at`'s share of the window, when set): later turns then append to an unchanged prefix
again, so a server's prompt cache keeps working. The system prompt, the first user message
(the context's description and the question) and the latest turn always stay. A `Condenser` writes what stands in for the removed turns, at the end of the
newest message: `DropTurns` (the default) a note naming them; a summariser could return a
summary of them instead (`rlm.compaction.Summarise`, which `compact_at` turns on: then turns
are taken out, and summarised, as soon as the request passes that share of the window).
Only when the latest turn alone is too long is it cut in the middle
(its output first); when even that cannot fit, `ContextWindowExceeded`. A first request too
long by the estimate alone is sent all the same: the server's count, or its refusal, decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rlm._text import truncate_middle
from rlm.errors import ContextWindowExceeded
from rlm.usage import Usage

__all__ = [
    "CHARS_PER_TOKEN", "MESSAGE_OVERHEAD", "REFILL", "Condenser", "Conversation", "DropTurns", "Fit",
    "reply_room", "too_long", "turns_text",
]

CHARS_PER_TOKEN = 3.0  # cautious for prose (~4 a token); code and numbers pack fewer
MESSAGE_OVERHEAD = 4  # tokens the chat template adds around each message
REFILL = 0.6  # after removing turns, the request is at most this share of the budget
_MAX_DEFAULT_REPLY = 8_192
_MIN_KEPT_CHARS = 200  # the latest turn's messages are never cut below this
_MARKER_CHARS = 80  # what truncate_middle's mark of the cut adds
_MIN_SAMPLE_CHARS = 400  # texts shorter than this say little about the tokenizer's density


class Condenser(Protocol):
    """What stands in for old turns taken out of the conversation to fit the window."""

    async def condense(self, removed: list[dict], removed_turns: list[int]) -> str:
        """The text put at the end of the newest message in their place.

        `removed` are the messages taken out now (with the notes they carried; first, when the
        request is fitted again, the text this replaces), `removed_turns` the numbers of every
        turn taken out so far.
        """
        ...


class DropTurns:
    """The default condenser: the removed turns are gone, and a note says which."""

    async def condense(self, removed: list[dict], removed_turns: list[int]) -> str:
        return (
            f"(Note: to fit your context window, {turns_text(removed_turns)} of this conversation (your replies and "
            "the REPL output that answered them) were removed. The REPL still holds every variable; keep what you "
            "need in variables and print less.)"
        )


@dataclass(frozen=True)
class Fit:
    """How a request was fitted: the window (None: unknown, nothing done), the request's size
    as counted, and what was done for it (turns taken out now, messages cut now)."""

    window: int | None
    request_tokens: int
    removed_turns: list[int] = field(default_factory=list)
    shortened: int = 0


@dataclass
class _Message:
    role: str
    text: str
    turn: int  # 0: the system prompt and the first user message; n: turn n's reply and its output
    tokens: int | None = None  # as a server counted it; None: not counted (estimated)
    note: str = ""  # what fitting added at its end

    @property
    def content(self) -> str:
        return f"{self.text}\n\n{self.note}" if self.note else self.text

    def as_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


class Conversation:
    """The root conversation: append-only, except when old turns must go to fit the window."""

    def __init__(self, system: str, first_user: str, condenser: Condenser | None = None) -> None:
        self.condenser: Condenser = condenser or DropTurns()
        self._all = [_Message("system", system, 0), _Message("user", first_user, 0)]
        self._removed: list[int] = []  # turns taken out, in order
        self._sent = 1  # the system prompt is traced once, in run_start, not again as a new message
        self._last_request: list[dict] = []
        self._turn = 0
        self._chars_per_token = CHARS_PER_TOKEN

    @property
    def messages(self) -> list[dict]:
        """The next request: what is left of the conversation."""
        return [message.as_dict() for message in self._live()]

    def add_reply(self, text: str, usage: Usage | None = None) -> None:
        """The model's reply to the current messages; `usage` (the server's counts) measures them."""
        request = self._live()
        self._last_request = [message.as_dict() for message in request]
        counted = usage is not None and not usage.estimated
        if counted:
            self._measure(request, usage.input_tokens)
        self._turn += 1
        tokens = usage.output_tokens + MESSAGE_OVERHEAD if counted else None
        self._all.append(_Message("assistant", text, self._turn, tokens))
        self._sent = len(self._all)

    def add_observation(self, text: str) -> None:
        """What the REPL made of the latest reply (the next request's new message)."""
        self._all.append(_Message("user", text, self._turn))

    def unsent(self) -> list[dict]:
        """The messages added since the latest request."""
        return [message.as_dict() for message in self._all[self._sent:] if message.turn not in self._removed]

    def unchanged_prefix(self) -> int:
        """How many leading messages of the previous request this one repeats unchanged."""
        count = 0
        for before, now in zip(self._last_request, self.messages):
            if before != now:
                break
            count += 1
        return count

    def count(self) -> int:
        """The next request's size in tokens, as counted (servers' counts, else estimates)."""
        return sum(self._tokens(message) for message in self._live())

    def learn(self, refusal: ContextWindowExceeded, window: int | None) -> int:
        """A server refused the current messages as too long: take its count of them, and
        return the window to fit the retry to (the server's, else the known one, else three
        quarters of what was sent)."""
        if refusal.request_tokens:
            self._measure(self._live(), refusal.request_tokens)
        if refusal.window:
            return refusal.window
        sent = self.count()
        return min(window, sent) * 3 // 4 if window else sent * 3 // 4

    async def fit(
        self, window: int | None, reply_tokens: int | None, *, url: str, compact_at: float | None = None
    ) -> Fit:
        """Make the next request fit `window` with room for the reply (see the module's docstring).

        `compact_at`: take old turns out as soon as the request passes this share of the window
        (compaction), not only when it passes the budget. Raises ContextWindowExceeded (naming
        `url`) when it cannot fit.
        """
        if not window:
            return Fit(None, self.count())
        room = reply_room(window, reply_tokens)
        budget = window - room
        head = sum(self._tokens(message) for message in self._all[:2])
        if head >= budget:
            if any(message.tokens is None for message in self._all[:2]):
                return Fit(window, self.count())  # only estimated: the server's count (or refusal) decides
            raise too_long(url, window=window, request_tokens=head, reply_tokens=room)
        limit = budget if compact_at is None else min(budget, int(window * compact_at))
        if self.count() <= limit:
            return Fit(window, self.count())
        removed = await self._remove_old_turns(int(limit * REFILL))
        shortened = self._cut_latest_turn(budget)
        total = self.count()
        if total > budget:
            raise too_long(url, window=window, request_tokens=total, reply_tokens=room)
        return Fit(window, total, removed, shortened)

    # -- helpers ----------------------------------------------------------------------------

    def _live(self) -> list[_Message]:
        return [message for message in self._all if message.turn not in self._removed]

    def _tokens(self, message: _Message) -> int:
        if message.tokens is not None:
            return message.tokens
        return int(len(message.content) / self._chars_per_token) + MESSAGE_OVERHEAD

    def _measure(self, request: list[_Message], prompt_tokens: int) -> None:
        """Share what the server counted beyond the counted messages among the others."""
        uncounted = [message for message in request if message.tokens is None]
        rest = prompt_tokens - sum(message.tokens or 0 for message in request)
        if not uncounted or rest < len(uncounted):
            return  # the server counts otherwise than we thought: keep estimating those
        chars = sum(len(message.content) + 1 for message in uncounted)
        for message in uncounted:
            message.tokens = max(1, round(rest * (len(message.content) + 1) / chars))
        text_tokens = rest - MESSAGE_OVERHEAD * len(uncounted)
        if chars >= _MIN_SAMPLE_CHARS and text_tokens > 0:
            self._chars_per_token = max(1.0, min(self._chars_per_token, chars / text_tokens))

    async def _remove_old_turns(self, target: int) -> list[int]:
        """Take out whole turns, oldest first, all but the latest, until the request is at most
        `target` tokens; the condenser's text goes at the end of the newest message."""
        live = self._live()
        latest = live[-1].turn
        turns = sorted({message.turn for message in live if 0 < message.turn < latest})
        removed: list[int] = []
        total = self.count()
        for turn in turns:
            if total <= target:
                break
            total -= sum(self._tokens(message) for message in live if message.turn == turn)
            removed.append(turn)
        if not removed:
            return []
        newest = self._all[-1]
        earlier = [{"role": newest.role, "content": newest.note}] if newest.note else []
        taken = earlier + [{**message.as_dict(), "turn": message.turn} for message in live if message.turn in removed]
        self._removed.extend(removed)
        newest.note = await self.condenser.condense(taken, list(self._removed))
        newest.tokens = None
        return removed

    def _cut_latest_turn(self, budget: int) -> int:
        """Cut the latest turn's messages in the middle, the newest first, until the request
        fits `budget`; return how many were cut."""
        cut = 0
        for message in reversed([m for m in self._live() if m.turn == self._all[-1].turn and m.turn > 0]):
            over = self.count() - budget
            if over <= 0:
                break
            density = len(message.content) / message.tokens if message.tokens else self._chars_per_token
            keep = int((self._tokens(message) - over - MESSAGE_OVERHEAD) * min(density, self._chars_per_token))
            keep = max(_MIN_KEPT_CHARS, keep - len(message.note) - _MARKER_CHARS)
            shorter = truncate_middle(message.text, keep)
            if shorter != message.text:
                message.text, message.tokens = shorter, None
                cut += 1
        return cut


def reply_room(window: int, reply_tokens: int | None) -> int:
    """Tokens of the window kept for the reply: the reply cap, else a quarter (at most 8,192)."""
    return reply_tokens or min(_MAX_DEFAULT_REPLY, window // 4)


def too_long(
    url: str, *, window: int | None, request_tokens: int | None, reply_tokens: int | None
) -> ContextWindowExceeded:
    """The error for a conversation that cannot fit the window, with what to change."""
    size = f"about {request_tokens:,} tokens" if request_tokens else "more tokens than fit"
    room = f" and {reply_tokens:,} more are kept for the reply" if reply_tokens else ""
    limit = f"the model's context window of {window:,} tokens" if window else "the model's context window"
    return ContextWindowExceeded(
        f"the request to {url} needs {size}{room}: more than {limit}, even with old turns removed. Give the model "
        "a larger window (for llama.cpp's server, its -c / --ctx option), set context_window= if the server "
        "reports a wrong one, or make requests smaller: system_prompt='small', a lower max_reply_tokens, or "
        "fewer turns (max_iterations)",
        url=url, window=window, request_tokens=request_tokens, reply_tokens=reply_tokens,
    )


def turns_text(turns: list[int]) -> str:
    """"turn 3", "turns 1-4", "turns 1-4 and 7"."""
    ranges: list[list[int]] = []
    for turn in sorted(turns):
        if ranges and turn == ranges[-1][1] + 1:
            ranges[-1][1] = turn
        else:
            ranges.append([turn, turn])
    parts = [f"{start}" if start == end else f"{start}-{end}" for start, end in ranges]
    noun = "turn" if len(turns) == 1 else "turns"
    return f"{noun} {', '.join(parts[:-1]) + ' and ' + parts[-1] if len(parts) > 1 else parts[0]}"
