"""Sub-call batches: a failed item is an error text, and a prompt too long for the sub-model fails unsent."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import last_user, make, repl, run_readme_example
from rlm.engine import BATCH_ERROR_PREFIX
from rlm.errors import ConfigError
from rlm.rlm_repl import RLM_REPL
from rlm.sandbox.protocol import WORKER_FRAMES, ProtocolViolation, check_frame
from rlm.testing import FakeOpenAIServer, FakeReply, ScriptedModel
from rlm.utils.tracing import SubCall

LEVELS = ["subprocess", "strict", "bwrap"]


def answer_but_bad(messages: list[dict]) -> str | None:
    prompt = messages[-1]["content"]
    return None if "bad" in prompt else prompt.upper()  # None: the sub-model sends no text


@pytest.mark.parametrize("level", LEVELS)
def test_one_failed_item_is_an_error_text_and_the_others_are_answered(level: str) -> None:
    code = "replies = llm_query_batched(['a', 'bad', 'c'])\nprint(replies)"
    rlm, root, _ = make([repl(code), "FINAL(done)"], answer_but_bad, sandbox=level)
    assert rlm.completion(context="ctx", query="q") == "done"
    output = last_user(root.requests[1])
    assert f"['A', '{BATCH_ERROR_PREFIX}the sub-model sent no text" in output and "'C']" in output


def test_a_batch_of_one_keeps_its_error_text_and_a_single_llm_query_still_raises() -> None:
    code = (
        "print(llm_query_batched(['bad'])[0].startswith('[sub-call error] '))\n"
        "try:\n    llm_query('bad')\nexcept Exception as exc:\n    print('raised', type(exc).__name__)"
    )
    rlm, root, _ = make([repl(code), "FINAL(done)"], answer_but_bad, sandbox="subprocess")
    rlm.completion(context="ctx", query="q")
    assert "True\nraised LLMQueryError" in last_user(root.requests[1])


def test_a_server_refusing_one_item_fails_that_item_only() -> None:
    def sub(request: dict) -> FakeReply:
        prompt = request["messages"][-1]["content"]
        return FakeReply(content="no", status=400) if prompt == "refused" else FakeReply(content=prompt * 2)

    code = "print(llm_query_batched(['x', 'refused']))"
    with FakeOpenAIServer(root=[repl(code), "FINAL(done)"], sub=sub) as server:
        with RLM_REPL(api_url=server.url, sandbox="subprocess", max_retries=0) as rlm:
            assert rlm.completion(context="c", query="q") == "done"
        output = server.chat_requests(root=True)[1]["messages"][-1]["content"]
    assert f"['xx', '{BATCH_ERROR_PREFIX}the sub-model rejected the request" in output


@pytest.mark.parametrize("level", LEVELS)
def test_a_prompt_past_sub_context_window_fails_unsent_naming_both_sizes(level: str) -> None:
    code = (
        "try:\n    llm_query('x' * 40_000)\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
        "print(llm_query_batched(['small', 'y' * 40_000]))"
    )
    rlm, root, sub = make([repl(code), "FINAL(done)"], lambda messages: "ok", sandbox=level, sub_context_window=8_000)
    assert rlm.completion(context="c", query="q") == "done"
    output = last_user(root.requests[1])
    assert "LLMQueryError the prompt is too long for the sub-model 'sub-model': at least 10,000 tokens" in output
    assert "(40,000 characters) against its window of 8,000 tokens; split it into 3 or more pieces" in output
    assert f"['ok', \"{BATCH_ERROR_PREFIX}the prompt is too long" in output
    assert [messages[-1]["content"] for messages in sub.requests] == ["small"]  # nothing else was sent
    refused = [event for event in rlm.trace if isinstance(event, SubCall) and event.error]
    assert len(refused) == 2 and all("too long" in event.error for event in refused)


def test_the_sub_models_window_comes_from_the_server_when_not_given() -> None:
    code = "print(llm_query('z' * 20_000))"
    with FakeOpenAIServer(root=[repl(code), "FINAL(done)"], sub=["never"], context_window=4_000) as server:
        with RLM_REPL(api_url=server.url, sandbox="subprocess") as rlm:  # "auto": the server's model
            assert rlm.completion(context="c", query="q") == "done"
        assert server.chat_requests(root=False) == []
        output = server.chat_requests(root=True)[1]["messages"][-1]["content"]
    assert "at least 5,000 tokens (20,000 characters) against its window of 4,000 tokens" in output



def test_the_readme_example_runs_offline_and_prints_what_it_says(tmp_path: Path) -> None:
    printed, expected = run_readme_example("### Failed sub-calls and batches", tmp_path)
    assert printed == expected


@pytest.mark.parametrize("level", LEVELS)
def test_llm_query_may_choose_an_allowed_sub_model_and_no_other(level: str) -> None:
    big = ScriptedModel(lambda messages: "big: " + messages[-1]["content"], model="big-model")
    code = (
        "print(llm_query('a', model='big-model'), llm_query_batched(['b', 'c'], model='big-model'))\n"
        "print(llm_query('d'), llm_query('e', model='sub-model'))\n"
        "try:\n    llm_query('f', model='gpt-9')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)"
    )
    rlm, root, sub = make([repl(code), "FINAL(done)"], lambda messages: "small", sandbox=level, sub_models=[big])
    assert rlm.completion(context="c", query="q") == "done"
    assert "pass model=NAME to use another one of: 'big-model'" in root.requests[0][-1]["content"]
    output = last_user(root.requests[1])
    assert "big: a ['big: b', 'big: c']\nsmall small\n" in output
    assert "LLMQueryError llm_query: model 'gpt-9' is not one of the sub-models allowed in this run " \
           "('sub-model', 'big-model')" in output
    assert len(sub.requests) == 2 and len(big.requests) == 3
    models = [event.model for event in rlm.trace if isinstance(event, SubCall)]
    assert sorted(models) == ["big-model"] * 3 + ["sub-model"] * 2
    sub_rows = [row for row in rlm.cost_summary()["breakdown"] if row["role"] == "sub"]
    assert {row["model"] for row in sub_rows} == {"big-model", "sub-model"}


@pytest.mark.parametrize("model", [3, "", "x" * 201])
def test_a_model_that_is_not_a_name_is_refused_in_model_code(model: object) -> None:
    rlm, root, _ = make([repl(f"llm_query('a', model={model!r})"), "FINAL(done)"], sandbox="subprocess")
    rlm.completion(context="c", query="q")
    assert "TypeError: llm_query(prompt, model=...): model is the name" in last_user(root.requests[1])


def test_sub_models_must_be_names_or_clients() -> None:
    with pytest.raises(ConfigError, match="neither a model name"):
        make(["FINAL(x)"], sub_models=[3])
    with pytest.raises(ConfigError, match="must be a list"):
        make(["FINAL(x)"], sub_models="gpt-5")


@pytest.mark.parametrize("prompt, complaint", [
    ({"prompt": "a"}, "holds a dict that is not"),
    ({"prompt": "a", "model": "m", "file": True}, "holds a dict that is not"),
    ({"prompt": 3, "model": "m"}, "field 'prompt'"),
    ({"prompt": "a", "model": "m" * 201}, "field 'model'"),
    (["a"], "holds a list"),
])
def test_the_host_refuses_a_malformed_model_choice_from_a_worker(prompt: object, complaint: str) -> None:
    with pytest.raises(ProtocolViolation, match=complaint):
        check_frame({"op": "llm_query", "id": 1, "kind": "llm_query", "prompts": [prompt]}, WORKER_FRAMES)


def test_the_host_accepts_a_model_choice_from_a_worker() -> None:
    frame = {"op": "llm_query", "id": 1, "kind": "llm_query_batched", "prompts": ["a", {"prompt": "b", "model": "m"}]}
    assert check_frame(dict(frame), WORKER_FRAMES) == frame
