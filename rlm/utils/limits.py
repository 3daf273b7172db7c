"""What a model server's answer may cost us: the caps of `ResponseLimits`, checked as bytes arrive.

A server we talk to may be a proxy, a misconfigured one or a hostile one. Every answer is
read as a stream through `BodyGuard`: bytes on the wire and after decoding are counted
against `max_body_bytes`, `Content-Encoding` (gzip, deflate) is decoded here a piece at a
time (never whole) and a compression ratio past `max_compression_ratio` is refused, and
header bytes are counted against `max_header_bytes`. The guard is put on every response by
an httpx2 response hook (`response_hooks`), so it holds whichever transport (or proxy)
carried the request. A cap hit raises `ResponseLimitExceeded` naming the server and the cap.

The time caps (a deadline per attempt and per call, the longest `Retry-After` honoured) are
applied by the callers (`rlm.utils.endpoint`, `rlm.utils.retry`), which know where an
attempt and a call start.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import AsyncIterator

import httpx2

from rlm.errors import ConfigError, ResponseLimitExceeded

__all__ = ["ResponseLimits", "BodyGuard", "response_hooks", "origin_of"]

_PIECE = 64 * 1024  # bytes decoded at a time: what one piece of a compressed answer may grow to
_RATIO_FLOOR = 1024 * 1024  # decoded bytes below which no compression ratio is refused
_DECODED_CODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
ACCEPT_ENCODING = "gzip, deflate"  # what we ask for: the codings BodyGuard decodes


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseLimits:
    """Caps on one answer of a model server. A chat reply is rarely above 1 MiB.

    `max_body_bytes` bounds the body both as sent and once decoded; `max_compression_ratio`
    refuses a compressed body that grows more than that many times (checked past 1 MiB
    decoded); `max_header_bytes` bounds the status line and headers (the HTTP library itself
    reads no more than 100 KiB of them, so a larger value changes nothing); `max_retry_wait` is the
    longest wait (seconds) a `Retry-After` may ask for: past it the client's own backoff is used.
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_compression_ratio: float = 100.0
    max_retry_wait: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"ResponseLimits.{name} must be a positive number of bytes, got {value!r}")
        for name in ("max_compression_ratio", "max_retry_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"ResponseLimits.{name} must be a number >= 0, got {value!r}")


def origin_of(url: httpx2.URL) -> str:
    """scheme://host:port of a URL, the port written out."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return f"{url.scheme}://{url.host}:{port}"


class BodyGuard:
    """Counts and decodes one response body a piece at a time, refusing it past a cap.

    `feed(raw)` takes bytes as received and returns them decoded; `end()` checks that a
    compressed body was complete. `server` names the server in error messages.
    """

    def __init__(self, limits: ResponseLimits, coding: str, server: str) -> None:
        self._limits = limits
        self.server = server
        self._coding = coding
        self._wbits = _DECODED_CODINGS.get(coding)
        self._inflater = zlib.decompressobj(self._wbits) if self._wbits is not None else None
        self._started = False
        self.wire = 0
        self.decoded = 0

    def feed(self, raw: bytes) -> list[bytes]:
        self.wire += len(raw)
        if self.wire > self._limits.max_body_bytes:
            raise self._refused(f"its body passed {self._limits.max_body_bytes:,} bytes on the wire",
                                "max_body_bytes")
        if self._inflater is None:
            self._count(len(raw))
            return [raw] if raw else []
        pieces = []
        pending = raw
        while True:
            piece, pending = self._inflate(pending)
            if piece:
                self._count(len(piece))
                pieces.append(piece)
            if not pending and len(piece) < _PIECE:  # a full piece may leave output inside the inflater
                return pieces

    def end(self) -> None:
        if self._inflater is not None and self._started and not self._inflater.eof:
            raise self._malformed(f"its {self._coding} body ended before the compressed stream did")

    def _inflate(self, data: bytes) -> tuple[bytes, bytes]:
        """At most one piece of decoded output, and the input still to decode."""
        inflater = self._inflater
        assert inflater is not None
        if inflater.eof:  # a gzip body may hold several members; anything else after the end is wrong
            if self._coding == "deflate" or not data.strip(b"\0"):
                return b"", b""
            inflater = self._inflater = zlib.decompressobj(self._wbits)
        try:
            piece = inflater.decompress(data, _PIECE)
        except zlib.error as exc:
            if self._coding == "deflate" and not self._started and self._wbits == zlib.MAX_WBITS:
                self._wbits = -zlib.MAX_WBITS  # "deflate" sent raw, without its zlib wrapper, as some servers do
                self._inflater = zlib.decompressobj(self._wbits)
                return self._inflate(data)
            raise self._malformed(f"its {self._coding} body cannot be decoded ({exc})") from None
        self._started = True
        rest = inflater.unconsumed_tail or (inflater.unused_data if inflater.eof else b"")
        return piece, rest

    def _count(self, size: int) -> None:
        self.decoded += size
        limits = self._limits
        if self.decoded > limits.max_body_bytes:
            raise self._refused(f"its body passed {limits.max_body_bytes:,} bytes once decoded", "max_body_bytes")
        if self.decoded > _RATIO_FLOOR and self.decoded > limits.max_compression_ratio * self.wire:
            raise self._refused(
                f"its {self._coding} body grew more than {limits.max_compression_ratio:g} times when decoded",
                "max_compression_ratio",
            )

    def _refused(self, what: str, cap: str) -> ResponseLimitExceeded:
        return ResponseLimitExceeded(
            f"the model endpoint {self.server} sent an answer past a limit of this client: {what} "
            f"(ResponseLimits.{cap}). Check what answers at that URL; raise the limit only for a server you trust.",
            url=self.server, limit=cap,
        )

    def _malformed(self, what: str) -> ResponseLimitExceeded:
        # A body that cannot be decoded is refused like one past a cap: nothing of it is used.
        return ResponseLimitExceeded(
            f"the model endpoint {self.server} sent an answer that cannot be read: {what}",
            url=self.server, limit="encoding",
        )


class _GuardedStream(httpx2.AsyncByteStream):
    """A response body read through a `BodyGuard` (the raw stream is closed with it)."""

    def __init__(self, raw: httpx2.AsyncByteStream, guard: BodyGuard) -> None:
        self._raw = raw
        self._guard = guard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for raw in self._raw:
            for piece in self._guard.feed(raw):
                yield piece
        self._guard.end()

    async def aclose(self) -> None:
        await self._raw.aclose()


def guard_response(response: httpx2.Response, limits: ResponseLimits) -> None:
    """Put `response`'s body under a `BodyGuard`, after checking its headers and length."""
    server = origin_of(response.request.url)
    head = sum(len(name) + len(value) + 4 for name, value in response.headers.raw)
    if head > limits.max_header_bytes:
        raise ResponseLimitExceeded(
            f"the model endpoint {server} sent {head:,} bytes of headers, more than "
            f"{limits.max_header_bytes:,} (ResponseLimits.max_header_bytes)",
            url=server, limit="max_header_bytes",
        )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limits.max_body_bytes:
        raise ResponseLimitExceeded(
            f"the model endpoint {server} announced a body of {int(length):,} bytes, more than "
            f"{limits.max_body_bytes:,} (ResponseLimits.max_body_bytes)",
            url=server, limit="max_body_bytes",
        )
    coding = response.headers.get("content-encoding", "identity").strip().lower()
    if coding not in _DECODED_CODINGS and coding not in ("identity", ""):
        raise ResponseLimitExceeded(
            f"the model endpoint {server} sent a body in the {coding[:40]!r} encoding, which this client did not "
            f"ask for (it accepts {ACCEPT_ENCODING})",
            url=server, limit="encoding",
        )
    # Decoded here, so httpx2 must not decode again, nor hold the body to the sent length.
    for name in ("content-encoding", "content-length"):
        response.headers.pop(name, None)
    response.stream = _GuardedStream(response.stream, BodyGuard(limits, coding, server))  # type: ignore[arg-type]


def response_hooks(limits: ResponseLimits) -> dict:
    """`event_hooks` for an async httpx2 client that guard every response it reads (the time an
    answer may take is bounded by the caller, `rlm.utils.endpoint`)."""
    async def guard(response: httpx2.Response) -> None:
        guard_response(response, limits)

    return {"response": [guard]}
