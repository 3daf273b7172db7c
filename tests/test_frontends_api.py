"""`rlm api` run for real (a child process on 127.0.0.1) and driven by the openai SDK, against
the fake OpenAI-compatible endpoint and its scripted root model (tests/served.py).

One server for the module, started with a bearer key, one allowed directory, a small request
cap and limits that requests may only lower; every run uses the default sandbox ("auto").
"""

from __future__ import annotations

import asyncio

import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from typer.testing import CliRunner

from helpers import descendants
from rlm.cli.main import app
from rlm.testing import FakeOpenAIServer, FakeReply, message_text
from rlm.utils.llm import estimate_tokens
from served import Served, child_env, responder, wait_for

KEY = "test-server-key"
REQUEST_CAP = 256 * 1024


@pytest.fixture(scope="module")
def endpoint():
    with FakeOpenAIServer(responder=responder) as fake:
        yield fake


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api")
    (root / "allowed").mkdir()
    (root / "allowed" / "notes.txt").write_text("twelve chars", encoding="utf-8")
    (root / "outside.txt").write_text("secret outside the allowed directory", encoding="utf-8")
    (root / "allowed" / "link.txt").symlink_to(root / "outside.txt")
    return root


@pytest.fixture(scope="module")
def server(endpoint: FakeOpenAIServer, dirs: Path):
    served = Served(
        ["api", "--port", "0", "--allow-dir", str(dirs / "allowed"), "--max-request-size", str(REQUEST_CAP),
         "--max-iterations", "6", "--max-sub-calls", "3", "--max-time", "60", "--max-runs", "8", "--max-retries", "0"],
        child_env(RLM_API_URL=endpoint.url, RLM_SERVER_KEY=KEY), dirs, dirs / "api-stderr.txt",
    )
    yield served
    assert served.stop() == 0, served.stderr()
    assert "Traceback" not in served.stderr()


@pytest.fixture
def client(server: Served) -> openai.OpenAI:
    with openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30) as made:
        yield made


def ask(client: openai.OpenAI, question: str, context: str = "some context", **body):
    return client.chat.completions.create(
        model="rlm:auto", messages=[{"role": "user", "content": context}, {"role": "user", "content": question}],
        extra_body=body or None,
    )


def raw(server: Served, method: str, path: str, body: bytes = b"", headers: dict | None = None,
        chunked: bool = False) -> tuple[int, dict]:
    """One request through http.client, for what the SDK would not send."""
    where = urlsplit(server.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        connection.request(method, "/v1" + path, body=iter([body]) if chunked else body,
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                    **(headers or {})}, encode_chunked=chunked)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        connection.close()


# -- what an OpenAI client sees ----------------------------------------------------------------------


def test_the_sdk_lists_the_models_of_the_endpoint_as_rlm_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["rlm:auto", "rlm:fake-model"]


def test_a_chat_completion_answers_from_the_earlier_messages_as_context(client: openai.OpenAI) -> None:
    reply = ask(client, "[length] How long is the context?", context="x" * 1234)
    assert reply.choices[0].message.content == "1234"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "rlm:auto" and reply.object == "chat.completion"
    facts = reply.model_extra["rlm"]
    assert facts["status"] == "final" and facts["iterations"] == 2 and facts["run_id"]


def test_several_earlier_messages_are_the_chunks_of_the_context(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="rlm:fake-model", messages=[
        {"role": "system", "content": "first"}, {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "user", "content": "[echo] What is there?"}])
    assert reply.choices[0].message.content == "first | second"


def test_usage_is_summed_over_the_whole_call_tree(client: openai.OpenAI, endpoint: FakeOpenAIServer) -> None:
    before = len(endpoint.requests)
    reply = ask(client, "[subcalls] Ask twice.")
    calls = endpoint.requests[before:]
    assert reply.choices[0].message.content == "two parts"
    assert len(calls) == 4  # two root turns, two sub-calls
    prompt = sum(estimate_tokens(sum(len(message_text(m)) for m in call["messages"])) for call in calls)
    assert reply.usage.prompt_tokens == prompt
    assert reply.usage.total_tokens == prompt + reply.usage.completion_tokens
    assert reply.usage.completion_tokens == sum(
        estimate_tokens(text) for text in (
            "```repl\nreplies = [llm_query(f'part {i}') for i in range(2)]\n```", "FINAL(two parts)",
            "sub: part 0", "sub: part 1"))


def test_a_stream_sends_progress_as_reasoning_then_the_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="rlm:auto", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "y" * 77}, {"role": "user", "content": "[length] How long?"}])
    chunks = list(stream)
    reasoning = "".join((chunk.choices[0].delta.model_extra or {}).get("reasoning_content", "")
                        for chunk in chunks if chunk.choices)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "sandbox: " in reasoning and "turn 1/6" in reasoning and "turn 2/6" in reasoning
    assert content == "77"
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_a_context_file_under_the_allowed_directory_is_read(client: openai.OpenAI, dirs: Path) -> None:
    reply = client.chat.completions.create(
        model="rlm:auto", messages=[{"role": "user", "content": "[length] How long?"}],
        extra_body={"context_path": str(dirs / "allowed" / "notes.txt")})
    assert reply.choices[0].message.content == "12"


@pytest.mark.parametrize("path", ["{root}/outside.txt", "{root}/allowed/link.txt", "{root}/allowed/../outside.txt",
                                  "outside.txt", "/etc/hostname"])
def test_a_context_path_outside_the_allowed_directories_is_refused(client: openai.OpenAI, dirs: Path,
                                                                  path: str) -> None:
    with pytest.raises(openai.PermissionDeniedError, match="outside the directories this server reads"):
        client.chat.completions.create(
            model="rlm:auto", messages=[{"role": "user", "content": "[echo] What does it say?"}],
            extra_body={"context_path": path.format(root=dirs)})


def test_a_failing_endpoint_is_a_502_and_an_error_event_in_a_stream(client: openai.OpenAI,
                                                                      endpoint: FakeOpenAIServer) -> None:
    endpoint.fail_next(FakeReply(status=503, content="overloaded"))
    with pytest.raises(openai.InternalServerError, match="503") as caught:
        ask(client, "[length] How long?")
    assert caught.value.status_code == 502
    endpoint.fail_next(FakeReply(status=503, content="overloaded"))
    stream = client.chat.completions.create(
        model="rlm:auto", stream=True, messages=[{"role": "user", "content": "c"}, {"role": "user", "content": "[length] q"}])
    with pytest.raises(openai.APIError, match="503"):
        list(stream)


def test_text_that_is_not_valid_unicode_is_carried_as_it_came(server: Served) -> None:
    body = b'{"model": "rlm:auto", "messages": [{"role": "user", "content": "a\\ud800b"}, ' \
           b'{"role": "user", "content": "[length] q"}]}'
    status, answer = raw(server, "POST", "/chat/completions", body)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "3"


# -- limits ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("max_sub_calls", 4), ("max_time", 61), ("max_iterations", 7), ("max_depth", 2), ("max_cost", -1),
])
def test_a_request_cannot_raise_the_servers_limits(client: openai.OpenAI, option: str, value: float) -> None:
    with pytest.raises(openai.BadRequestError, match=option):
        ask(client, "[length] How long?", **{option: value})


def test_a_request_may_lower_a_budget_and_the_run_stops_there(client: openai.OpenAI) -> None:
    reply = ask(client, "[subcalls] Ask twice.", max_sub_calls=1)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content is None
    assert reply.model_extra["rlm"]["status"] == "budget" and "max_sub_calls" in reply.model_extra["rlm"]["error"]


def test_a_request_over_the_size_cap_is_refused(client: openai.OpenAI, server: Served) -> None:
    with pytest.raises(openai.APIStatusError, match="larger than this server's cap") as caught:
        ask(client, "[length] How long?", context="z" * REQUEST_CAP)
    assert caught.value.status_code == 413
    body = json.dumps({"model": "rlm:auto", "messages": [{"role": "user", "content": "z" * REQUEST_CAP}]}).encode()
    assert raw(server, "POST", "/chat/completions", body, chunked=True)[0] == 413  # no Content-Length to trust


def test_a_wrong_or_missing_key_is_refused(server: Served) -> None:
    with openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        with pytest.raises(openai.AuthenticationError):
            ask(stranger, "[length] How long?")
    assert raw(server, "GET", "/models", headers={"Authorization": ""})[0] == 401


@pytest.mark.parametrize("headers, status", [
    ({"Host": "attacker.example:8765"}, 403),  # DNS rebinding: a page's own name pointed at 127.0.0.1
    ({"Origin": "http://attacker.example"}, 403),
    ({"Content-Type": "text/plain"}, 415),  # what a page may send without asking first (no CORS preflight)
])
def test_requests_a_web_page_could_make_are_refused(server: Served, headers: dict, status: int) -> None:
    body = json.dumps({"model": "rlm:auto", "messages": [{"role": "user", "content": "[echo] q"}]}).encode()
    assert raw(server, "POST", "/chat/completions", body, headers=headers)[0] == status


@pytest.mark.parametrize("body, message", [
    (b"not json", "not valid JSON"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "q"}]}', "rlm:"),
    (b'{"model": "rlm:auto", "messages": []}', "messages must be a list"),
    (b'{"model": "rlm:auto", "messages": [{"role": "user", "content": "q"}]}', "no context"),
    (b'{"model": "rlm:auto", "messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "q"}]}',
     "last message must be the user's question"),
    (b'{"model": "rlm:openai:gpt-5", "messages": [{"role": "user", "content": "c"}, {"role": "user", "content": "q"}]}',
     "names a provider"),
])
def test_malformed_requests_get_a_400_saying_what_is_wrong(server: Served, body: bytes, message: str) -> None:
    status, answer = raw(server, "POST", "/chat/completions", body)
    assert status == 400 and message in answer["error"]["message"]


# -- many at once, and clients that leave ------------------------------------------------------------


def test_eight_concurrent_requests_each_run_in_their_own_isolated_run(client: openai.OpenAI) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: ask(client, "[isolate] Whose?", context=f"ctx-{i}"), range(8)))
    elapsed = time.monotonic() - started
    # Each saw an empty scratch directory of its own, and its own variables on its second turn.
    assert [reply.choices[0].message.content for reply in replies] == [f"ctx-{i}|[]" for i in range(8)]
    assert len({reply.model_extra["rlm"]["run_id"] for reply in replies}) == 8
    assert elapsed < 8 * 2 * 0.2  # the root model alone takes 0.4 s a run: they overlapped


def _left_server(server: Served, question: str, before: set[int]) -> tuple[set[int], float]:
    """Start a streamed run, wait for its worker, leave; the worker's processes and how long
    they outlived the client. (`before`: the server's processes that are not this run's: a fork
    server, at levels that fork workers, is there from the first run on.)"""
    stream = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0).chat.completions.create(
        model="rlm:auto", stream=True, messages=[{"role": "user", "content": "c"}, {"role": "user", "content": question}])
    for chunk in stream:
        if (chunk.choices[0].delta.model_extra or {}).get("reasoning_content", "").startswith("turn 1/"):
            break  # the model's first reply is in: its cell runs now
    wait_for(lambda: descendants(server.pid) - before)
    time.sleep(0.3)  # well into the cell
    worker = descendants(server.pid) - before
    left = time.monotonic()
    stream.close()
    wait_for(lambda: not descendants(server.pid) & worker, timeout=10)
    return worker, time.monotonic() - left


def test_a_client_that_leaves_frees_the_worker_of_a_run_waiting_on_a_sub_call(client: openai.OpenAI,
                                                                              server: Served) -> None:
    ask(client, "[length] First a run, so that what every run needs is there already.")
    before = descendants(server.pid)
    worker, gone_after = _left_server(server, "[slow-sub] Wait for it.", before)
    assert worker and gone_after < 1.0


def test_a_client_that_leaves_frees_the_worker_of_a_busy_cell(client: openai.OpenAI, server: Served) -> None:
    ask(client, "[length] First a run, so that what every run needs is there already.")
    before = descendants(server.pid)
    worker, gone_after = _left_server(server, "[sleep] Take your time.", before)
    # A cell that is computing (not waiting on a sub-call) is not waited for: its worker is closed.
    assert worker and gone_after < 1.0
    assert os.path.exists(f"/proc/{server.pid}")  # the server itself goes on


# -- the command line refuses to start a server it cannot run safely ---------------------------------


@pytest.mark.parametrize("args, words", [
    (["api", "--host", "0.0.0.0"], "set RLM_SERVER_KEY"),
    (["mcp", "--http", "0", "--host", "0.0.0.0"], "set RLM_SERVER_KEY"),
    (["api", "--sandbox", "inprocess"], "--sandbox inprocess would run model code inside the server"),
    (["mcp", "--sandbox", "inprocess"], "--sandbox inprocess would run model code inside the server"),
    (["api", "--max-request-size", "none"], "--max-request-size needs a size"),
    (["mcp", "--allow-dir", "/no/such/directory"], "is not a directory"),
    (["api", "--prompt", "nonsense"], "nonsense"),
])
def test_a_server_that_cannot_start_safely_says_why_and_exits_2(args: list[str], words: str) -> None:
    result = CliRunner().invoke(app, args, env={"RLM_SERVER_KEY": ""})
    assert result.exit_code == 2, result.output
    assert words in result.stderr and "Traceback" not in result.stderr


def test_a_body_of_countless_tiny_values_is_refused_before_it_is_parsed() -> None:
    """Parsed, `{}` costs ~20 times its bytes: the values are counted first, the parse is off the loop."""
    from rlm.frontends import api

    body = b'{"model": "rlm:auto", "x": [' + b",".join([b"{}"] * (api.MAX_BODY_VALUES + 1)) + b"]}"
    scope = {"headers": [(b"content-type", b"application/json")]}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    with pytest.raises(api._Refused) as refused:
        asyncio.run(api._json_body(scope, receive, len(body)))
    assert refused.value.status == 413 and "JSON values" in str(refused.value)
