"""Text helpers shared by the host and the REPL worker (standard library only)."""

from __future__ import annotations

import re

__all__ = ["BoundedText", "clean_text", "is_utf8", "terminal_safe", "truncate_middle", "omission_marker"]

# What a terminal would act on rather than show. Whole escape sequences go first, payload
# included (an OSC 52 clipboard write must not leave its base64 behind): CSI (ESC [ or the
# C1 byte U+009B) up to its final byte; OSC, DCS, SOS, PM and APC (ESC ] P X ^ _, or their
# C1 forms) up to BEL or ST; then any other two-character ESC sequence.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x80-\x9f]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[\x20-\x2f]*[\x30-\x7e]"
)
# Then every control character left but newline and tab (C0, DEL, C1: a lone ESC, BEL,
# backspace, an unterminated sequence's introducer); the bidirectional marks, embeddings,
# overrides and isolates that make text display in another order than it reads; invisible
# format characters that hide text (zero-width space, word joiner and invisible operators,
# byte order mark, interlinear annotations, tag characters); the line and paragraph
# separators; and lone surrogates, which a terminal cannot be sent at all. Zero-width
# (non-)joiners stay: scripts and emoji need them.
TERMINAL_UNSAFE = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064"
    r"\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)
_NEW_LINE = re.compile(r"\r\n?|[\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def terminal_safe(text: str) -> str:
    """`text` as a terminal would show it literally: escape sequences, control characters and
    invisible format characters removed, except newline and tab; a carriage return or a line
    or paragraph separator becomes a newline (so that it cannot write over the start of a
    line); a lone surrogate becomes U+FFFD.

    For text from outside (a model's answer, a server's error) printed to a terminal; machine
    output such as JSON keeps the text as data (see `TERMINAL_UNSAFE`).
    """
    if not TERMINAL_UNSAFE.search(text):
        return text
    text = _SURROGATE.sub("\ufffd", _NEW_LINE.sub("\n", _SEQUENCE.sub("", text)))
    return TERMINAL_UNSAFE.sub("", text)


def clean_text(text: str) -> str:
    """`text` with any lone surrogate replaced by "?", so that it can be encoded as UTF-8.

    Model code can make such strings (chr(0xD800), surrogateescape decoding); the HTTP client
    and the trace writer would fail on them.
    """
    return text if is_utf8(text) else text.encode("utf-8", "replace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """True unless `text` holds a lone surrogate (which UTF-8 cannot encode)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def omission_marker(omitted: int, total: int) -> str:
    """The line put where the middle of a too-long text was cut out."""
    return f"\n[... {omitted:,} characters omitted; the full text was {total:,} characters ...]\n"


def truncate_middle(text: str, limit: int) -> str:
    """Return `text` unchanged if it has at most `limit` characters, else its head and tail.

    The cut keeps the first and last halves of `limit` and says how much was left out, so a
    model reading it knows it is not seeing everything.
    """
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return text[:head] + omission_marker(len(text) - head - tail, len(text)) + (text[-tail:] if tail else "")


class BoundedText:
    """A write-only text sink that keeps at most about `limit` characters: head and tail.

    Memory stays bounded however much is written (a model printing a 1 GB context must not
    exhaust the worker); `getvalue()` returns what `truncate_middle` would have returned for
    the whole text.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.total = 0
        self._parts: list[str] = []
        self._size = 0
        self._head: str | None = None  # set once the text overflows; then _parts hold the tail

    def write(self, text: str) -> int:
        n = len(text)
        self.total += n
        if self._head is None:
            self._parts.append(text)
            self._size += n
            if self._size > 2 * self.limit + 4096:
                joined = "".join(self._parts)
                self._head = joined[: self.limit // 2]
                self._keep_tail(joined)
        else:
            self._parts.append(text)
            self._size += n
            if self._size > 2 * self._tail_len + 4096:
                self._keep_tail("".join(self._parts))
        return n

    @property
    def _tail_len(self) -> int:
        return self.limit - self.limit // 2

    def _keep_tail(self, text: str) -> None:
        tail = text[-self._tail_len :] if self._tail_len else ""
        self._parts = [tail]
        self._size = len(tail)

    def getvalue(self) -> str:
        if self._head is None:
            return truncate_middle("".join(self._parts), self.limit)
        tail = "".join(self._parts)[-self._tail_len :] if self._tail_len else ""
        omitted = self.total - len(self._head) - len(tail)
        return self._head + omission_marker(omitted, self.total) + tail
