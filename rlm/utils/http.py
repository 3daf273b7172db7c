"""A lean async HTTP/1.1 transport for the model clients, where a fan-out spends its CPU.

httpx2's default transport (httpcore2 over anyio and h11) costs ~1.2 ms of CPU per request
on a 2-core machine. Every sub-call of a tree runs on one event loop, so 16 calls in flight
pay that one after another: ~20 ms added to every 50 ms wave. `LeanTransport` speaks
HTTP/1.1 straight over asyncio streams (~0.2 ms a request), keeps connections alive per
origin, and raises httpx2's own exceptions, so the SDKs above it (their retries, timeouts
and status errors) and our error translation work unchanged.

What it does not do, on purpose: HTTP/2; proxies (`proxied(url)` says when the environment
routes a URL through one: use httpx2's own transport then); streaming request bodies (the
body is read whole first; ours are small JSON documents); connection limits (`Limits`, the
`pool` timeout: the engine's concurrency limiter bounds the requests in flight).

A transport belongs to the event loop it first ran on: its connections are that loop's.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
import time
import urllib.parse
import urllib.request
from typing import AsyncIterator, Awaitable, NamedTuple, TypeVar

import httpx2

__all__ = ["LeanTransport", "proxied"]

_T = TypeVar("_T")
_MAX_HEAD = 64 * 1024  # bytes of status line + headers we accept
_PIECE = 64 * 1024  # bytes per body read
_NO_BODY_STATUSES = (204, 304)
_DROPPED_REQUEST_HEADERS = (b"transfer-encoding", b"content-length", b"connection", b"keep-alive")
_FORBIDDEN_IN_HEADERS = re.compile(rb"[\r\n\0]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_STATUS = re.compile(rb"[1-9][0-9][0-9]")
# A kept-alive connection that fails this soon after the request went out, before any byte of
# an answer, was closed by the server while idle; later, the server may have acted on it.
_STALE_WITHIN = 1.0


async def _within(awaitable: Awaitable[_T], seconds: float | None) -> _T:
    """`await awaitable`, raising asyncio.TimeoutError (the builtin one from 3.11 on) after `seconds`."""
    if seconds is None:
        return await awaitable
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def proxied(url: str) -> bool:
    """True when HTTP(S)_PROXY / ALL_PROXY (less NO_PROXY) route requests to `url` through a proxy."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass_environment(parts.hostname or "", proxies)


class _Connection:
    """One kept-alive TCP (or TLS) connection to an origin."""

    def __init__(self, origin: tuple[str, str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()
        self.sent_at = 0.0
        self.reused = False

    def usable(self, expiry: float) -> bool:
        """Open, silent since its last response, and not idle past `expiry` seconds.

        A server that times out an idle connection may say so first (`408` and a close):
        those bytes wait in the reader's buffer and must not be taken for the next answer.
        """
        if time.monotonic() - self.idle_since >= expiry or self.writer.is_closing():
            return False
        reader = self.reader
        return not reader.at_eof() and reader.exception() is None and not reader._buffer  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()


class LeanTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams with keep-alive, for `httpx2.AsyncClient(transport=...)`.

    `ssl_context` verifies https origins; `max_idle` connections are kept per origin, each
    for at most `keepalive_expiry` seconds of idleness (servers commonly close theirs at 5 s).
    """

    def __init__(self, ssl_context: ssl.SSLContext, *, max_idle: int = 100, keepalive_expiry: float = 4.0) -> None:
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise RuntimeError("this transport was closed; make a new client")
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        message = _request_head(request, len(body)) + body
        for pooled in (True, False):
            connection = await self._connection(request, timeouts.get("connect"), pooled=pooled)
            try:
                await _send(connection, message, timeouts.get("write"), request)
                head = await _read_head(connection, timeouts.get("read"), request)
                framing = _framing(request, head)
            except _StaleConnection:
                connection.close()  # the server had closed this kept-alive connection: once more on a new one
                continue
            except BaseException:
                connection.close()
                raise
            break
        stream = _ResponseBody(self, connection, framing, _keeps_alive(request, head), timeouts.get("read"), request)
        return httpx2.Response(
            head.status, headers=head.headers, stream=stream,
            extensions={"http_version": head.version, "reason_phrase": head.reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    async def _connection(self, request: httpx2.Request, timeout: float | None, *, pooled: bool) -> _Connection:
        url = request.url
        # raw_host: the ASCII (IDNA 2008) form httpx2 also sends in Host; IPv6 without brackets.
        origin = (url.scheme, url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80))
        pool = self._idle.get(origin, []) if pooled else []
        while pool:
            connection = pool.pop()
            if connection.usable(self._expiry):
                connection.reused = True
                return connection
            connection.close()
        if origin[0] not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"cannot send {origin[0]}:// requests", request=request)
        tls = self._ssl if origin[0] == "https" else None
        try:
            reader, writer = await _within(
                asyncio.open_connection(origin[1], origin[2], ssl=tls, server_hostname=origin[1] if tls else None,
                                        limit=_MAX_HEAD),
                timeout,
            )
        except asyncio.TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connecting to {origin[1]}:{origin[2]} timed out", request=request) from exc
        except (OSError, ssl.SSLError) as exc:  # refused, unreachable, unknown host, bad certificate
            raise httpx2.ConnectError(f"cannot connect to {origin[1]}:{origin[2]}: {exc}", request=request) from exc
        return _Connection(origin, reader, writer)

    def _release(self, connection: _Connection, reusable: bool) -> None:
        pool = self._idle.setdefault(connection.origin, [])
        if reusable and not self._closed and len(pool) < self._max_idle:
            connection.idle_since = time.monotonic()
            pool.append(connection)
        else:
            connection.close()


class _StaleConnection(Exception):
    """A kept-alive connection turned out closed before the server answered anything."""


def _request_head(request: httpx2.Request, length: int) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    for name, value in request.headers.raw:
        if _FORBIDDEN_IN_HEADERS.search(name + value):  # e.g. an API key read with its line ending
            raise httpx2.LocalProtocolError(f"the request header {name.decode('latin-1')!r} contains CR, LF or NUL")
        if name.lower() not in _DROPPED_REQUEST_HEADERS:
            lines.append(name + b": " + value)
    if length or request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(b"Content-Length: %d" % length)
    if _asks_to_close(request):
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send(connection: _Connection, data: bytes, timeout: float | None, request: httpx2.Request) -> None:
    connection.sent_at = time.monotonic()
    try:
        connection.writer.write(data)
        await _within(connection.writer.drain(), timeout)
    except asyncio.TimeoutError as exc:
        raise httpx2.WriteTimeout("sending the request timed out", request=request) from exc
    except OSError as exc:
        if connection.reused:
            raise _StaleConnection from exc
        raise httpx2.WriteError(f"sending the request failed: {exc}", request=request) from exc


class _Head(NamedTuple):
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]


async def _read_head(connection: _Connection, timeout: float | None, request: httpx2.Request) -> _Head:
    """Status, reason and headers of the response, skipping informational (1xx) ones."""
    answered = False
    while True:
        try:
            raw = await _within(connection.reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.TimeoutError as exc:
            raise httpx2.ReadTimeout("the server sent no response in time", request=request) from exc
        except asyncio.LimitOverrunError as exc:
            raise httpx2.RemoteProtocolError("the response headers exceed 64 KiB", request=request) from exc
        except (asyncio.IncompleteReadError, OSError) as exc:
            nothing_read = not answered and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial)
            if connection.reused and nothing_read and time.monotonic() - connection.sent_at < _STALE_WITHIN:
                raise _StaleConnection from exc
            raise httpx2.RemoteProtocolError("the server closed the connection without a complete response",
                                             request=request) from exc
        head = _parse_head(raw, request)
        if not 100 <= head.status < 200:
            return head
        answered = True


def _parse_head(raw: bytes, request: httpx2.Request) -> _Head:
    status_line, *header_lines = raw[:-4].split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1") or not _STATUS.fullmatch(parts[1]):
        raise httpx2.RemoteProtocolError(f"not an HTTP/1.x response: {status_line[:80]!r}", request=request)
    headers = []
    for line in header_lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx2.RemoteProtocolError(f"malformed response header: {line[:80]!r}", request=request)
        headers.append((name, value.strip()))
    return _Head(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else b"", headers)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [value for key, value in headers if key.lower() == name]
    return b", ".join(values) if values else None


def _asks_to_close(request: httpx2.Request) -> bool:
    return (request.headers.get("connection") or "").lower() == "close"


def _keeps_alive(request: httpx2.Request, head: _Head) -> bool:
    """HTTP/1.1 connections stay open unless either side says close; HTTP/1.0 ones only on request."""
    tokens = (_header(head.headers, b"connection") or b"").lower()
    if b"close" in tokens or _asks_to_close(request):
        return False
    return head.version != b"HTTP/1.0" or b"keep-alive" in tokens


def _framing(request: httpx2.Request, head: _Head) -> int | str:
    """How the body ends: its length in bytes, "chunked", or "close" (read until the server closes)."""
    if request.method == "HEAD" or head.status in _NO_BODY_STATUSES:
        return 0
    coding = _header(head.headers, b"transfer-encoding")
    if coding is not None:
        if coding.strip().lower() != b"chunked":  # e.g. "gzip, chunked": no client decodes that
            raise httpx2.RemoteProtocolError(f"unsupported Transfer-Encoding {coding[:40]!r}", request=request)
        return "chunked"
    length = _header(head.headers, b"content-length")
    if length is None:
        return "close"
    values = {value.strip() for value in length.split(b",")}
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise httpx2.RemoteProtocolError(f"bad Content-Length {length[:40]!r}", request=request)
    return int(values.pop())


class _ResponseBody(httpx2.AsyncByteStream):
    """The body as it arrives; the connection goes back to the pool once the body is read whole."""

    def __init__(self, transport: LeanTransport, connection: _Connection, framing: int | str, reusable: bool,
                 timeout: float | None, request: httpx2.Request) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._framing = framing
        self._reusable = reusable and framing != "close"
        self._timeout = timeout
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx2.StreamClosed()
        try:
            if self._framing == "chunked":
                pieces = self._chunked(connection.reader)
            elif self._framing == "close":
                pieces = self._until_close(connection.reader)
            else:
                pieces = self._exactly(connection.reader, int(self._framing))
            async for piece in pieces:
                yield piece
        except BaseException:
            self._finish(reusable=False)
            raise
        self._finish(reusable=self._reusable)

    async def aclose(self) -> None:
        self._finish(reusable=False)  # closed before the end: the rest of the body is still on the wire

    def _finish(self, *, reusable: bool) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._transport._release(connection, reusable)

    async def _read(self, awaitable: Awaitable[bytes]) -> bytes:
        try:
            return await _within(awaitable, self._timeout)
        except asyncio.TimeoutError as exc:
            raise httpx2.ReadTimeout("the response body stopped arriving", request=self._request) from exc
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            raise httpx2.RemoteProtocolError(f"the response body was cut short: {exc}", request=self._request) from exc

    async def _exactly(self, reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
        while length:
            piece = await self._read(reader.read(min(length, _PIECE)))
            if not piece:
                raise httpx2.RemoteProtocolError("the server closed the connection mid-body", request=self._request)
            length -= len(piece)
            yield piece

    async def _until_close(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while piece := await self._read(reader.read(_PIECE)):
            yield piece

    async def _chunked(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            line = await self._read(reader.readuntil(b"\r\n"))
            size_text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise httpx2.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}", request=self._request)
            size = int(size_text, 16)
            if size == 0:
                while await self._read(reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailer fields: nothing of ours uses them
                return
            async for piece in self._exactly(reader, size):
                yield piece
            if await self._read(reader.readexactly(2)) != b"\r\n":
                raise httpx2.RemoteProtocolError("a chunk did not end with CRLF", request=self._request)
