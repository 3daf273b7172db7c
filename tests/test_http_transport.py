"""What the endpoint's HTTP exchange does on the wire: keep-alive, body codings decoded under
the caps, TLS trust; over real sockets on 127.0.0.1 (tests/scripted_http.py)."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from pathlib import Path

import pytest

from rlm.errors import ClientError, ConfigError, EndpointUnreachable, ResponseLimitExceeded
from rlm.utils.endpoint import JSONEndpoint, ssl_context
from rlm.utils.limits import BodyGuard, ResponseLimits
from scripted_http import ScriptedServer, response

TLS = Path(__file__).parent / "data" / "tls"
REPLY = b'{"answer": "' + b"forty-two " * 2000 + b'"}'


def exchange(*replies: bytes, tls: ssl.SSLContext | None = None, calls: int = 1) -> tuple[list, ScriptedServer]:
    """POST `calls` times through one endpoint on one event loop; the decoded replies and the server."""
    async def main() -> tuple[list, ScriptedServer]:
        async with ScriptedServer(*replies, tls=tls) as server:
            endpoint = JSONEndpoint(server.url + "/v1", {}, timeout=5.0, max_retries=0)
            try:
                answers = [await endpoint.apost("chat/completions", {"n": index}) for index in range(calls)]
            finally:
                await endpoint.aclose()
        return answers, server

    return asyncio.run(main())


def test_requests_share_one_kept_alive_connection_and_ask_only_for_codings_we_decode() -> None:
    answers, server = exchange(*(response(b'{"n": %d}' % i) for i in range(3)), calls=3)
    assert answers == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert server.connections == 1
    head = server.heads[0].decode().lower()
    assert head.startswith("post /v1/chat/completions http/1.1") and "accept-encoding: gzip, deflate\r\n" in head


@pytest.mark.parametrize("coding, body", [
    ("gzip", gzip.compress(REPLY)),
    ("gzip", gzip.compress(REPLY[:5000]) + gzip.compress(REPLY[5000:])),  # two members
    ("deflate", zlib.compress(REPLY)),
    ("deflate", zlib.compress(REPLY)[2:-4]),  # raw deflate, without the zlib wrapper
    ("identity", REPLY),
])
def test_a_coded_body_is_decoded(coding: str, body: bytes) -> None:
    answers, _ = exchange(response(body, headers=f"Content-Encoding: {coding}\r\n"))
    assert answers == [{"answer": "forty-two " * 2000}]


def test_a_truncated_gzip_body_is_refused() -> None:
    with pytest.raises(ResponseLimitExceeded, match="ended before the compressed stream did"):
        exchange(response(gzip.compress(REPLY)[:-20], headers="Content-Encoding: gzip\r\n"))


def test_the_guard_decodes_piece_by_piece_and_stops_at_the_cap() -> None:
    bomb = zlib.compress(bytes(64 * 1024 * 1024))
    guard = BodyGuard(ResponseLimits(max_body_bytes=2 * 1024 * 1024, max_compression_ratio=10**6), "deflate", "here")
    with pytest.raises(ResponseLimitExceeded, match="passed 2,097,152 bytes once decoded") as caught:
        for start in range(0, len(bomb), 1024):
            assert all(len(piece) <= 64 * 1024 for piece in guard.feed(bomb[start:start + 1024]))
    assert caught.value.limit == "max_body_bytes"
    assert guard.decoded <= 2 * 1024 * 1024 + 64 * 1024


def test_limits_refuse_values_that_are_no_limit() -> None:
    for bad in ({"max_body_bytes": 0}, {"max_header_bytes": 1.5}, {"max_compression_ratio": -1},
                {"max_retry_wait": True}):
        with pytest.raises(ConfigError):
            ResponseLimits(**bad)


def test_https_trusted_through_ssl_cert_file_and_refused_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    with pytest.raises(ClientError, match="TLS certificate") as caught:
        exchange(response(b"{}"), tls=served)
    assert not isinstance(caught.value, EndpointUnreachable)

    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "cert.pem"))  # what the error message advises
    ssl_context.cache_clear()
    try:
        answers, server = exchange(response(b'{"secret": 1}'), response(b'{"again": 2}'), tls=served, calls=2)
    finally:
        ssl_context.cache_clear()
    assert answers == [{"secret": 1}, {"again": 2}] and server.connections == 1


def test_a_line_break_in_a_header_is_refused_before_sending_without_quoting_the_key() -> None:
    async def main() -> ScriptedServer:
        async with ScriptedServer(response(b"{}")) as server:
            endpoint = JSONEndpoint(server.url + "/v1", {"Authorization": "Bearer sk-secret\r\nX-Evil: 1"},
                                    timeout=5.0, max_retries=0)
            with pytest.raises(ConfigError, match="API key") as caught:
                await endpoint.apost("chat/completions", {})
            await endpoint.aclose()
        assert "sk-secret" not in str(caught.value)
        return server

    assert asyncio.run(main()).heads == []
