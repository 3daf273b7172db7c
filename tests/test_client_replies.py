"""Replies whose JSON is well-formed but whose shape is not: a clear MalformedResponse, or usage estimated."""

from __future__ import annotations

import json

import pytest

from rlm.errors import MalformedResponse
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.utils.llm import OpenAICompatibleClient, estimate_tokens

MESSAGES = [{"role": "user", "content": "What is 6 x 7?"}]


@pytest.fixture
def server():
    with FakeOpenAIServer(responder=lambda request: "unused") as fake:
        yield fake


def client_for(server: FakeOpenAIServer) -> OpenAICompatibleClient:
    return OpenAICompatibleClient("m", api_url=server.url, max_retries=0, timeout=5.0)


@pytest.mark.parametrize("body", [{"choices": [{"message": None}]}, {"choices": [{"message": "hi"}]}])
def test_a_message_that_is_not_an_object_is_malformed_response(server, body):
    server.fail_next(FakeReply(raw=json.dumps(body).encode()))
    with pytest.raises(MalformedResponse, match="choices") as caught:
        client_for(server).complete(MESSAGES)
    assert caught.value.url == server.url
    assert json.loads(caught.value.body) == body


def test_completion_tokens_that_are_not_a_number_are_estimated_and_marked(server):
    body = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 3, "completion_tokens": "abc"}}
    server.fail_next(FakeReply(raw=json.dumps(body).encode()))
    completion = client_for(server).complete(MESSAGES)
    assert completion.text == "x"
    assert completion.usage.input_tokens == 3  # the server's own count is kept
    assert completion.usage.output_tokens == estimate_tokens("x")
    assert completion.usage.estimated is True
    assert completion.finish_reason is None
