"""Model specs `provider:model` resolved to clients, and the native Anthropic client against the fake server."""

from __future__ import annotations

import asyncio
import sys

import pytest

from helpers import repl
from rlm.errors import ClientError, ConfigError
from rlm.providers import PROVIDERS, resolve_client, split_spec
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.usage import Usage, price_call
from rlm.utils.anthropic_client import AnthropicClient
from rlm.utils.llm import DEFAULT_API_URL

OPENAI_STYLE = sorted(name for name, provider in PROVIDERS.items() if provider.client == "openai")
NEEDS_KEY = sorted(name for name, provider in PROVIDERS.items() if provider.key_required)
CLAUDE = "claude-haiku-4-5"  # a current model: the SDK warns about deprecated ones (and warnings are errors)
CACHE = {"type": "ephemeral"}


@pytest.fixture(autouse=True)
def _clean_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in {p.key_env for p in PROVIDERS.values() if p.key_env} | {"RLM_API_KEY", "RLM_API_URL"}:
        monkeypatch.delenv(variable, raising=False)


def _with_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, provider in PROVIDERS.items():
        if provider.key_env:
            monkeypatch.setenv(provider.key_env, f"key-for-{name}")


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


# -- specs and presets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("openai:gpt-5-mini", ("openai", "gpt-5-mini")),
        ("OpenRouter:meta-llama/llama-3-8b:free", ("openrouter", "meta-llama/llama-3-8b:free")),
        ("ollama:", ("ollama", "auto")),
        ("llama3:8b", (None, "llama3:8b")),  # not a provider: a model name with a tag
        ("auto", (None, "auto")),
        ("my-model", (None, "my-model")),
    ],
)
def test_split_spec(spec: str, expected: tuple) -> None:
    assert split_spec(spec) == expected


@pytest.mark.parametrize("name", OPENAI_STYLE)
def test_each_preset_resolves_to_its_base_url_and_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_keys(monkeypatch)
    client = resolve_client(f"{name}:some-model")
    assert client.base_url == PROVIDERS[name].base_url.rstrip("/")
    assert client.model == "some-model"
    client.close()


@pytest.mark.parametrize("name", OPENAI_STYLE)
def test_each_preset_sends_its_own_key_and_no_other(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _with_keys(monkeypatch)
    monkeypatch.setenv("RLM_API_KEY", "generic-key")  # for plain model names only
    with FakeOpenAIServer(responder=lambda request: "hello") as server:
        client = resolve_client(f"{name}:m", api_url=server.url)  # the URL is overridden, the key is not
        assert client.base_url == server.url
        assert client.complete([{"role": "user", "content": "hi"}]).text == "hello"
        client.close()
        sent = _lower(server.request_headers[-1])["authorization"]
        model = server.chat_requests()[-1]["model"]
    key_env = PROVIDERS[name].key_env
    assert sent == (f"Bearer key-for-{name}" if key_env else "Bearer not-needed")
    assert model == "m"


@pytest.mark.parametrize("name", NEEDS_KEY)
def test_a_missing_required_key_is_a_config_error_naming_the_variable(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_client(f"{name}:some-model")
    assert PROVIDERS[name].key_env in str(caught.value) and "api_key" in str(caught.value)


def test_an_explicit_key_is_enough_for_a_provider() -> None:
    client = resolve_client("openai:gpt-4o-mini", api_key="sk-given")
    assert client.base_url == "https://api.openai.com/v1"
    client.close()


def test_a_name_without_a_known_provider_goes_to_the_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    client = resolve_client("llama3:8b")
    assert (client.base_url, client.model) == (DEFAULT_API_URL, "llama3:8b")
    client.close()
    monkeypatch.setenv("RLM_API_URL", "http://127.0.0.1:9999/v1")
    client = resolve_client("llama3:8b")
    assert (client.base_url, client.model) == ("http://127.0.0.1:9999/v1", "llama3:8b")
    client.close()
    client = resolve_client("llama3:8b", api_url="http://10.1.2.3:8000/v1")  # the argument wins
    assert client.base_url == "http://10.1.2.3:8000/v1"
    client.close()


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_an_empty_spec_is_a_config_error(spec: object) -> None:
    with pytest.raises(ConfigError):
        resolve_client(spec)  # type: ignore[arg-type]


def test_root_and_sub_models_take_providers_independently() -> None:
    with RLM_REPL(model="vllm:big-model", recursive_model="ollama:small-model") as rlm:
        assert (rlm.client.base_url, rlm.client.model) == ("http://localhost:8000/v1", "big-model")
        assert (rlm.sub_client.base_url, rlm.sub_client.model) == ("http://localhost:11434/v1", "small-model")


# -- anthropic ---------------------------------------------------------------------------------


def test_anthropic_without_its_key_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_client(f"anthropic:{CLAUDE}")
    assert "ANTHROPIC_API_KEY" in str(caught.value)


def test_anthropic_needs_a_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    with pytest.raises(ConfigError) as caught:
        resolve_client("anthropic:auto")
    assert "anthropic:claude-" in str(caught.value)


def test_anthropic_without_the_sdk_says_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import anthropic` raise ImportError, as when it is not installed.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.setitem(sys.modules, "anthropic", None)
    monkeypatch.delitem(sys.modules, "rlm.utils.anthropic_client")
    with pytest.raises(ConfigError) as caught:
        resolve_client(f"anthropic:{CLAUDE}")
    assert "pip install 'rlm[anthropic]'" in str(caught.value)


def test_an_anthropic_spec_resolves_to_the_native_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    client = resolve_client(f"anthropic:{CLAUDE}")
    assert isinstance(client, AnthropicClient)
    assert (client.base_url, client.model) == ("https://api.anthropic.com", CLAUDE)
    client.close()


CONVERSATION = [
    {"role": "system", "content": "the system prompt"},
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": ""},
    {"role": "user", "content": "newest"},
]
CACHED_USAGE = {"input_tokens": 1000, "output_tokens": 3000, "cache_read_input_tokens": 100_000,
                "cache_creation_input_tokens": 20_000}


def test_the_anthropic_client_marks_the_stable_prefix_and_maps_cache_usage() -> None:
    with FakeOpenAIServer(responder=lambda request: FakeReply("the reply", anthropic_usage=CACHED_USAGE)) as server:
        client = AnthropicClient(CLAUDE, api_url=server.root_url, api_key="secret-key")
        completion = client.complete(CONVERSATION)
        client.close()
        request = server.chat_requests()[0]
        headers = _lower(server.request_headers[-1])
        free = price_call(CLAUDE, server.root_url, completion.usage)
    assert request["system"] == [{"type": "text", "text": "the system prompt", "cache_control": CACHE}]
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert request["messages"][-1]["content"] == [{"type": "text", "text": "newest", "cache_control": CACHE}]
    assert all("cache_control" not in block for m in request["messages"][:-1] for block in m["content"])
    assert request["messages"][1]["content"][0]["text"]  # an empty turn is not sent empty
    assert request["model"] == CLAUDE and request["max_tokens"] > 0
    assert "secret-key" in headers.get("x-api-key", "") + headers.get("authorization", "")

    assert completion.text == "the reply" and completion.finish_reason == "end_turn"
    assert completion.usage == Usage(input_tokens=121_000, output_tokens=3000, cached_tokens=100_000,
                                     cache_write_tokens=20_000)
    # Priced as if it came from api.anthropic.com (the fake server is on loopback, which is free):
    # claude-haiku-4-5 is $1/M input, $0.10/M cache read, $1.25/M cache write, $5/M output.
    expected = (1000 * 1 + 100_000 * 0.10 + 20_000 * 1.25 + 3000 * 5) / 1e6
    assert price_call(CLAUDE, "https://api.anthropic.com", completion.usage) == pytest.approx(expected)
    assert free == 0.0


def test_the_async_anthropic_client_and_its_errors() -> None:
    replies = [FakeReply("async reply"), FakeReply("too long", status=400), FakeReply(None)]
    with FakeOpenAIServer(responder=lambda request: replies.pop(0)) as server:
        client = AnthropicClient(CLAUDE, api_url=server.root_url, api_key="k", max_retries=0)

        async def three() -> tuple:
            first = await client.acomplete([{"role": "user", "content": "hi"}], max_tokens=50)
            with pytest.raises(ClientError) as caught:
                await client.acomplete([{"role": "user", "content": "x" * 100}])
            empty = await client.acomplete([{"role": "user", "content": "hi"}])
            await client.aclose()
            return first, caught.value, empty

        first, error, empty = asyncio.run(three())
        client.close()
        sent = server.chat_requests()
    assert first.text == "async reply" and not first.usage.estimated
    assert sent[0]["max_tokens"] == 50 and "system" not in sent[0]
    assert error.status == 400 and error.is_request_error and "too long" in str(error)
    assert empty.text == "" and empty.content_missing


def test_an_rlm_run_with_anthropic_root_and_sub_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    root = [FakeReply(repl("print(llm_query('a sub question'))"), anthropic_usage=CACHED_USAGE),
            FakeReply("FINAL(done)", anthropic_usage=CACHED_USAGE)]
    with FakeOpenAIServer(root=root, sub=["sub reply"]) as server:
        with RLM_REPL(f"anthropic:{CLAUDE}", f"anthropic:{CLAUDE}", api_url=server.root_url,
                      sandbox="inprocess") as rlm:
            assert rlm.completion(context="c", query="q") == "done"
        roots, subs = server.chat_requests(root=True), server.chat_requests(root=False)
    assert len(roots) == 2 and len(subs) == 1
    assert subs[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "a sub question", "cache_control": CACHE}]}]
    second = roots[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert "sub reply" in second[-1]["content"][0]["text"] and "cache_control" in second[-1]["content"][0]
    assert roots[0]["messages"][0] == {**second[0], "content": [
        {k: v for k, v in second[0]["content"][0].items() if k != "cache_control"} | {"cache_control": CACHE}]}
    summary = rlm.cost_summary()
    assert summary["root"]["cached_tokens"] == 200_000 and summary["root"]["cache_write_tokens"] == 40_000
    assert summary["root"]["input_tokens"] == 2 * 121_000 and summary["sub"]["calls"] == 1
    assert summary["total_cost"] == 0.0  # the fake server is on loopback
