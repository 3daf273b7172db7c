"""The wire format between the host and a REPL worker: length-prefixed JSON frames.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON
holding one object with an "op" key. JSON, never pickle: the worker runs untrusted code,
so nothing it sends may be able to run code in the host when decoded.

Host -> worker ops: "setup" (limits and confinement, once, first), "load_context", "exec",
"get_var", "shutdown", "llm_result".
Worker -> host ops: "hello" (its pid as it sees it), "ready" (confined, serving), "context",
"result", "var", "error", "llm_query" (sent while a cell runs).

Start-up: the worker sends "hello"; the host answers "setup"; the worker applies it and says
"ready". Files (the context) do not travel in frames: the host opens them and passes the
descriptor over a Unix socket pair (SCM_RIGHTS), so a confined worker needs no path to them
and the host never reads them. The worker's first byte on that socket carries its
credentials, which tell the host the worker's pid in the host's own pid namespace.

This module imports only the standard library: it is loaded inside the worker.
"""

from __future__ import annotations

import json
import os
import struct

__all__ = ["MAX_FRAME", "encode_frame", "FrameReader", "write_frame", "ProtocolError"]

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30  # 1 GiB: far above anything sane, low enough to refuse a corrupt length


class ProtocolError(Exception):
    """The other side sent bytes that are not a valid frame, or closed the pipe."""


def encode_frame(message: dict) -> bytes:
    """Encode one message as a frame."""
    # "replace": a lone surrogate made by model code becomes "?" here, so no text that cannot
    # be encoded as UTF-8 (by the HTTP client, the trace writer) ever reaches the host.
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME} byte limit")
    return _HEADER.pack(len(body)) + body


def write_frame(fd: int, message: dict) -> None:
    """Write one message to a file descriptor, all of it."""
    view = memoryview(encode_frame(message))
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Reads frames from a file descriptor, optionally waiting no longer than a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def read(self, deadline: float | None = None) -> dict | None:
        """Return the next message, or None if `deadline` (time.monotonic) passes first.

        Raises ProtocolError on end of file or a corrupt frame.
        """
        while True:
            message = self._take()
            if message is not None:
                return message
            if not self._fill(deadline):
                return None

    def _take(self) -> dict | None:
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise ProtocolError(f"corrupt frame header (length {length})")
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        try:
            message = json.loads(body.decode("utf-8", "replace"))
        except ValueError as exc:
            raise ProtocolError(f"frame is not valid JSON: {exc}") from None
        if not isinstance(message, dict) or "op" not in message:
            raise ProtocolError("frame is not an object with an 'op' key")
        return message

    def _fill(self, deadline: float | None) -> bool:
        if deadline is not None:
            import select
            import time

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                return False
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            raise ProtocolError("end of stream: the other side closed the pipe")
        self._buffer += chunk
        return True
