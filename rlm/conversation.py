"""The root conversation of one run: append-only, so that servers can reuse a cached prefix.

Old messages are shortened, never removed, only when the next request would not fit the
model's context window (see `Conversation.fit`).
"""

from __future__ import annotations

from rlm._text import truncate_middle

__all__ = ["Conversation"]

_CHARS_PER_TOKEN_SAFE = 3  # conservative: code and numbers pack fewer characters per token
_SHORTENED_OUTPUT = 2_000


class Conversation:
    """The root conversation: append-only, except that old messages may be shortened to fit."""

    def __init__(self, system: str, first_user: str) -> None:
        self.messages: list[dict] = [{"role": "system", "content": system}, {"role": "user", "content": first_user}]
        self._observations: list[int] = []  # indices of user messages holding REPL output
        self._shortened: set[int] = set()
        self._sent = 1  # the system prompt is traced once, in run_start, not again as a new message
        self._last_request: list[dict] = []

    def add_reply(self, text: str) -> None:
        self._last_request = [dict(message) for message in self.messages]
        self.messages.append({"role": "assistant", "content": text})
        self._sent = len(self.messages)

    def add_observation(self, text: str) -> None:
        self._observations.append(len(self.messages))
        self.messages.append({"role": "user", "content": text})

    def unsent(self) -> list[dict]:
        return [dict(message) for message in self.messages[self._sent :]]

    def unchanged_prefix(self) -> int:
        """How many leading messages of the previous request this one repeats unchanged."""
        count = 0
        for before, now in zip(self._last_request, self.messages):
            if before != now:
                break
            count += 1
        return count

    def fit(self, window: int | None, reply_tokens: int | None) -> int:
        """Shorten old messages until the estimate fits `window`; return how many were shortened.

        The oldest REPL outputs go first, then the model's own oldest replies (never the
        latest). If even that is not enough the request is sent as it is: the estimate is
        cautious, and a server that still refuses it answers with a clear error.
        """
        if not window:
            return 0
        budget = window - (reply_tokens or min(8192, window // 4))
        newest = len(self.messages) - 1
        older_outputs = [i for i in self._observations if i != newest]
        replies = [i for i, m in enumerate(self.messages[:-2]) if m["role"] == "assistant"]
        count = 0
        # The newest output, which the model has not seen yet, is cut only as a last resort.
        for index in [*older_outputs, *replies, *([newest] if newest in self._observations else [])]:
            if self._estimate() <= budget:
                break
            if index in self._shortened:
                continue
            message = self.messages[index]
            self._shortened.add(index)
            shorter = truncate_middle(message["content"], _SHORTENED_OUTPUT)
            if shorter != message["content"]:
                self.messages[index] = {**message, "content": shorter}
                count += 1
        if count:
            last = self.messages[-1]
            last["content"] += (
                f"\n\n(Note: to fit your context window, {count} earlier message(s) of this conversation "
                "were shortened. Keep what you need in variables and print less.)"
            )
        return count

    def _estimate(self) -> int:
        return sum(len(message["content"]) // _CHARS_PER_TOKEN_SAFE + 4 for message in self.messages)
