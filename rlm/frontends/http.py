"""What both HTTP front ends share: the bearer key, the loopback guard, and serving with uvicorn.

Checks made before a request reaches either app (ASGI middleware, in this order):

| check | when | refused with |
|---|---|---|
| `Authorization: Bearer <RLM_SERVER_KEY>` | the key is set | 401, `WWW-Authenticate: Bearer` |
| `Host` is 127.0.0.1, localhost or [::1] (any port), and an `Origin`, if sent, too | the server listens on a loopback address | 403 |

The host check stops DNS rebinding: a web page whose name was pointed at 127.0.0.1 sends its
own name as `Host`. The key is compared in constant time. Connections beyond
`max_connections` get uvicorn's 503.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from rlm.errors import ConfigError

__all__ = ["RequireKey", "LoopbackOnly", "is_loopback", "serve_http", "send_error"]

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}


def is_loopback(host: str) -> bool:
    """True for an address (or "localhost") that only this machine can reach."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def send_error(send: Callable[[dict], Awaitable[None]], status: int, kind: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer with an OpenAI-shaped error body: {"error": {"message", "type", "param", "code"}}."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or []),
    ]})
    await send({"type": "http.response.body", "body": body})


class RequireKey:
    """Refuse HTTP requests without `Authorization: Bearer <key>` (every request passes when `key` is None)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.key is not None:
            scheme, _, token = _header(scope, b"authorization").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await send_error(send, 401, "authentication_error",
                                 "missing or wrong API key: send Authorization: Bearer <the server's RLM_SERVER_KEY>",
                                 [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class LoopbackOnly:
    """Refuse HTTP requests whose Host (or Origin) is not a loopback name: DNS rebinding."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            host = _host_name(_header(scope, b"host").decode("latin-1"))
            origin = _header(scope, b"origin").decode("latin-1")
            if host not in _LOOPBACK_NAMES or (origin and _host_name(urlsplit(origin).netloc) not in _LOOPBACK_NAMES):
                await send_error(send, 403, "permission_error",
                                 "this server answers only requests addressed to 127.0.0.1, localhost or [::1]")
                return
        await self.app(scope, receive, send)


def serve_http(app: ASGIApp, host: str, port: int, ready: Callable[[str], None], *, max_connections: int) -> None:
    """Serve `app` at host:port until SIGINT / SIGTERM; `ready` gets the base URL
    (http://host:port, the port chosen by the system when `port` is 0) once it listens."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        listener = socket.create_server((host.strip("[]"), port), family=family)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port or host") from None
    bound = listener.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
    config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning",
                            limit_concurrency=max_connections, timeout_graceful_shutdown=5)
    ready(f"http://{shown}:{bound}")  # the socket listens already: early clients wait in its backlog
    uvicorn.Server(config).run(sockets=[listener])


def _header(scope: dict, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return b""


def _host_name(host: str) -> str:
    """The name part of a Host header or netloc ("127.0.0.1:8765" -> "127.0.0.1", "[::1]:80" -> "::1")."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
