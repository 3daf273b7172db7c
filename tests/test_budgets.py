"""Budgets of the whole call tree, enforced on the host: max_sub_calls, max_tokens, max_cost, max_time."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import SANDBOXES, make, repl
from rlm.cli.exits import ExitCode, failure_for
from rlm.cli.main import app
from rlm.errors import BudgetExceeded, RLMError
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, FakeReply, ScriptedModel
from rlm.usage import Usage, price_call
from rlm.utils.llm import estimate_tokens

BATCH_OF_10 = repl("print(llm_query_batched([f'p{i}' for i in range(10)]))")


class PricedScriptedModel(ScriptedModel):
    """A scripted model that says it is gpt-4o-mini on api.openai.com, so genai-prices prices
    its calls. It never connects anywhere: ScriptedModel answers in memory."""

    base_url = "https://api.openai.com/v1"


def leaf_cost(prompt: str, reply: str) -> float:
    usage = Usage(input_tokens=estimate_tokens(len(prompt)), output_tokens=estimate_tokens(reply))
    return price_call("gpt-4o-mini", PricedScriptedModel.base_url, usage)


# -- max_sub_calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_batch_that_would_pass_max_sub_calls_is_refused_before_it_fans_out(sandbox: str) -> None:
    rlm, root, sub = make([BATCH_OF_10, "FINAL(never)"], max_sub_calls=5, sandbox=sandbox)
    with pytest.raises(BudgetExceeded) as caught:
        rlm.completion(context="c", query="q")
    exc = caught.value
    assert isinstance(exc, RLMError)
    assert sub.requests == []  # nothing of the batch was sent
    assert (exc.limit, exc.allowed, exc.spent) == ("max_sub_calls", 5, 0)
    assert exc.partial_answer == BATCH_OF_10  # the root model's last reply
    assert exc.usage["root"]["calls"] == 1 and exc.usage["sub"]["calls"] == 0
    assert exc.usage == rlm.cost_summary()
    assert len(root.requests) == 1
    assert rlm.trace[-1].type == "run_end" and rlm.trace[-1].status == "budget_exceeded"
    assert [e.kind for e in rlm.trace if e.type == "error"] == ["BudgetExceeded"]


def test_using_exactly_max_sub_calls_still_lets_the_root_answer() -> None:
    code = repl("print(llm_query_batched([f'p{i}' for i in range(5)]))")
    rlm, _, sub = make([code, "FINAL(within budget)"], lambda m: "x", max_sub_calls=5)
    assert rlm.completion(context="c", query="q") == "within budget"
    assert len(sub.requests) == 5


@pytest.mark.parametrize("sandbox", SANDBOXES)
@pytest.mark.parametrize("handler", ["except BaseException", "except"])
def test_model_code_cannot_swallow_budget_exceeded(sandbox: str, handler: str) -> None:
    code = f"try:\n    llm_query_batched(['x'] * 10)\n{handler}:\n    print('swallowed')\nFINAL('sneaky')"
    rlm, root, sub = make([repl(code), "FINAL(never)"], max_sub_calls=3, sandbox=sandbox)
    with pytest.raises(BudgetExceeded) as caught:
        rlm.completion(context="c", query="q")
    assert caught.value.limit == "max_sub_calls"
    assert len(root.requests) == 1 and sub.requests == []
    assert not [e for e in rlm.trace if e.type == "final"]


def test_the_budget_counts_the_calls_of_child_runs() -> None:
    # Two children one after the other; each makes 1 root turn and (tries) a batch of 3.
    # Child turns count as sub-calls: 1 + 3 + 1 = 5 made, and 5 + 3 > 6 stops the second batch.
    def sub_model(messages: list[dict]) -> str:
        if messages[0]["role"] == "system":
            return repl("FINAL(str(llm_query_batched(['a', 'b', 'c'])))")
        return "leaf"

    root_code = repl("x = rlm_query('first')\ny = rlm_query('second')")
    rlm, _, sub = make([root_code, "FINAL(never)"], sub_model, max_depth=2, max_sub_calls=6)
    with pytest.raises(BudgetExceeded) as caught:
        rlm.completion(context="c", query="q")
    exc = caught.value
    assert (exc.limit, exc.spent) == ("max_sub_calls", 5)
    assert len(sub.requests) == 5
    assert exc.usage["sub"]["calls"] == 5
    breakdown = {(b["role"], b["depth"]): b["calls"] for b in exc.usage["breakdown"]}
    assert breakdown == {("root", 0): 1, ("root", 1): 2, ("sub", 2): 3}


# -- max_tokens ------------------------------------------------------------------------------


def test_max_tokens_stops_a_running_batch_with_overshoot_bounded_by_the_calls_in_flight() -> None:
    root_usage = {"prompt_tokens": 10, "completion_tokens": 0}
    sub_reply = FakeReply("leaf", delay=0.02, usage={"prompt_tokens": 90, "completion_tokens": 10})
    code = repl("print(llm_query_batched([f'p{i}' for i in range(40)]))")
    with FakeOpenAIServer(root=[FakeReply(code, usage=root_usage)], sub=lambda request: sub_reply) as server:
        rlm = RLM_REPL("root-m", "sub-m", api_url=server.url, sandbox="inprocess", max_concurrency=4,
                       max_tokens=1000)
        with pytest.raises(BudgetExceeded) as caught:
            rlm.completion(context="c", query="q")
        sent = len(server.chat_requests(root=False))
        rlm.close()
    exc = caught.value
    assert exc.limit == "max_tokens"
    # 10 calls of 100 tokens reach 1000 (with the root's 10); at most 4 more were already in flight.
    assert 10 <= sent <= 10 + 4
    assert exc.usage["sub"]["calls"] == sent  # every call made is counted
    total = exc.usage["total_input_tokens"] + exc.usage["total_output_tokens"]
    assert total == 10 + 100 * sent and total - 1000 <= 4 * 100


# -- max_cost --------------------------------------------------------------------------------


def test_max_cost_stops_the_run_once_priced_calls_reach_it() -> None:
    prompt = "x" * 40_000  # 10,000 tokens of gpt-4o-mini input each
    per_call = leaf_cost("0" + prompt, "leaf")
    assert per_call and per_call > 0
    code = repl(f"for i in range(20):\n    llm_query(str(i) + 'x' * {len(prompt)})")
    root = ScriptedModel([code, "FINAL(never)"], model="root-model")
    sub = PricedScriptedModel(lambda messages: "leaf", model="gpt-4o-mini")
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess", max_cost=per_call * 3.5)
    with pytest.raises(BudgetExceeded) as caught:
        rlm.completion(context="c", query="q")
    exc = caught.value
    assert exc.limit == "max_cost"
    assert len(sub.requests) == 4  # the 4th call passes the limit; the 5th is not made
    assert exc.usage["total_cost"] == pytest.approx(4 * per_call, rel=0.01)
    assert exc.usage["cost_complete"] is True and exc.spent >= exc.allowed


# -- max_time --------------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_max_time_stops_a_run_waiting_on_a_slow_sub_call(sandbox: str) -> None:
    # Nothing checks the budget while one call runs: the hard stop at max_time * 1.1 + 1 s ends it,
    # and the cell waiting on that call is released at once (not after the call's 20 s).
    root = ScriptedModel([repl("print(llm_query('slow'))"), "FINAL(never)"], model="root-model")
    sub = ScriptedModel(["late"], model="sub-model", delay=20)
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox=sandbox, max_time=0.5)
    started = time.monotonic()
    with pytest.raises(BudgetExceeded) as caught:
        rlm.completion(context="c", query="q")
    elapsed = time.monotonic() - started
    assert caught.value.limit == "max_time"
    assert elapsed < 0.5 * 1.1 + 1 + 0.3  # the hard stop, and a moment to tear down
    assert rlm.trace[-1].status == "budget_exceeded"


class SlowLeaves(ScriptedModel):
    """Answers child-run turns at once and plain sub-calls after 1.6 s (cancellable, recorded after)."""

    async def acomplete(self, messages: list[dict], *, max_tokens: int | None = None):
        if messages[0]["role"] != "system":
            await asyncio.sleep(1.6)
        return await super().acomplete(messages, max_tokens=max_tokens)


@pytest.mark.parametrize("shape", ["plain", "children"])
def test_after_the_hard_stop_nothing_of_the_run_goes_on(shape: str) -> None:
    # acompletion in a loop that keeps running: the stopped run's sub-calls and child runs must
    # not finish later and add calls, usage or events behind the caller's back.
    code = "print(llm_query('slow'))" if shape == "plain" else "print(rlm_query_batched(['a', 'b']))"
    root = ScriptedModel([repl(code), "FINAL(never)"], model="root-model")
    sub = SlowLeaves(lambda messages: repl("llm_query('slow leaf')"), model="sub-model")
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess", max_time=0.1, max_depth=2)

    async def stop_then_wait() -> BudgetExceeded:
        with pytest.raises(BudgetExceeded) as caught:
            await rlm.acompletion(context="c", query="q")
        await asyncio.sleep(0.8)  # past the moment the slow calls would have finished
        return caught.value

    exc = asyncio.run(stop_then_wait())
    assert exc.limit == "max_time"
    assert [r for r in sub.requests if r[0]["role"] != "system"] == []
    assert rlm.cost_summary()["sub"]["calls"] == (0 if shape == "plain" else 2)  # the children's turns
    assert rlm.trace[-1].type == "run_end"


def test_max_time_is_checked_before_each_call() -> None:
    code = repl("for i in range(100):\n    llm_query(f'p{i}')")
    root = ScriptedModel([code, "FINAL(never)"], model="root-model")
    sub = ScriptedModel(lambda messages: "ok", model="sub-model", delay=0.1)
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess", max_time=0.5)
    started = time.monotonic()
    with pytest.raises(BudgetExceeded) as caught:
        rlm.completion(context="c", query="q")
    assert caught.value.limit == "max_time" and caught.value.spent >= 0.5
    assert time.monotonic() - started < 0.5 * 1.1 + 1
    assert 3 <= len(sub.requests) <= 7  # stopped by the check, about 0.5 s in, not by the hard stop


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("some context\n", encoding="utf-8")
    return path


def test_rlm_ask_maps_budget_exceeded_to_its_own_exit_code_and_json_status(context_file: Path) -> None:
    def ask(*extra: str):
        with FakeOpenAIServer(root=[BATCH_OF_10]) as server:
            done = CliRunner().invoke(app, ["ask", "q", "--context", str(context_file), "--api-url", server.url,
                                            "--sandbox", "inprocess", "--max-sub-calls", "3", "--quiet", *extra])
            assert len(server.chat_requests(root=False)) == 0
        return done

    plain, as_json = ask(), ask("--json")
    assert plain.exit_code == as_json.exit_code == ExitCode.BUDGET == 5
    assert plain.stdout == ""
    line = plain.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "--max-sub-calls" in line and "--max-cost" in line and "max_sub_calls" not in line  # the flag, not the parameter
    report = json.loads(as_json.stdout)
    assert report["status"] == "budget_exceeded" and report["exit_code"] == 5 and report["answer"] is None
    assert report["cost_summary"]["root"]["calls"] == 1


def test_failure_for_budget_exceeded_names_every_budget_option() -> None:
    failure = failure_for(BudgetExceeded("max_time", 10, 11.5))
    assert failure.code is ExitCode.BUDGET
    for option in ("--max-cost", "--max-tokens", "--max-sub-calls", "--max-time"):
        assert option in failure.message


def test_rlm_ask_budget_options_reach_the_run(context_file: Path, tmp_path: Path) -> None:
    options = ["--max-cost", "0.5", "--max-tokens", "100000", "--max-sub-calls", "12", "--max-time", "30",
               "--max-depth", "2"]
    with FakeOpenAIServer(root=["FINAL(done)"]) as server:
        done = CliRunner().invoke(app, ["ask", "q", "--context", str(context_file), "--api-url", server.url,
                                        "--sandbox", "inprocess", "--quiet", "--log-dir", str(tmp_path), *options])
    assert done.exit_code == 0 and done.stdout == "done\n"
    [trajectory] = tmp_path.glob("*.jsonl")
    start = json.loads(trajectory.read_text(encoding="utf-8").splitlines()[0])
    assert start["type"] == "run_start" and start["settings"]["max_depth"] == 2
    assert start["settings"]["limits"] == {"max_cost": 0.5, "max_tokens": 100000, "max_sub_calls": 12, "max_time": 30.0}


def test_rlm_ask_max_depth_reaches_the_run(context_file: Path) -> None:
    with FakeOpenAIServer(root=["FINAL(a)"]) as server:
        done = CliRunner().invoke(app, ["ask", "q", "--context", str(context_file), "--api-url", server.url,
                                        "--sandbox", "inprocess", "--max-depth", "0", "--quiet"])
        system = server.chat_requests(root=True)[0]["messages"][0]["content"]
    assert done.exit_code == 0 and done.stdout == "a\n"
    assert "llm_query" not in system
