"""The OpenAI-compatible client over real HTTP to a fake server on 127.0.0.1, and usage/prices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlm.errors import ClientError, ConfigError, EndpointUnreachable, MalformedResponse, RLMError
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.usage import CallRecord, Usage, UsageLedger, is_local_endpoint, price_call
from rlm.utils.llm import DEFAULT_API_URL, OpenAICompatibleClient, resolve_api_url

MESSAGES = [{"role": "user", "content": "What is 6 x 7?"}]
FAST_RETRY = {"retry-after-ms": "10"}  # the SDK honours it: retries in 10 ms instead of ~0.5 s


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RLM_API_URL", "RLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer(responder=lambda request: "forty-two", models=["first-model", "second-model"]) as fake:
        yield fake


def client_for(server: FakeOpenAIServer, model: str = "auto", **kwargs) -> OpenAICompatibleClient:
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 5.0)
    return OpenAICompatibleClient(model, api_url=server.url, **kwargs)


def header(headers: dict[str, str], name: str) -> str | None:
    return {key.lower(): value for key, value in headers.items()}.get(name.lower())


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- configuration -------------------------------------------------------------------------------


def test_auto_model_is_the_first_listed(server):
    client = client_for(server)
    assert client.model == "first-model"
    completion = client.complete(MESSAGES)
    assert completion.text == "forty-two"
    assert server.requests[-1]["model"] == "first-model"
    assert server.requests[-1]["messages"] == MESSAGES


def test_named_model_is_sent_as_is_without_listing(server):
    client = client_for(server, model="my-model")
    client.complete(MESSAGES)
    assert server.requests[-1]["model"] == "my-model"
    assert len(server.request_headers) == 1  # no GET /models


def test_api_url_is_read_from_the_environment_at_call_time(server, monkeypatch):
    monkeypatch.setenv("RLM_API_URL", server.url + "/")
    client = OpenAICompatibleClient(max_retries=0)
    assert client.base_url == server.url
    assert client.complete(MESSAGES).text == "forty-two"


def test_api_url_defaults_to_localhost_8080():
    assert DEFAULT_API_URL == "http://localhost:8080/v1"
    assert resolve_api_url() == DEFAULT_API_URL
    assert OpenAICompatibleClient(model="m").base_url == DEFAULT_API_URL


def test_api_url_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RLM_API_URL", "http://from-env:1/v1")
    assert resolve_api_url("http://from-arg:2/v1") == "http://from-arg:2/v1"
    assert resolve_api_url() == "http://from-env:1/v1"


def test_api_url_without_a_scheme_is_a_config_error(monkeypatch):
    monkeypatch.setenv("RLM_API_URL", "localhost:8080/v1")
    with pytest.raises(ConfigError, match="RLM_API_URL"):
        OpenAICompatibleClient(model="m")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RLM_API_KEY": "sk-rlm"}, "sk-rlm"),
        ({"OPENAI_API_KEY": "sk-openai"}, "sk-openai"),
        ({"RLM_API_KEY": "sk-rlm", "OPENAI_API_KEY": "sk-openai"}, "sk-rlm"),
    ],
)
def test_api_key_from_the_environment_is_sent_as_bearer(server, monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = client_for(server)
    client.complete(MESSAGES)
    assert len(server.request_headers) == 2  # GET /models and the chat request
    for headers in server.request_headers:
        assert header(headers, "Authorization") == f"Bearer {expected}"


def test_api_key_argument_wins(server, monkeypatch):
    monkeypatch.setenv("RLM_API_KEY", "sk-env")
    client_for(server, model="m", api_key="sk-arg").complete(MESSAGES)
    assert header(server.request_headers[-1], "Authorization") == "Bearer sk-arg"


def test_request_options_are_sent(server):
    client_for(server, model="m", temperature=0.25).complete(MESSAGES, max_tokens=17)
    request = server.requests[-1]
    assert request["temperature"] == 0.25 and request["max_tokens"] == 17


# -- replies ---------------------------------------------------------------------------------------


def test_usage_is_parsed_including_cached_tokens(server):
    usage = {
        "prompt_tokens": 120,
        "completion_tokens": 7,
        "total_tokens": 127,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    server.fail_next(FakeReply(content="hi", usage=usage, finish_reason="length"))
    completion = client_for(server, model="m").complete(MESSAGES)
    assert completion.usage == Usage(input_tokens=120, output_tokens=7, cached_tokens=100, estimated=False)
    assert completion.finish_reason == "length"
    assert completion.model == "m"
    assert completion.latency > 0


def test_usage_without_details_has_no_cached_tokens(server):
    server.fail_next(FakeReply(content="hi", usage={"prompt_tokens": 5, "completion_tokens": 1}))
    assert client_for(server, model="m").complete(MESSAGES).usage == Usage(input_tokens=5, output_tokens=1)


def test_missing_usage_is_estimated_and_marked(server):
    server.fail_next(FakeReply(content="x" * 40, usage=None))
    usage = client_for(server, model="m").complete(MESSAGES).usage
    assert usage.estimated is True
    assert usage.output_tokens == 10
    assert usage.input_tokens == (len(MESSAGES[0]["content"]) + 3) // 4


def test_null_content_gives_empty_text_and_is_marked(server):
    server.fail_next(FakeReply(content=None))
    completion = client_for(server, model="m").complete(MESSAGES)
    assert completion.text == ""
    assert completion.content_missing is True
    assert client_for(server, model="m").complete(MESSAGES).content_missing is False


def test_reasoning_content_is_kept_apart(server):
    body = {
        "id": "c",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "reasoning_content": "hmm"}}],
    }
    server.fail_next(FakeReply(raw=json.dumps(body).encode()))
    completion = client_for(server, model="m").complete(MESSAGES)
    assert (completion.text, completion.reasoning, completion.content_missing) == ("", "hmm", True)


def test_context_window_is_read_from_models():
    with FakeOpenAIServer(responder=lambda request: "ok", models=["big"], context_window=32_768) as fake:
        assert client_for(fake).context_window() == 32_768
        assert client_for(fake, model="not-listed").context_window() is None


def test_context_window_is_none_when_the_server_does_not_say(server):
    assert client_for(server).context_window() is None


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "m", "max_model_len": 8192},  # vLLM
        {"id": "m", "meta": {"n_ctx": 8192}},  # llama.cpp style, under "meta"
        {"id": "m", "context_length": 8192},  # OpenRouter
    ],
)
def test_context_window_under_the_names_servers_use(entry):
    listing = json.dumps({"object": "list", "data": [entry]}).encode()
    with FakeOpenAIServer(responder=lambda request: "ok", models_reply=FakeReply(raw=listing)) as fake:
        assert client_for(fake).context_window() == 8192


def test_context_window_is_none_when_models_fails():
    with FakeOpenAIServer(responder=lambda request: "ok", models_reply=FakeReply(status=404)) as fake:
        assert client_for(fake, model="m").context_window() is None


def test_list_models(server):
    assert [entry["id"] for entry in client_for(server).list_models()] == ["first-model", "second-model"]


# -- faults ----------------------------------------------------------------------------------------


def test_connection_refused_is_endpoint_unreachable_naming_the_url():
    url = closed_port_url()
    client = OpenAICompatibleClient("m", api_url=url, max_retries=0, timeout=2.0)
    with pytest.raises(EndpointUnreachable) as caught:
        client.complete(MESSAGES)
    assert url in str(caught.value) and "RLM_API_URL" in str(caught.value)
    assert caught.value.url == url and caught.value.status is None


def test_connection_refused_while_resolving_auto():
    url = closed_port_url()
    with pytest.raises(EndpointUnreachable, match=url):
        _ = OpenAICompatibleClient(api_url=url, max_retries=0, timeout=2.0).model


def test_server_error_then_success_is_retried(server):
    server.fail_next(FakeReply(status=500, headers=FAST_RETRY), FakeReply(status=503, headers=FAST_RETRY))
    completion = client_for(server, model="m", max_retries=2).complete(MESSAGES)
    assert completion.text == "forty-two"
    assert len(server.requests) == 3


def test_server_error_forever_is_a_client_error_with_the_status():
    def always_failing(request: dict) -> FakeReply:
        return FakeReply(status=500, content="model crashed", headers=FAST_RETRY)

    with FakeOpenAIServer(responder=always_failing) as fake:
        with pytest.raises(ClientError) as caught:
            client_for(fake, model="m", max_retries=2).complete(MESSAGES)
        assert len(fake.requests) == 3
        url = fake.url
    error = caught.value
    assert type(error) is ClientError
    assert error.status == 500 and "model crashed" in error.body
    assert "500" in str(error) and url in str(error)


@pytest.mark.parametrize("retry_after", ["0", "0.05"])
def test_rate_limit_with_retry_after_is_retried(server, retry_after):
    server.fail_next(FakeReply(status=429, headers={"Retry-After": retry_after}))
    started = time.monotonic()
    assert client_for(server, model="m", max_retries=1).complete(MESSAGES).text == "forty-two"
    assert time.monotonic() - started < 2
    assert len(server.requests) == 2


def test_timeout_is_endpoint_unreachable(server):
    server.fail_next(FakeReply(content="too late", delay=3.0))
    client = client_for(server, model="m", timeout=0.3)
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable, match="did not answer in time") as caught:
        client.complete(MESSAGES)
    assert time.monotonic() - started < 2
    assert server.url in str(caught.value)


def test_malformed_json_body_is_malformed_response(server):
    server.fail_next(FakeReply(raw=b"<html>this is not JSON</html>"))
    with pytest.raises(MalformedResponse, match="not JSON") as caught:
        client_for(server, model="m").complete(MESSAGES)
    assert caught.value.url == server.url and "<html>" in caught.value.body


@pytest.mark.parametrize(
    "body",
    [b'{"id": "x", "object": "chat.completion"}', b'{"choices": []}', b'{"choices": [{"index": 0}]}', b"[1, 2]"],
)
def test_json_without_choices_is_malformed_response(server, body):
    server.fail_next(FakeReply(raw=body))
    with pytest.raises(MalformedResponse, match="choices"):
        client_for(server, model="m").complete(MESSAGES)


@pytest.mark.parametrize("body", [b"garbage", b'{"data": 5}', b'{"data": [{"name": "no id"}]}', b"null"])
def test_models_returning_garbage_is_malformed_response(body):
    with FakeOpenAIServer(responder=lambda request: "ok", models_reply=FakeReply(raw=body)) as fake:
        client = client_for(fake)
        with pytest.raises(MalformedResponse) as caught:
            client.list_models()
        assert fake.url in str(caught.value) and "/v1" in str(caught.value)
        with pytest.raises(MalformedResponse):
            _ = client.model


def test_auto_with_an_empty_model_list_says_how_to_name_one():
    empty = FakeReply(raw=b'{"object": "list", "data": []}')
    with FakeOpenAIServer(responder=lambda request: "ok", models_reply=empty) as fake:
        with pytest.raises(ClientError, match="model="):
            _ = client_for(fake).model


@pytest.mark.parametrize("status", [401, 403])
def test_unauthorized_says_to_set_the_key(server, status):
    server.fail_next(FakeReply(status=status, content="invalid api key"))
    with pytest.raises(ClientError) as caught:
        client_for(server, model="m", max_retries=2).complete(MESSAGES)
    assert caught.value.status == status
    assert "RLM_API_KEY" in str(caught.value) and "OPENAI_API_KEY" in str(caught.value)
    assert "invalid api key" in str(caught.value)
    assert len(server.requests) == 1  # not retried


def test_client_errors_are_rlm_errors():
    assert issubclass(EndpointUnreachable, ClientError) and issubclass(MalformedResponse, ClientError)
    assert issubclass(ClientError, RLMError)


def test_concurrent_calls_each_get_their_own_usage(server):
    def responder(request: dict) -> FakeReply:
        text = request["messages"][0]["content"]
        return FakeReply(content=text, usage={"prompt_tokens": len(text), "completion_tokens": len(text)})

    with FakeOpenAIServer(responder=responder) as fake:
        client = client_for(fake, model="m")
        results: dict[int, Usage] = {}

        def call(n: int) -> None:
            results[n] = client.complete([{"role": "user", "content": "x" * n}]).usage

        threads = [threading.Thread(target=call, args=(n,)) for n in range(1, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert {n: (u.input_tokens, u.output_tokens) for n, u in results.items()} == {n: (n, n) for n in range(1, 9)}


# -- usage and prices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/v1",
        "http://127.0.0.1:11434/v1",
        "http://127.5.5.5/v1",
        "http://[::1]:8000/v1",
        "http://10.0.0.5:8000/v1",
        "http://172.16.3.4/v1",
        "http://192.168.1.20:8080/v1",
        "http://169.254.1.1/v1",
        "http://gpu-box.local:8080/v1",
        "http://host.docker.internal:8080/v1",
    ],
)
def test_loopback_and_private_endpoints_are_local(url):
    assert is_local_endpoint(url) is True


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "https://openrouter.ai/api/v1",
        "http://8.8.8.8/v1",
        "http://[2001:4860:4860::8888]/v1",
        "http://172.32.0.1/v1",
        "not a url",
    ],
)
def test_public_endpoints_are_not_local(url):
    assert is_local_endpoint(url) is False


def test_price_is_zero_on_a_local_server_even_for_a_known_model():
    assert price_call("gpt-4o-mini", "http://127.0.0.1:8080/v1", Usage(input_tokens=10**6, output_tokens=10**6)) == 0.0


def test_price_of_a_hosted_model_is_a_positive_float():
    price = price_call("gpt-4o-mini", "https://api.openai.com/v1", Usage(input_tokens=10**6, output_tokens=10**6))
    assert isinstance(price, float) and price > 0


def test_cached_tokens_make_a_call_cheaper():
    full = price_call("gpt-4o-mini", "https://api.openai.com/v1", Usage(input_tokens=10**6))
    cached = price_call("gpt-4o-mini", "https://api.openai.com/v1", Usage(input_tokens=10**6, cached_tokens=5 * 10**5))
    assert 0 < cached < full


def test_unknown_model_on_a_public_url_has_no_price():
    assert price_call("no-such-model-xyz-123", "https://api.example.com/v1", Usage(input_tokens=100)) is None


def test_prices_come_from_the_bundled_snapshot_without_network():
    # A fresh interpreter where every attempt to open a connection fails loudly.
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network used")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from rlm.usage import Usage, price_call

        print(price_call("gpt-4o-mini", "https://api.openai.com/v1", Usage(input_tokens=1000, output_tokens=1000)))
        print(price_call("no-such-model-xyz-123", "https://api.example.com/v1", Usage(input_tokens=1)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    priced, unknown = done.stdout.split()
    assert float(priced) > 0 and unknown == "None"
    assert "network used" not in done.stderr


def test_ledger_sums_per_role_and_lists_unpriced_models():
    ledger = UsageLedger()
    ledger.add(CallRecord(role="root", depth=0, model="gpt-4o-mini", usage=Usage(100, 10, 50), cost=0.25))
    ledger.add(CallRecord(role="root", depth=0, model="gpt-4o-mini", usage=Usage(200, 20), cost=0.5))
    ledger.add(CallRecord(role="sub", depth=1, model="mystery", usage=Usage(7, 3, estimated=True), cost=None))
    ledger.add(CallRecord(role="sub", depth=1, model="local", usage=Usage(1, 1), cost=0.0))
    summary = ledger.summary()
    assert summary["total_cost"] == pytest.approx(0.75) and isinstance(summary["total_cost"], float)
    assert summary["root"] == {
        "models": ["gpt-4o-mini"],
        "calls": 2,
        "input_tokens": 300,
        "output_tokens": 30,
        "cached_tokens": 50,
        "cache_write_tokens": 0,
        "cache_hits": 0,
        "cost": pytest.approx(0.75),
    }
    assert summary["sub"]["calls"] == 2 and summary["sub"]["models"] == ["local", "mystery"]
    assert (summary["sub"]["input_tokens"], summary["sub"]["output_tokens"]) == (8, 4)
    assert summary["sub"]["cost"] == 0.0
    assert summary["unpriced_models"] == ["mystery"] and summary["cost_complete"] is False
    assert summary["usage_estimated"] is True
    assert (summary["total_calls"], summary["total_input_tokens"], summary["total_output_tokens"]) == (4, 308, 34)
    ledger.clear()
    assert ledger.summary()["total_calls"] == 0


def test_empty_ledger_costs_a_float_zero():
    summary = UsageLedger().summary()
    assert summary["total_cost"] == 0.0 and isinstance(summary["total_cost"], float)
    assert summary["root"]["calls"] == summary["sub"]["calls"] == 0
    assert summary["unpriced_models"] == [] and summary["cost_complete"] is True


def test_ledger_counts_every_call_from_many_threads():
    ledger = UsageLedger()

    def add_many() -> None:
        for _ in range(500):
            ledger.add(CallRecord(role="sub", depth=1, model="m", usage=Usage(1, 2), cost=0.001))

    threads = [threading.Thread(target=add_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary = ledger.summary()
    assert summary["sub"]["calls"] == 4000 and summary["sub"]["output_tokens"] == 8000
    assert summary["total_cost"] == pytest.approx(4.0)


def test_usage_adds_up():
    total = Usage(1, 2, 3) + Usage(10, 20, 30, estimated=True)
    assert total == Usage(11, 22, 33, estimated=True)
