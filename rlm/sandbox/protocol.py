"""The wire format between the host and a REPL worker: length-prefixed JSON frames, their schema and caps.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON
holding one object with an "op" key. JSON, never pickle: the worker runs untrusted code,
so nothing it sends may be able to run code in the host when decoded.

Host -> worker ops: "setup" (limits and confinement, once, first), "load_context", "exec",
"get_var", "shutdown", "llm_result".
Worker -> host ops: "hello" (its pid as it sees it), "ready" (confined, serving), "context",
"result", "var", "error", "llm_query" (sent while a cell runs; its "kind" "tool" is a call of a
host tool: one prompt, the JSON text of the call, decoded and checked here by decode_tool_call).

Start-up: the worker sends "hello"; the host answers "setup"; the worker applies it and says
"ready". Every later request ("exec", "load_context", "get_var") carries an "id"; the reply,
and every "llm_query" sent while an "exec" runs, carry the id of that request.

The host answers one "llm_query" with one or more "llm_result" frames, each of at most
`RESULT_FRAME_CAP` bytes, built one at a time (`result_frames`): all but the last say
"more": true. So the host's memory for a reply is one frame, however many answers a batch has
(10,000 copies of one cached answer, say); an answer too long for a frame alone is cut in the
middle, marked. A failed request gets a single frame with its "error".

Files (the context) do not travel in frames: the host opens them and passes the descriptor
over a Unix socket pair (SCM_RIGHTS), so a confined worker needs no path to them and the
host never reads them; every descriptor it passes is read-only. The worker's first byte on
that socket carries its credentials, which tell the host the worker's pid in the host's own
pid namespace. The other way, an `rlm_query` context too large for a frame goes as an
unlinked file in the worker's scratch (subcalls.py), one per item marked "file", sent on that
socket before the frame that announces it; the host reopens it read-only (workerio.py).

The worker is untrusted: model code can write any bytes on its pipe. Everything the host
accepts is declared below, once: the caps (`WORKER_FRAME_CAP` and the others) and the table
`WORKER_FRAMES` (op -> field -> type and cap), checked by `FrameReader` before a frame is
returned. A frame that breaks them raises `ProtocolViolation`; the host then stops that
worker. Parsing the worst frame under the caps costs the host about 30 MiB at most (the
body, its decoded text and at most `MAX_JSON_ITEMS` small objects).

This module imports only the standard library and `rlm._text`: it is loaded inside the worker.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass

from rlm._text import truncate_middle

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

__all__ = [
    "CUT_ROOM", "FrameReader", "HOST_FRAMES", "HOST_FRAME_CAP", "MAX_ANSWER_CHARS", "MAX_BATCH", "MAX_CONTEXT_FILE",
    "MAX_ERROR_CHARS", "MAX_JSON_ITEMS", "check_items", "MAX_MODEL_NAME", "MAX_NAMES", "MAX_TOOL_CHARS", "ProtocolError",
    "ProtocolViolation", "RESULT_FRAME_CAP",
    "SUB_CALL_KINDS", "WORKER_FRAMES", "WORKER_FRAME_CAP", "decode_tool_call", "encode_frame", "fit_frame",
    "result_frames",
    "write_bytes", "write_frame",
]

_HEADER = struct.Struct(">I")
MiB = 1 << 20

# -- the caps ---------------------------------------------------------------------------------

WORKER_FRAME_CAP = 4 * MiB  # bytes of one worker -> host frame
HOST_FRAME_CAP = 1 << 30  # bytes of one host -> worker frame (the host is the trusted side)
RESULT_FRAME_CAP = 4 * MiB  # bytes of one llm_result frame: a reply larger than this goes as several
MAX_JSON_ITEMS = 100_000  # separators ("," "[" "{") outside strings in one worker frame
MAX_ANSWER_CHARS = 1_000_000  # a FINAL / FINAL_VAR answer, a variable's value
MAX_ERROR_CHARS = 100_000  # the error text of a cell or a request
MAX_BATCH = 10_000  # prompts (or rlm_query items) in one llm_query frame
MAX_NAMES = 1_000  # variable names listed when a variable is not found
MAX_CONTEXT_FILE = 2 << 30  # bytes of a context file passed with an rlm_query
CUT_ROOM = 200  # characters a cut's marker adds (rlm._text.omission_marker)
# A tool call's arguments, its result, a tool's value: ASCII JSON text (non-ASCII escaped), so
# characters are bytes and a frame carrying one, escaped again, stays within 2 MB.
MAX_TOOL_CHARS = 1_000_000

# "tool": one call of a host tool (rlm/tools.py); its one prompt is the JSON text of
# {"name", "args", "kwargs"}, checked by decode_tool_call; its one answer is the result's JSON text.
SUB_CALL_KINDS = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched", "tool")


class ProtocolError(Exception):
    """The other side closed the pipe, or sent something that is not a valid frame."""


class ProtocolViolation(ProtocolError):
    """The other side sent a frame that breaks the wire format, the schema or a cap."""


# -- the schema -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """What one field of a frame may hold: JSON types (as Python types), a length cap, list items."""

    types: tuple[type, ...]
    cap: int | None = None  # most characters (a str) or items (a list)
    items: tuple[type, ...] | None = None  # the types a list's items may have
    required: bool = True
    choices: tuple[str, ...] | None = None


_NONE = type(None)
_ID = Field((int,))
_TEXT = Field((str,))
_BOOL = Field((bool,))
_COUNT = Field((int,))
MAX_MODEL_NAME = 200  # characters of the sub-model name an llm_query may choose (`model=`)
_MODEL_PROMPT = {"prompt": _TEXT, "model": Field((str,), cap=MAX_MODEL_NAME)}  # llm_query(prompt, model=...)
_ITEM = {  # one rlm_query: the question and its context (text, JSON text, or a file)
    "query": _TEXT,
    "context": Field((str, _NONE)),
    "format": Field((str,), choices=("text", "json")),
    "file": _BOOL,
}

# Worker -> host: every frame the host accepts. A field not listed here is a violation too.
WORKER_FRAMES: dict[str, dict[str, Field]] = {
    "hello": {"pid": _COUNT},
    "ready": {  # and the confinement the worker applied (confine.apply's facts)
        "pid": _COUNT, "landlock_abi": Field((int, _NONE)), "scratch_size": Field((int, _NONE)),
        "namespaces": Field((list,), cap=8, items=(str,)), "own_root": _BOOL,
    },
    "result": {
        "id": _ID, "stdout": _TEXT, "stderr": _TEXT, "error": Field((str, _NONE)), "final": Field((str, _NONE)),
        "interrupted": _BOOL, "duration": Field((int, float)),
    },
    "context": {
        "id": _ID, "type": Field((str,), cap=200), "total_length": _COUNT, "chunk_count": _COUNT,
        "chunk_lengths": Field((list,), cap=100, items=(int,)),
    },
    "var": {
        "id": _ID, "found": _BOOL, "value": Field((str, _NONE), required=False),
        "names": Field((list,), cap=MAX_NAMES, items=(str,), required=False),
        "error": Field((str,), required=False),
    },
    "error": {"id": _ID, "error": _TEXT},
    "llm_query": {
        "id": _ID, "kind": Field((str,), choices=SUB_CALL_KINDS),
        # prompts (str, or _MODEL_PROMPT objects) for the llm kinds, _ITEM objects for the rlm
        # kinds: see _check_sub_call
        "prompts": Field((list,), cap=MAX_BATCH),
    },
}

# Host -> worker, checked by the worker (a failure there is a bug of ours). None: any fields
# (the setup frame is checked by confine.apply).
HOST_FRAMES: dict[str, dict[str, Field] | None] = {
    "setup": None,
    "exec": {"id": _ID, "code": _TEXT, "max_output": _COUNT},
    "load_context": {
        "id": _ID, "value": Field((_NONE,), required=False), "text": Field((str,), required=False),
        "json": Field((str,), required=False), "format": Field((str,), required=False),
        "name": Field((str,), cap=40, required=False),  # "context" (default), "context_0", "context_1"..., "history"
    },
    "get_var": {"id": _ID, "name": _TEXT},
    "llm_result": {  # one part of the answers to an llm_query ("more": another part follows), or its error
        "id": _ID, "more": _BOOL, "results": Field((list,), items=(str,), required=False),
        "error": Field((str,), required=False),
    },
    "shutdown": {},
}


def check_frame(message: object, table: dict) -> dict:
    """`message` if it is an object whose "op" is in `table` and whose fields match; else ProtocolViolation."""
    if type(message) is not dict or type(message.get("op")) is not str:
        raise ProtocolViolation("a frame that is not an object with an 'op' string")
    op = message["op"]
    if op not in table:
        raise ProtocolViolation(f"unknown op {op[:40]!r}")
    fields = table[op]
    if fields is None:
        return message
    for name in message.keys() - fields.keys() - {"op"}:
        raise ProtocolViolation(f"a {op!r} frame with an unknown field {name[:40]!r}")
    for name, field in fields.items():
        if name in message:
            _check_value(message[name], field, f"field {name!r} of a {op!r} frame")
        elif field.required:
            raise ProtocolViolation(f"a {op!r} frame without its {name!r} field")
    if op == "llm_query":
        _check_sub_call(message)
    return message


def _check_value(value: object, field: Field, where: str) -> None:
    if type(value) not in field.types:
        names = " or ".join("null" if kind is _NONE else kind.__name__ for kind in field.types)
        raise ProtocolViolation(f"{where} is a {type(value).__name__}, not {names}")
    if field.cap is not None and len(value) > field.cap:  # type: ignore[arg-type]
        raise ProtocolViolation(f"{where} has a length of {len(value):,}, over its cap of {field.cap:,}")  # type: ignore[arg-type]
    if field.choices is not None and value not in field.choices:
        raise ProtocolViolation(f"{where} is {str(value)[:40]!r}, not one of {', '.join(field.choices)}")
    if field.items is not None:
        for item in value:  # type: ignore[union-attr]
            if type(item) not in field.items:
                raise ProtocolViolation(f"{where} holds a {type(item).__name__}")


def _check_sub_call(message: dict) -> None:
    kind, prompts = message["kind"], message["prompts"]
    if not prompts or (not kind.endswith("_batched") and len(prompts) != 1):
        raise ProtocolViolation(f"an {kind!r} request with {len(prompts)} prompts")
    if kind.startswith("llm_"):
        _check_value(prompts, Field((list,), items=(str, dict)), f"the prompts of an {kind!r} request")
        for item in prompts:
            if type(item) is dict and item.keys() != _MODEL_PROMPT.keys():
                raise ProtocolViolation(
                    f"the prompts of an {kind!r} request holds a dict that is not {{prompt, model}}"
                )
            if type(item) is dict:
                for name, field in _MODEL_PROMPT.items():
                    _check_value(item[name], field, f"field {name!r} of an {kind!r} prompt")
        return
    if kind == "tool":
        message["prompts"] = [decode_tool_call(prompts[0])]
        return
    for item in prompts:
        if type(item) is not dict or item.keys() != _ITEM.keys():
            raise ProtocolViolation(f"an {kind!r} item that is not an object with the fields {', '.join(_ITEM)}")
        for name, field in _ITEM.items():
            _check_value(item[name], field, f"field {name!r} of an {kind!r} item")
        if item["file"] and item["context"] is not None:
            raise ProtocolViolation(f"an {kind!r} item with both a context file and a context text")


def decode_tool_call(text: object) -> dict:
    """A tool call's JSON text as {"name": str, "args": list, "kwargs": dict}; ProtocolViolation
    if it is not that, or over MAX_TOOL_CHARS, or holds more than MAX_JSON_ITEMS values."""
    if type(text) is not str or len(text) > MAX_TOOL_CHARS:
        raise ProtocolViolation(f"a tool call that is not JSON text of at most {MAX_TOOL_CHARS:,} characters")
    check_items(bytearray(text.encode("utf-8", "replace")), MAX_JSON_ITEMS)
    try:
        call = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"a tool call that is not valid JSON ({str(exc)[:100]})") from None
    if (type(call) is not dict or call.keys() != {"name", "args", "kwargs"} or type(call["name"]) is not str
            or type(call["args"]) is not list or type(call["kwargs"]) is not dict):
        raise ProtocolViolation("a tool call that is not an object with the fields name, args, kwargs")
    return call


# -- frames -----------------------------------------------------------------------------------


def encode_frame(message: dict, limit: int = HOST_FRAME_CAP) -> bytes:
    """Encode one message as a frame; ProtocolError if it is over `limit` bytes."""
    # "replace": a lone surrogate made by model code becomes "?" here, so no text that cannot
    # be encoded as UTF-8 (by the HTTP client, the trace writer) ever reaches the host.
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    if len(body) > limit:
        raise ProtocolError(f"frame of {len(body):,} bytes exceeds the {limit:,} byte limit")
    return _HEADER.pack(len(body)) + body


def fit_frame(message: dict, fields: tuple[str, ...], limit: int = WORKER_FRAME_CAP) -> bytes:
    """Encode `message`, cutting the middle of the longest of its text `fields` until it fits `limit`."""
    while True:
        try:
            return encode_frame(message, limit)
        except ProtocolError:
            texts = [name for name in fields if isinstance(message.get(name), str)]
            if not texts:
                raise
            longest = max(texts, key=lambda name: len(message[name]))
            text = message[longest]
            size = len(json.dumps(message, ensure_ascii=False).encode("utf-8", "replace"))
            # Every character is at least one byte: cutting the excess in characters always helps.
            message[longest] = truncate_middle(text, max(0, len(text) - (size - limit) - 2 * CUT_ROOM))


def result_frames(request_id: int, results: list[str], limit: int = RESULT_FRAME_CAP) -> Iterator[bytes]:
    """The "llm_result" frames that carry `results` in order, each made when the last was taken.

    Each frame holds the answers that fit `limit` bytes, encoded one by one (an answer repeated,
    as a batch answered from the cache repeats one, is encoded once); all but the last say
    "more": true. An answer that alone cannot fit is cut in the middle, with a marker.
    """
    room = limit - _RESULT_ROOM
    parts: list[bytes] = []
    used = 0
    previous: str | None = None
    encoded = b""
    for answer in results:
        if answer is not previous:
            previous, encoded = answer, _encoded_answer(answer, room)
        if parts and used + len(encoded) > room:
            yield _result_frame(request_id, parts, more=True)
            parts, used = [], 0
        parts.append(encoded)
        used += len(encoded) + 1  # and a comma
    yield _result_frame(request_id, parts, more=False)


_RESULT_ROOM = 256  # bytes of an llm_result frame that are not answers (op, id, more, punctuation)


def _encoded_answer(answer: str, room: int) -> bytes:
    """`answer` as a JSON string in UTF-8, cut in the middle (marked) until it fits `room` bytes."""
    keep = len(answer) if len(answer) <= room else room - CUT_ROOM  # a character takes a byte at least
    while True:
        encoded = json.dumps(truncate_middle(answer, keep), ensure_ascii=False).encode("utf-8", "replace")
        if len(encoded) <= room:
            return encoded
        # Scaled by the bytes a character of this text takes (1 to 6, escaped), less the marker's room.
        keep = max(0, min(keep - 1, keep * (room - CUT_ROOM) // len(encoded)))


def _result_frame(request_id: int, parts: list[bytes], *, more: bool) -> bytes:
    """One llm_result frame around encoded answers, made with a single copy of them."""
    head = b'{"op":"llm_result","id":%d,"more":%s,"results":[' % (request_id, b"true" if more else b"false")
    pieces = [b"", head]
    for index, part in enumerate(parts):
        if index:
            pieces.append(b",")
        pieces.append(part)
    pieces.append(b"]}")
    pieces[0] = _HEADER.pack(sum(map(len, pieces)))
    return b"".join(pieces)


def write_bytes(fd: int, frame: bytes) -> None:
    """Write an encoded frame to a file descriptor, all of it."""
    view = memoryview(frame)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_frame(fd: int, message: dict, limit: int = HOST_FRAME_CAP) -> None:
    """Write one message to a file descriptor, all of it."""
    write_bytes(fd, encode_frame(message, limit))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
# The rest of a JSON string after its opening quote. Matched at one position only (never
# searched), it is linear even on an unterminated string.
_COUNT_ABOVE = 256 << 10  # bytes: a smaller frame expands to a few MiB at most, however dense
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def check_items(body: bytes | bytearray, cap: int) -> None:
    """ProtocolViolation if `body` has more than `cap` separators outside strings.

    Each JSON value past the first follows a "," "[" or "{", so this bounds the objects the
    parser makes (an empty dict costs 64 bytes for 3 bytes of input). A frame of at most
    `_COUNT_ABOVE` bytes is not counted: whatever it holds costs a few MiB. Counting everywhere
    is one pass in C; the exact count, skipping strings, runs only when that one is too high.
    """
    if len(body) <= _COUNT_ABOVE or body.count(b",") + body.count(b"[") + body.count(b"{") <= cap:
        return
    count, position = 0, 0
    while True:
        quote = body.find(b'"', position)
        end = len(body) if quote < 0 else quote
        count += body.count(b",", position, end) + body.count(b"[", position, end) + body.count(b"{", position, end)
        if count > cap:
            raise ProtocolViolation(f"a frame with more than {cap:,} JSON values (the cap)")
        rest = _STRING_REST.match(body, quote + 1) if quote >= 0 else None
        if rest is None:
            return  # no more strings (or one never closed: the parser says so)
        position = rest.end()


class FrameReader:
    """Reads frames from a file descriptor, optionally waiting no longer than a deadline.

    `limit` caps a frame's length (refused from its header, before the body is read);
    `max_items` caps the JSON values in it; `schema` (an op -> fields table) is checked
    before a frame is returned. At most one frame is buffered.
    """

    def __init__(
        self, fd: int, *, limit: int = HOST_FRAME_CAP, max_items: int | None = None, schema: dict | None = None
    ) -> None:
        self.fd = fd
        self.limit = limit
        self.max_items = max_items
        self.schema = schema
        self._header = b""
        self._body: bytearray | None = None
        self._got = 0
        self._text: str | None = None  # a frame read whole, not parsed yet
        self._poll: Any = None  # select.poll: unlike select.select, any descriptor number (>= 1024 too)

    def _wait(self, deadline: float) -> bool:
        """Whether the descriptor turned readable (or closed) before `deadline`."""
        import time

        if self._poll is None:
            import select

            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        remaining = deadline - time.monotonic()
        return remaining > 0 and bool(self._poll.poll(remaining * 1000))

    def read(self, deadline: float | None = None) -> dict | None:
        """Return the next message, or None if `deadline` (time.monotonic) passes first.

        Raises ProtocolViolation on a frame that breaks the format, a cap or the schema, and
        ProtocolError on end of file. A MemoryError (a worker near its limit) loses nothing: the
        next read decodes the same frame again.
        """
        if self._text is None:
            while self._body is None or self._got < len(self._body):
                if not self._fill(deadline):
                    return None
            if self.max_items is not None:
                try:
                    check_items(self._body, self.max_items)
                except ProtocolViolation:
                    self._body, self._header = None, b""
                    raise
            self._text = self._body.decode("utf-8", "replace")
            self._body, self._header = None, b""  # the parser's objects may take its place
        try:
            message = _DECODER.decode(self._text)
        except (ValueError, RecursionError) as exc:
            self._text = None
            raise ProtocolViolation(f"a frame that is not valid JSON ({str(exc)[:100]})") from None
        self._text = None
        if self.schema is not None:
            return check_frame(message, self.schema)
        if type(message) is not dict or "op" not in message:
            raise ProtocolViolation("a frame that is not an object with an 'op' key")
        return message

    def _fill(self, deadline: float | None) -> bool:
        if deadline is not None and not self._wait(deadline):
            return False
        if self._body is None:
            if len(self._header) < _HEADER.size:
                chunk = os.read(self.fd, _HEADER.size - len(self._header))
                if not chunk:
                    raise ProtocolError("end of stream: the other side closed the pipe")
                self._header += chunk
            if len(self._header) == _HEADER.size:
                (length,) = _HEADER.unpack(self._header)
                if length > self.limit:
                    raise ProtocolViolation(f"a frame of {length:,} bytes, over the cap of {self.limit:,}")
                # A MemoryError here (a worker near its limit) keeps the header: the next read tries again.
                self._body, self._got = bytearray(length), 0
            return True
        with memoryview(self._body) as view:
            got = os.readv(self.fd, [view[self._got :]])
        if not got:
            raise ProtocolError("end of stream: the other side closed the pipe")
        self._got += got
        return True
