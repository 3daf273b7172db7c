"""The retry policy and error translation of JSONEndpoint, on the async path the engine uses
and the blocking one, over real HTTP to the fake server."""

from __future__ import annotations

import asyncio
import email.utils
import threading
import time

import pytest

from rlm.errors import ClientError, ConfigError, EndpointUnreachable, MalformedResponse
from rlm.testing import FakeOpenAIServer, FakeReply
from scripted_http import ScriptedServer, response
from rlm.utils.llm import OpenAICompatibleClient

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server():
    with FakeOpenAIServer(responder=lambda request: "fine") as fake:
        yield fake


def ask(server: FakeOpenAIServer, *, asynchronous: bool, **options) -> str:
    options.setdefault("timeout", 5.0)
    client = OpenAICompatibleClient("m", api_url=server.url, **options)
    try:
        if not asynchronous:
            return client.complete(MESSAGES).text

        async def main() -> str:
            try:
                return (await client.acomplete(MESSAGES)).text
            finally:
                await client.aclose()

        return asyncio.run(main())
    finally:
        client.close()


both_paths = pytest.mark.parametrize("asynchronous", [False, True], ids=["blocking", "async"])


@both_paths
@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_retried_statuses_then_success(server, asynchronous, status):
    server.fail_next(FakeReply(status=status, headers={"Retry-After": "0"}))
    assert ask(server, asynchronous=asynchronous, max_retries=1) == "fine"
    assert len(server.chat_requests()) == 2


@both_paths
@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_client_errors_are_not_retried(server, asynchronous, status):
    server.fail_next(FakeReply(status=status, content="no such thing"))
    with pytest.raises(ClientError) as caught:
        ask(server, asynchronous=asynchronous, max_retries=3)
    assert caught.value.status == status and "no such thing" in str(caught.value)
    assert len(server.chat_requests()) == 1


@both_paths
def test_attempts_are_max_retries_plus_one_and_the_last_status_is_raised(server, asynchronous):
    server.fail_next(*[FakeReply(status=503, content=f"busy {n}", headers={"retry-after-ms": "1"}) for n in range(3)])
    with pytest.raises(ClientError, match="HTTP 503: busy 2") as caught:
        ask(server, asynchronous=asynchronous, max_retries=2)
    assert caught.value.status == 503 and len(server.chat_requests()) == 3


@both_paths
def test_retry_after_as_an_http_date(server, asynchronous):
    soon = email.utils.formatdate(time.time() + 1, usegmt=True)  # whole seconds: waits at most ~1 s
    server.fail_next(FakeReply(status=429, headers={"Retry-After": soon}))
    started = time.monotonic()
    assert ask(server, asynchronous=asynchronous, max_retries=1) == "fine"
    assert time.monotonic() - started < 2.5


@both_paths
@pytest.mark.parametrize("told", ["soon", "3600", "-5"])
def test_an_unreadable_or_unreasonable_retry_after_falls_back_to_backoff(server, asynchronous, told):
    server.fail_next(FakeReply(status=429, headers={"Retry-After": told}))
    started = time.monotonic()
    assert ask(server, asynchronous=asynchronous, max_retries=1) == "fine"
    assert 0.3 < time.monotonic() - started < 2  # the first backoff: 0.375-0.5 s


@both_paths
def test_a_timeout_is_retried_in_what_remains_of_twice_the_timeout_then_reported(server, asynchronous):
    server.fail_next(*[FakeReply(content="late", delay=3.0)] * 4)
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable, match="did not answer in time"):
        ask(server, asynchronous=asynchronous, max_retries=3, timeout=1.0)
    assert time.monotonic() - started <= 2.0
    assert len(server.chat_requests()) == 2  # 1 s, a wait of ~0.5 s, then what remains


@both_paths
def test_no_retry_is_made_when_its_wait_would_pass_the_deadline(server, asynchronous):
    server.fail_next(FakeReply(content="late", delay=1.0))
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable, match="did not answer in time"):
        ask(server, asynchronous=asynchronous, max_retries=3, timeout=0.2)  # the first wait is >= 0.375 s
    assert time.monotonic() - started <= 0.4
    assert len(server.chat_requests()) == 1


@both_paths
def test_a_retry_after_past_the_deadline_gives_up_at_once_with_the_status(server, asynchronous):
    server.fail_next(FakeReply(status=429, headers={"Retry-After": "2"}))
    started = time.monotonic()
    with pytest.raises(ClientError, match="HTTP 429"):
        ask(server, asynchronous=asynchronous, max_retries=3, timeout=1.0)
    assert time.monotonic() - started < 0.5
    assert len(server.chat_requests()) == 1


@both_paths
def test_a_body_that_is_not_json(server, asynchronous):
    server.fail_next(FakeReply(raw=b"<html>proxy login</html>"))
    with pytest.raises(MalformedResponse, match="not JSON") as caught:
        ask(server, asynchronous=asynchronous, max_retries=0)
    assert "proxy login" in caught.value.body


def test_requests_say_who_sends_them(server):
    ask(server, asynchronous=True, max_retries=0)
    headers = {key.lower(): value for key, value in server.request_headers[-1].items()}
    assert headers["user-agent"].startswith("rlm/") and headers["content-type"] == "application/json"


@both_paths
def test_retry_after_as_an_asctime_date_is_utc(server, asynchronous):
    moment = time.gmtime(time.time() + 1)
    server.fail_next(FakeReply(status=503, headers={"Retry-After": time.strftime("%a %b %d %H:%M:%S %Y", moment)}))
    started = time.monotonic()
    assert ask(server, asynchronous=asynchronous, max_retries=1) == "fine"
    assert time.monotonic() - started < 2.5  # read as local time it could be hours, and backoff would be used


@both_paths
def test_a_body_that_cannot_be_decoded_is_malformed_not_retried(server, asynchronous):
    server.fail_next(FakeReply(raw=b"not gzip at all", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(MalformedResponse, match="cannot be decoded"):
        ask(server, asynchronous=asynchronous, max_retries=2)
    assert len(server.chat_requests()) == 1


@both_paths
def test_redirects_are_followed(server, asynchronous):
    server.fail_next(FakeReply(status=308, headers={"Location": server.url + "/chat/completions"}))
    assert ask(server, asynchronous=asynchronous, max_retries=0) == "fine"
    assert len(server.chat_requests()) == 2


@both_paths
def test_a_key_with_a_line_break_is_a_config_error(server, asynchronous):
    with pytest.raises(ConfigError, match="API key"):
        ask(server, asynchronous=asynchronous, max_retries=2, api_key="sk-from-a-file\r\n")
    assert server.chat_requests() == []


def test_clients_of_two_threads_keep_their_own_connections(server):
    client = OpenAICompatibleClient("m", api_url=server.url, max_retries=0, timeout=5.0)
    answers: list[str] = []

    async def three() -> None:
        for _ in range(3):
            answers.append((await client.acomplete(MESSAGES)).text)
            await asyncio.sleep(0.01)
        await client.aclose()

    threads = [threading.Thread(target=asyncio.run, args=(three(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    client.close()
    assert answers == ["fine"] * 6


def test_requests_through_a_proxy_when_the_environment_names_one(monkeypatch):
    reply = b'{"choices": [{"message": {"role": "assistant", "content": "via proxy"}}]}'
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def main() -> None:
        async with ScriptedServer(response(reply)) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            client = OpenAICompatibleClient("m", api_url="http://models.example/v1", max_retries=0, timeout=5.0)
            assert (await client.acomplete(MESSAGES)).text == "via proxy"
            await client.aclose()
            client.close()
            assert proxy.heads[0].startswith(b"POST http://models.example/v1/chat/completions HTTP/1.1")

    asyncio.run(main())


def test_no_proxy_with_a_leading_dot_covers_the_subdomains(monkeypatch):
    # httpx2 reads the proxy variables: requests to an excluded host go straight there.
    async def main() -> None:
        async with ScriptedServer(response(b"{}")) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", ".example.invalid")
            client = OpenAICompatibleClient("m", api_url="http://models.example.invalid/v1", max_retries=0, timeout=5.0)
            with pytest.raises(EndpointUnreachable):
                await client.acomplete(MESSAGES)
            await client.aclose()
            assert proxy.heads == []

    for name in ("no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    asyncio.run(main())
