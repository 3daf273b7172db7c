"""LeanTransport over real sockets on 127.0.0.1: framing, keep-alive, failures, timeouts, TLS.

Each test runs a scripted HTTP/1.1 server (tests/scripted_http.py) in its own event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx2
import pytest

from rlm.utils.endpoint import ssl_context
from rlm.utils.http import LeanTransport
from scripted_http import DROP, SILENT, ScriptedServer, response

TLS = Path(__file__).parent / "data" / "tls"
def run(test: Callable[[httpx2.AsyncClient], Awaitable[Any]], **client_options: Any) -> Any:
    async def main() -> Any:
        async with httpx2.AsyncClient(transport=LeanTransport(client_options.pop("tls", ssl_context())),
                                      **client_options) as client:
            return await test(client)

    return asyncio.run(main())


# -- framing ---------------------------------------------------------------------------------------


def test_requests_share_one_kept_alive_connection_and_are_sent_as_given() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"one"), response(b"two"), response(b"three")) as server:
            first = await client.post(server.url + "/v1/chat?x=1", content=b'{"a": 1}',
                                      headers={"Content-Type": "application/json", "X-Test": "yes"})
            second = await client.get(server.url + "/v1/models")
            third = await client.post(server.url + "/v1/chat", content=b"")
            assert [first.text, second.text, third.text] == ["one", "two", "three"]
            assert server.connections == 1
            head = server.heads[0].decode()
            assert head.startswith("POST /v1/chat?x=1 HTTP/1.1\r\n")
            assert "x-test: yes" in head.lower() and "content-length: 8" in head.lower()
            assert f"host: {server.url.split('//')[1]}" in head.lower()
            assert server.bodies[0] == b'{"a": 1}'
            assert "content-length" not in server.heads[1].decode().lower()  # a GET without a body
            assert "content-length: 0" in server.heads[2].decode().lower()
            assert first.http_version == "HTTP/1.1" and first.reason_phrase == "OK"

    run(test)


def test_chunked_body_with_extensions_and_trailers_then_reuse() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;name=value\r\nWiki\r\n5\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\n")

    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(chunked, response(b"next")) as server:
            assert (await client.get(server.url)).text == "Wikipedia"
            assert (await client.get(server.url)).text == "next"
            assert server.connections == 1

    run(test)


def test_body_read_until_the_server_closes_is_not_reused() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(b"HTTP/1.1 200 OK\r\n\r\nall of it", response(b"next"), close_after=True) as server:
            assert (await client.get(server.url)).text == "all of it"
            assert (await client.get(server.url)).text == "next"
            assert server.connections == 2

    run(test)


def test_connection_close_is_honoured() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(headers="Connection: close\r\n"), response(b"next")) as server:
            await client.get(server.url)
            assert (await client.get(server.url)).text == "next"
            assert server.connections == 2

    run(test)


def test_informational_responses_are_skipped_and_empty_bodies_need_no_length() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        replies = (b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"after 100"),
                   b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n", response(b"last"))
        async with ScriptedServer(*replies) as server:
            assert (await client.get(server.url)).text == "after 100"
            no_content = await client.get(server.url)
            assert no_content.status_code == 204 and no_content.content == b""
            head = await client.head(server.url)
            assert head.content == b"" and head.headers["content-length"] == "13"
            assert (await client.get(server.url)).text == "last"
            assert server.connections == 1

    run(test)


def test_gzip_bodies_are_decoded_by_the_client() -> None:
    packed = gzip.compress(b"unpacked text")

    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(packed, headers="Content-Encoding: gzip\r\n")) as server:
            assert (await client.get(server.url)).text == "unpacked text"

    run(test)


# -- failures ------------------------------------------------------------------------------------------


def test_a_stale_kept_alive_connection_is_replaced_once() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"first"), DROP, response(b"on a new connection")) as server:
            await client.get(server.url)
            assert (await client.post(server.url, content=b"again")).text == "on a new connection"
            assert server.connections == 2 and server.bodies[1:] == [b"again", b"again"]

    run(test)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (DROP, "without a complete response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed the connection mid-body"),
        (b"SMTP ready\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x response"),
        (b"HTTP/1.1 099 Odd\r\n\r\n", "not an HTTP/1.x response"),
    ],
)
def test_broken_responses_on_a_fresh_connection_are_protocol_errors(reply: bytes, message: str) -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(reply, close_after=True) as server:
            with pytest.raises(httpx2.RemoteProtocolError, match=message):
                await client.get(server.url)
            assert server.connections == 1  # not retried by the transport: the SDK or endpoint decides

    run(test)


def test_refused_connection_is_a_connect_error() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer() as server:
            url = server.url
        with pytest.raises(httpx2.ConnectError, match="cannot connect"):
            await client.get(url)

    run(test)


def test_a_silent_server_is_a_read_timeout_and_the_connection_is_closed() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(SILENT, response(b"fresh")) as server:
            started = asyncio.get_running_loop().time()
            with pytest.raises(httpx2.ReadTimeout):
                await client.get(server.url)
            assert asyncio.get_running_loop().time() - started < 2
            assert (await client.get(server.url)).text == "fresh"
            assert server.connections == 2 and server.closed_by_client == 1

    run(test, timeout=httpx2.Timeout(0.2))


def test_a_cancelled_request_closes_its_connection() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(SILENT, response(b"fresh")) as server:
            task = asyncio.create_task(client.get(server.url))
            while not server.heads:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await client.get(server.url)).text == "fresh"
            assert server.connections == 2
            await asyncio.sleep(0.05)
            assert server.closed_by_client == 1

    run(test)


def test_a_body_closed_before_its_end_does_not_go_back_to_the_pool() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"x" * 200_000), response(b"fresh")) as server:
            async with client.stream("GET", server.url) as streamed:
                async for _ in streamed.aiter_raw():
                    break
            assert (await client.get(server.url)).text == "fresh"
            assert server.connections == 2

    run(test)


def test_a_closed_transport_refuses_requests() -> None:
    async def main() -> None:
        transport = LeanTransport(ssl_context())
        await transport.aclose()
        async with httpx2.AsyncClient(transport=transport) as client:
            with pytest.raises(RuntimeError, match="closed"):
                await client.get("http://127.0.0.1:9/")

    asyncio.run(main())


# -- TLS -------------------------------------------------------------------------------------------------


def test_https_with_a_trusted_certificate_and_refusal_of_an_untrusted_one() -> None:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
    trusting = ssl.create_default_context(cafile=str(TLS / "cert.pem"))

    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"secret"), response(b"again"), tls=served) as server:
            assert (await client.get(server.url)).text == "secret"
            assert (await client.get(server.url)).text == "again"
            assert server.connections == 1

    run(test, tls=trusting)

    async def untrusted(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"secret"), tls=served) as server:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(server.url)

    run(untrusted)


def test_an_http_1_0_response_keeps_its_connection_only_when_it_says_keep_alive() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        replies = (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nkep",
                   b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\none", response(b"new"))
        async with ScriptedServer(*replies) as server:
            first = await client.get(server.url)
            assert first.text == "kep" and first.http_version == "HTTP/1.0"
            assert (await client.get(server.url)).text == "one"
            assert server.connections == 1
            assert (await client.get(server.url)).text == "new"
            assert server.connections == 2

    run(test)


def test_a_kept_alive_connection_with_unasked_bytes_waiting_is_not_reused() -> None:
    # Some servers send "408" before closing a connection left idle: not the next request's answer.
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"first") + response(b"timed out", status="408 Request Timeout"),
                                  response(b"fresh")) as server:
            assert (await client.get(server.url)).text == "first"
            await asyncio.sleep(0.05)  # the extra bytes arrive while the connection is idle
            answer = await client.get(server.url)
            assert (answer.status_code, answer.text) == (200, "fresh")
            assert server.connections == 2

    run(test)


def test_a_stale_connection_is_replayed_once_at_most() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response(b"a"), response(b"b"), DROP, DROP) as server:
            await asyncio.gather(client.get(server.url), client.get(server.url))  # two pooled connections
            assert server.connections == 2
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.get(server.url)  # stale pooled one, then a new one that also drops
            assert server.connections == 3 and len(server.heads) == 4

    run(test)


def test_line_breaks_in_a_header_value_are_refused_before_sending() -> None:
    async def test(client: httpx2.AsyncClient) -> None:
        async with ScriptedServer(response()) as server:
            with pytest.raises(httpx2.LocalProtocolError, match="(?i)authorization"):
                await client.get(server.url, headers={"Authorization": "Bearer key\r\nX-Injected: 1"})
            assert server.connections == 0

    run(test)
