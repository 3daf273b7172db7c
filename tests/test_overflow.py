"""A server's "too long for the context window" is ContextWindowExceeded, whatever its wording;
and a refused connection to this machine is reported at once, not retried."""

from __future__ import annotations

import json
import socket

import pytest

from rlm.errors import ClientError, ContextWindowExceeded, EndpointUnreachable
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.utils import retry
from rlm.utils.anthropic_client import AnthropicClient
from rlm.utils.endpoint import status_error
from rlm.utils.llm import OpenAICompatibleClient
from rlm.utils.overflow import PATTERNS

URL = "http://127.0.0.1:8080/v1"
MESSAGES = [{"role": "user", "content": "hello " * 200}]


def error_json(message: str, **fields: object) -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", **fields}})


# (server, status, body, window, request tokens) as servers send them
REFUSALS = [
    ("llama.cpp", 400, json.dumps({"error": {"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 8300,
     "n_ctx": 8192, "message": "request (8300 tokens) exceeds the available context size (8192 tokens), try "
     "increasing it"}}), 8192, 8300),
    ("llama.cpp, older", 400, error_json("the request exceeds the available context size, try increasing it"),
     None, None),
    ("OpenAI", 400, error_json("This model's maximum context length is 128000 tokens. However, your messages resulted "
     "in 130532 tokens. Please reduce the length of the messages.", code="context_length_exceeded"), 128000, 130532),
    ("OpenAI, newer", 400, error_json("Your input exceeds the context window of this model. Please adjust your input "
     "and try again.", code="context_length_exceeded"), None, None),
    ("vLLM", 400, json.dumps({"object": "error", "message": "This model's maximum context length is 4096 tokens. "
     "However, you requested 5000 tokens (4000 in the messages, 1000 in the completion).", "code": 400}), 4096, 5000),
    ("vLLM, newer", 400, error_json("'max_tokens' or 'max_completion_tokens' is too large: 1000. This model's maximum "
     "context length is 4096 tokens and your request has 3500 input tokens (1000 > 4096 - 3500)."), 4096, 3500),
    ("Anthropic", 400, json.dumps({"type": "error", "error": {"type": "invalid_request_error",
     "message": "prompt is too long: 210000 tokens > 200000 maximum"}}), 200000, 210000),
    ("SGLang", 400, error_json("The input (5000 tokens) is longer than the model's context length (4096 tokens)."),
     4096, 5000),
    ("Gemini", 400, json.dumps([{"error": {"code": 400, "message": "The input token count (1200000) exceeds the "
     "maximum number of tokens allowed (1048576).", "status": "INVALID_ARGUMENT"}}]), 1048576, 1200000),
    ("Text Generation Inference", 422, json.dumps({"error": "Input validation error: `inputs` tokens + "
     "`max_new_tokens` must be <= 8193. Given: 8000 `inputs` tokens and 500 `max_new_tokens`",
     "error_type": "validation"}), 8193, 8000),
]


@pytest.mark.parametrize(("server", "status", "body", "window", "size"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_servers_refusal_is_context_window_exceeded_with_its_sizes(
    server: str, status: int, body: str, window: int | None, size: int | None
) -> None:
    error = status_error(URL, status, body)
    assert isinstance(error, ContextWindowExceeded), server
    assert (error.window, error.request_tokens, error.status) == (window, size, status)
    assert error.is_request_error and URL in str(error) and "context window" in str(error)


@pytest.mark.parametrize(("status", "body"), [
    (400, error_json("Invalid value for 'temperature'")),
    (413, "<html>Request Entity Too Large</html>"),  # a proxy's body size limit: not the model's window
    (500, error_json("request (8300 tokens) exceeds the available context size (8192 tokens)")),  # not a refusal
])
def test_other_errors_stay_client_errors(status: int, body: str) -> None:
    error = status_error(URL, status, body)
    assert type(error) is ClientError


def test_the_patterns_name_the_server_each_comes_from() -> None:
    assert all(server and pattern for server, pattern in PATTERNS)


def test_the_openai_compatible_client_raises_it_from_a_real_answer() -> None:
    with FakeOpenAIServer(responder=lambda request: "never", enforced_window=100) as server:
        client = OpenAICompatibleClient("m", api_url=server.url, max_retries=3)
        with pytest.raises(ContextWindowExceeded) as caught:
            client.complete(MESSAGES)
        assert len(server.chat_requests()) == 1  # a refusal is not retried
    assert caught.value.window == 100 and caught.value.request_tokens == 300


def test_the_anthropic_client_raises_it_too() -> None:
    with FakeOpenAIServer(responder=lambda request: "never", enforced_window=100) as server:
        client = AnthropicClient("claude-test", api_url=server.root_url, api_key="k", max_retries=0)
        with pytest.raises(ContextWindowExceeded) as caught:
            client.complete(MESSAGES)
    assert caught.value.window == 100 and caught.value.request_tokens == 300


def test_a_refused_connection_to_this_machine_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    paused: list[float | None] = []

    async def pause(self: retry.CallSchedule, told: float | None) -> bool:
        paused.append(told)
        return True

    monkeypatch.setattr(retry.CallSchedule, "pause", pause)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound, not listening: refused
        client = OpenAICompatibleClient("m", api_url=url, max_retries=5)
        with pytest.raises(EndpointUnreachable, match="could not be reached"):
            client.complete(MESSAGES)
    assert paused == []


def test_a_failing_server_on_this_machine_is_still_retried() -> None:
    with FakeOpenAIServer(responder=lambda request: "fine") as server:
        server.fail_next(FakeReply(status=503, headers={"retry-after-ms": "1"}))
        client = OpenAICompatibleClient("m", api_url=server.url, max_retries=2)
        assert client.complete(MESSAGES).text == "fine"
        assert len(server.chat_requests()) == 2
