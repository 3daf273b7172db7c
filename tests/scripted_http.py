"""A scripted HTTP/1.1 server on 127.0.0.1 for the transport and endpoint tests.

Every request it reads is answered with the next scripted reply: raw bytes, so malformed
and unusual responses can be sent. It counts the connections it accepted.
"""

from __future__ import annotations

import asyncio
import ssl

DROP = b""  # as a scripted reply: close the connection without answering
SILENT = None  # as a scripted reply: read the request and never answer


def response(body: bytes = b"ok", *, status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


class ScriptedServer:
    def __init__(self, *replies: bytes | None, close_after: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.replies = list(replies)
        self.close_after = close_after  # close each connection after one answer (without saying so)
        self.tls = tls
        self.connections = 0
        self.closed_by_client = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def __aenter__(self) -> "ScriptedServer":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length))
                reply = self.replies.pop(0)
                if reply is SILENT:
                    await reader.read()  # until the client gives up and closes
                    self.closed_by_client += 1
                    return
                if reply == DROP:
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after:
                    return
        finally:
            writer.close()
