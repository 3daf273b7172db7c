"""Whole-tree accounting, the sub-call cache, and the append-only root conversation (prefix reuse)."""

from __future__ import annotations

import pytest

from helpers import last_user, make, repl
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, FakeReply, ScriptedModel, is_root_request, message_text

TOTAL_KEYS = ("calls", "input_tokens", "output_tokens", "cached_tokens", "cost")


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def add_up(entries: list[dict]) -> dict:
    return {key: sum(entry[key] for entry in entries) for key in TOTAL_KEYS}


# -- whole-tree accounting -------------------------------------------------------------------


def tree_server() -> FakeOpenAIServer:
    """A depth-2 tree with exact usage on every reply: the root (2 turns) starts 3 children
    (2 turns each), and each child makes 4 plain sub-calls."""
    child_code = "r = llm_query_batched([f'{q} leaf {i}' for i in range(4)])\nprint(len(r))"

    def answer(request: dict) -> FakeReply:
        turns = sum(1 for m in request["messages"] if m["role"] == "assistant")
        if request["model"] == "root-m":
            text = repl("print(rlm_query_batched(['c0', 'c1', 'c2']))") if turns == 0 else "FINAL(tree)"
            return FakeReply(text, usage=usage(1000, 50, cached=400))
        if is_root_request(request):
            query = message_text(request["messages"][1]).split("Question: ")[1].split("\n")[0]
            text = repl(f"q = {query!r}\n{child_code}") if turns == 0 else f"FINAL({query} done)"
            return FakeReply(text, usage=usage(300, 20, cached=100))
        return FakeReply("leaf", usage=usage(70, 3))

    return FakeOpenAIServer(responder=answer)


def test_the_breakdown_per_role_depth_and_model_adds_up_to_the_totals_children_included() -> None:
    with tree_server() as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess", max_depth=2)
        assert rlm.completion(context="c", query="q") == "tree"
        requests = len(server.chat_requests())
        rlm.close()
    summary = rlm.cost_summary()
    rows = {(b["role"], b["depth"], b["model"]): b for b in summary["breakdown"]}
    assert {key: (row["calls"], row["input_tokens"], row["output_tokens"], row["cached_tokens"])
            for key, row in rows.items()} == {
        ("root", 0, "root-m"): (2, 2000, 100, 800),
        ("root", 1, "sub-m"): (6, 1800, 120, 600),
        ("sub", 2, "sub-m"): (12, 840, 36, 0),
    }
    assert requests == summary["total_calls"] == 2 + 6 + 12
    assert add_up(summary["breakdown"]) == add_up([summary["root"], summary["sub"]])
    assert summary["root"] == {k: v for k, v in rows[("root", 0, "root-m")].items() if k not in ("role", "depth", "model")}
    assert add_up([r for r in summary["breakdown"] if r["depth"] > 0]) == add_up([summary["sub"]])
    assert summary["total_input_tokens"] == 2000 + 1800 + 840 and summary["total_output_tokens"] == 100 + 120 + 36
    assert summary["usage_estimated"] is False and summary["cache_hits"] == 0
    assert summary["total_cost"] == 0.0 and summary["cost_complete"] is True  # a loopback server costs nothing
    assert rlm.trace[-1].usage == summary  # the run_end event carries the same totals


def test_64_concurrent_sub_calls_are_each_counted_exactly_once() -> None:
    code = repl("r = llm_query_batched([f'p{i}' for i in range(64)])\nprint(len(set(r)))")
    sub = lambda request: FakeReply("re " + message_text(request["messages"][0]), delay=0.02,
                                    usage=usage(int(message_text(request["messages"][0])[1:]) + 1, 1))
    with FakeOpenAIServer(root=[FakeReply(code, usage=usage(10, 1)), FakeReply("FINAL(ok)", usage=usage(10, 1))],
                          sub=sub) as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess", max_concurrency=64)
        assert rlm.completion(context="c", query="q") == "ok"
        sent = len(server.chat_requests(root=False))
        rlm.close()
    summary = rlm.cost_summary()
    assert sent == 64 and summary["sub"]["calls"] == 64
    assert summary["sub"]["input_tokens"] == sum(range(1, 65))  # each call's own usage, none twice
    assert summary["sub"]["output_tokens"] == 64
    calls = [e for e in rlm.trace if e.type == "sub_call"]
    assert sorted(c.usage["input_tokens"] for c in calls) == list(range(1, 65))


def test_usage_is_per_run_and_reset_clears_it() -> None:
    rlm, _, _ = make([repl("llm_query('a')"), "FINAL(1)", repl("llm_query('a')"), "FINAL(2)"], lambda m: "r")
    rlm.completion(context="c", query="q")
    first = rlm.cost_summary()
    rlm.completion(context="c", query="q")
    assert rlm.cost_summary()["sub"]["calls"] == 2 * first["sub"]["calls"] == 2  # the cache is per run
    assert rlm.trace[-1].usage == first  # each run_end reports that run alone
    rlm.reset()
    assert rlm.cost_summary()["total_calls"] == 0


# -- the sub-call cache ----------------------------------------------------------------------


class PricedScriptedModel(ScriptedModel):
    """Says it is gpt-4o-mini on api.openai.com so its calls are priced; never connects anywhere."""

    base_url = "https://api.openai.com/v1"


def test_an_identical_sub_call_is_sent_once_and_the_hit_costs_nothing() -> None:
    code = repl("a = llm_query('same prompt')\nb = llm_query('same prompt')\nprint(a == b, a)")
    root = ScriptedModel([code, "FINAL(ok)"], model="root-model")
    sub = PricedScriptedModel(lambda messages: "the reply", model="gpt-4o-mini")
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess")
    assert rlm.completion(context="c", query="q") == "ok"
    assert len(sub.requests) == 1
    assert "True the reply" in last_user(root.requests[1])
    summary = rlm.cost_summary()
    assert summary["cache_hits"] == summary["sub"]["cache_hits"] == 1
    assert summary["sub"]["calls"] == 2
    calls = [e for e in rlm.trace if e.type == "sub_call"]
    assert [c.cache_hit for c in calls] == [False, True]
    assert calls[0].cost > 0 and calls[1].cost == 0.0 and calls[1].usage == {}
    assert summary["sub"]["cost"] == pytest.approx(calls[0].cost)
    assert summary["total_cost"] == pytest.approx(calls[0].cost)  # the root model is local: $0


def test_concurrent_duplicates_in_a_batch_wait_for_the_first() -> None:
    code = repl("r = llm_query_batched(['dup'] * 5 + ['other', 'dup'])\nprint(r)")
    sub = lambda request: FakeReply("re " + message_text(request["messages"][0]), delay=0.2)
    with FakeOpenAIServer(root=[code, "FINAL(ok)"], sub=sub) as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess")
        assert rlm.completion(context="c", query="q") == "ok"
        sent = sorted(message_text(r["messages"][0]) for r in server.chat_requests(root=False))
        feedback = server.chat_requests(root=True)[1]["messages"][-1]["content"]
        rlm.close()
    assert sent == ["dup", "other"]
    assert str(["re dup"] * 5 + ["re other", "re dup"]) in feedback
    summary = rlm.cost_summary()
    assert summary["cache_hits"] == 5 and summary["sub"]["calls"] == 7
    assert summary["sub"]["input_tokens"] == sum(c.usage.get("input_tokens", 0) for c in rlm.trace
                                                 if c.type == "sub_call")


def test_cache_false_sends_every_call() -> None:
    code = repl("a = llm_query('same')\nb = llm_query_batched(['same'] * 3)")
    rlm, _, sub = make([code, "FINAL(ok)"], lambda m: "r", cache=False)
    assert rlm.completion(context="c", query="q") == "ok"
    assert len(sub.requests) == 4
    assert rlm.cost_summary()["cache_hits"] == 0
    assert not any(e.cache_hit for e in rlm.trace if e.type == "sub_call")


def test_the_cache_key_includes_the_whole_prompt_and_a_failure_is_not_cached() -> None:
    code = repl(
        "for prompt in ('a', 'a ', 'b', 'a'):\n"
        "    try:\n        print(repr(llm_query(prompt)))\n    except Exception as exc:\n        print('failed:', exc)"
    )
    refused: list[str] = []

    def sub(request: dict) -> FakeReply:
        prompt = message_text(request["messages"][0])
        if not refused:  # the first 'a' is refused, as a prompt too long would be
            refused.append(prompt)
            return FakeReply("prompt too long", status=400)
        return FakeReply("ok:" + prompt)

    with FakeOpenAIServer(root=[code, "FINAL(ok)"], sub=sub) as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess", max_retries=0)
        assert rlm.completion(context="c", query="q") == "ok"
        sent = [message_text(r["messages"][0]) for r in server.chat_requests(root=False)]
        feedback = server.chat_requests(root=True)[1]["messages"][-1]["content"]
        rlm.close()
    assert sent == ["a", "a ", "b", "a"]  # the refused 'a' was asked again
    assert "failed:" in feedback and "'ok:a '" in feedback and "'ok:a'" in feedback


# -- prefix reuse ----------------------------------------------------------------------------


def test_every_root_request_repeats_the_whole_previous_request_unchanged() -> None:
    replies = [repl(f"x{i} = {i}\nprint('turn {i}', x{i} * 2)") for i in range(1, 10)] + ["FINAL(done)"]
    rlm, root, _ = make(replies, max_iterations=10)
    assert rlm.completion(context="some context", query="q") == "done"
    calls = [e for e in rlm.trace if e.type == "llm_call"]
    assert len(calls) == len(root.requests) == 10
    assert calls[0].prefix_unchanged == 0
    for previous, call, sent_before, sent in zip(calls, calls[1:], root.requests, root.requests[1:]):
        assert call.prefix_unchanged == previous.message_count == len(sent_before)
        assert sent[: len(sent_before)] == sent_before  # checked on what was actually sent
        assert len(sent) == len(sent_before) + 2  # the reply and one new observation
    assert [c.message_count for c in calls] == list(range(2, 21, 2))
