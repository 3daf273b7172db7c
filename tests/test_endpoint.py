"""The retry policy and error translation of JSONEndpoint, on the async path the engine uses
and the blocking one, over real HTTP to the fake server."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from rlm.errors import ClientError, EndpointUnreachable, MalformedResponse
from rlm.testing import FakeOpenAIServer, FakeReply
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
def test_a_timeout_is_retried_then_reported(server, asynchronous):
    server.fail_next(FakeReply(content="late", delay=1.0), FakeReply(content="late", delay=1.0))
    with pytest.raises(EndpointUnreachable, match="did not answer in time"):
        ask(server, asynchronous=asynchronous, max_retries=1, timeout=0.2)
    assert len(server.chat_requests()) == 2


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
