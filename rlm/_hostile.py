"""A hostile model server on 127.0.0.1: every way of answering badly that a client must survive.

`HostileServer` speaks raw HTTP/1.1 over a real socket, so a fault can be what no well-made
server sends: a compression bomb, a body of half a gigabyte made on the fly, a trickle of
one byte at a time, headers without end, a redirect elsewhere, usage figures that cannot be
true. `FAULTS` names each case; `Fault` describes one answer, so a test can make its own.
Public through `rlm.testing`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
import ssl
import threading
import zlib
from typing import Callable, Iterable, Iterator

__all__ = ["Fault", "FAULTS", "HostileServer", "RecordedRequest", "chat_body", "redirect"]

_MIB = 1024 * 1024
_PIECE = 64 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fault:
    """One answer, byte for byte. `body` makes its pieces when the answer is sent (a huge body
    is never held whole); `framing` is "length" (Content-Length: `length`, or the sum of the
    pieces), "chunked" or "close" (the body ends when the connection does). `pace` is the
    wait between body pieces, `head_pace` between the head's bytes (a trickled head);
    `silent` answers nothing at all."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    body: Callable[[], Iterable[bytes]] = lambda: ()
    framing: str = "length"
    length: int | None = None
    pace: float = 0.0
    head_pace: float = 0.0
    silent: bool = False


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def chat_body(content: object = "ok", *, usage: object = None, choices: object = None, **extra: object) -> bytes:
    """A chat-completion JSON body: `content` as the message content, `usage` as given (omitted
    when None), `choices` replacing the whole choices list when given."""
    message = {"role": "assistant", "content": content}
    body: dict = {
        "id": "chatcmpl-hostile", "object": "chat.completion", "model": "hostile",
        "choices": choices if choices is not None else [{"index": 0, "message": message, "finish_reason": "stop"}],
        **extra,
    }
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def _reply(body: bytes, content_type: str = "application/json", **changes: object) -> Fault:
    return Fault(headers=(("Content-Type", content_type),), body=lambda: (body,), **changes)  # type: ignore[arg-type]


def _repeated(piece: bytes, total: int) -> Callable[[], Iterator[bytes]]:
    def pieces() -> Iterator[bytes]:
        for _ in range(total // len(piece)):
            yield piece
    return pieces


@functools.lru_cache(maxsize=None)
def _gzip_member(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return packer.compress(bytes(size)) + packer.flush()


@functools.lru_cache(maxsize=None)
def _deflate_bomb() -> bytes:
    """One zlib stream that inflates to 64 MiB of zeros.

    Made in ~20 ms, not by compressing 64 MiB (a third of a second, longer than a short client
    timeout on a busy machine): after a full flush the compressed mebibyte of zeros is the
    same bytes each time, so it is repeated, then ended with the checksum of it all.
    """
    packer = zlib.compressobj(9)
    zeros = bytes(_MIB)
    first = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)  # the zlib header and a mebibyte
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(64):
        checksum = zlib.adler32(zeros, checksum)
    last_block = packer.flush()[:-4]  # an empty final block, without the checksum of two mebibytes
    return first + again * 63 + last_block + checksum.to_bytes(4, "big")


def _huge_content() -> Iterator[bytes]:
    """A valid chat completion whose content is 512 MiB of text."""
    yield b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "'
    yield from _repeated(b"x" * _PIECE, 512 * _MIB)()
    yield b'"}}]}'


def _trickled(body: bytes, pace: float) -> Fault:
    """`body` one byte every `pace` seconds."""
    return Fault(body=lambda: (body[i:i + 1] for i in range(len(body))), length=len(body), pace=pace)


def _usage(**fields: object) -> Fault:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, **fields}
    return _reply(chat_body("fine", usage=usage))


FAULTS: dict[str, Fault] = {
    # size and encoding: each decodes or streams far past any sane cap
    "gzip_bomb": Fault(  # ~1 MB of gzip members that decode to 1 GiB of zeros
        headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip")),
        body=lambda: (_gzip_member(_MIB) for _ in range(1024)),
    ),
    "deflate_bomb": Fault(
        headers=(("Content-Type", "application/json"), ("Content-Encoding", "deflate")),
        body=lambda: (_deflate_bomb(),),
    ),
    "huge_body": Fault(framing="chunked", body=_repeated(b"y" * _PIECE, 512 * _MIB)),
    "huge_announced_body": Fault(length=512 * _MIB, body=_repeated(b"y" * _PIECE, 512 * _MIB)),
    "huge_content": Fault(framing="close", body=_huge_content),
    "header_flood": Fault(
        headers=tuple((f"X-Flood-{i}", "z" * 1000) for i in range(1024)), body=lambda: (chat_body(),),
    ),
    "unknown_encoding": Fault(
        headers=(("Content-Type", "application/json"), ("Content-Encoding", "br")), body=lambda: (b"\x8b\x00",),
    ),
    # time
    "trickled_body": _trickled(chat_body("slow"), 0.2),
    "trickled_head": Fault(body=lambda: (chat_body(),), head_pace=0.05),
    "silent": Fault(silent=True),
    "retry_after_huge": Fault(status=503, headers=(("Retry-After", "100000"),), body=lambda: (b"busy",)),
    # what the body says
    "not_json": _reply(b"this is not JSON", "text/plain"),
    "html": _reply(b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html"),
    "sse": _reply(b'data: {"choices": []}\n\ndata: [DONE]\n\n', "text/event-stream"),
    "deep_json": _reply(b"[" * 200_000 + b"]" * 200_000),
    "empty_choices": _reply(chat_body(choices=[])),
    "content_number": _reply(chat_body(42)),
    "content_object": _reply(chat_body({"text": "hidden"})),
    "content_null": _reply(chat_body(None)),
    "content_parts": _reply(chat_body([{"type": "text", "text": "forty"}, {"type": "text", "text": "-two"}])),
    # usage figures that cannot be true
    "usage_negative": _usage(prompt_tokens=-1_000_000_000),
    "usage_absurd": _usage(prompt_tokens=10**30, completion_tokens=10**12),
    "usage_float": _usage(prompt_tokens=1e30),
    "usage_boolean": _usage(prompt_tokens=True, completion_tokens=True),
    "usage_text": _usage(prompt_tokens="12"),
}


def redirect(location: str, status: int = 307) -> Fault:
    """A redirect to `location` (a whole URL: another origin; a path: the same one)."""
    return Fault(status=status, headers=(("Location", location),), body=lambda: (b"moved",))


class HostileServer:
    """A real HTTP/1.1 server on 127.0.0.1 answering every request with a `Fault`.

    `fault` is a Fault, a name from `FAULTS`, or a function of the `RecordedRequest` giving
    one. `tls` serves https with that server-side context (say, a certificate the client
    does not trust). Every request is kept in `requests`. Use as a context manager.
    """

    def __init__(self, fault: Fault | str | Callable[[RecordedRequest], Fault], *,
                 tls: ssl.SSLContext | None = None) -> None:
        self._fault = FAULTS[fault] if isinstance(fault, str) else fault
        self._tls = tls
        self._url: str | None = None
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        """Base URL to give an OpenAI-compatible client, ending in /v1."""
        if self._url is None:
            raise RuntimeError("the hostile server is not running; use it in a with block")
        return self._url

    def __enter__(self) -> "HostileServer":
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(0.05)
        scheme = "https" if self._tls else "http"
        self._url = f"{scheme}://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(5)
        if self._listener is not None:
            self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="hostile-server")
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._spawn(self._serve, connection)

    def _serve(self, connection: socket.socket) -> None:
        if self._tls is not None:
            try:
                connection.settimeout(5)
                connection = self._tls.wrap_socket(connection, server_side=True)
            except OSError:  # the client refused the certificate, as it should
                connection.close()
                return
        with connection:
            connection.settimeout(0.05)
            while not self._stopping.is_set():
                request = self._read_request(connection)
                if request is None:
                    return
                with self._lock:
                    self.requests.append(request)
                fault = self._fault(request) if callable(self._fault) else self._fault
                try:
                    if not self._answer(connection, fault):
                        return
                except OSError:  # the client hung up (as it should, past a cap)
                    return

    def _read_request(self, connection: socket.socket) -> RecordedRequest | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self._receive(connection)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (item.partition(":") for item in lines)}
        while len(body) < int(headers.get("content-length", "0")):
            chunk = self._receive(connection)
            if not chunk:
                return None
            body += chunk
        method, path, _ = line.split(" ", 2)
        return RecordedRequest(method, path, headers, body)

    def _receive(self, connection: socket.socket) -> bytes:
        while not self._stopping.is_set():
            try:
                return connection.recv(_PIECE)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return b""

    def _answer(self, connection: socket.socket, fault: Fault) -> bool:
        """Send `fault`; True when the connection may carry another request."""
        if fault.silent:
            self._stopping.wait(3600)
            return False
        pieces: Iterable[bytes] = fault.body()
        lines = [f"HTTP/1.1 {fault.status} Hostile", *(f"{name}: {value}" for name, value in fault.headers)]
        if fault.framing == "length":
            if fault.length is None:
                pieces = [b"".join(pieces)]
            lines.append(f"Content-Length: {fault.length if fault.length is not None else len(pieces[0])}")
        elif fault.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._send(connection, head, fault.head_pace, single=fault.head_pace > 0)
        for piece in pieces:
            if self._stopping.is_set():
                return False
            framed = b"%x\r\n%s\r\n" % (len(piece), piece) if fault.framing == "chunked" else piece
            self._send(connection, framed, fault.pace)
        if fault.framing == "chunked":
            connection.sendall(b"0\r\n\r\n")
        return fault.framing != "close"

    def _send(self, connection: socket.socket, data: bytes, pace: float, *, single: bool = False) -> None:
        if single:
            for index in range(len(data)):
                if self._stopping.wait(pace):
                    return
                connection.sendall(data[index:index + 1])
            return
        if pace and self._stopping.wait(pace):
            return
        connection.settimeout(5)  # a client that stopped reading is not waited for long
        try:
            connection.sendall(data)
        finally:
            connection.settimeout(0.05)
