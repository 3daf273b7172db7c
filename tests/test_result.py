"""`rlm.run()` / `RLM_REPL.run()`: one run's outcome as an RLMResult, whatever ended it."""

from __future__ import annotations

import asyncio
import json

import pytest

import rlm
from helpers import make, repl
from rlm.errors import ConfigError
from rlm.result import STATUSES, RLMResult
from rlm.testing import FakeOpenAIServer


def test_a_final_answer_is_status_final_with_the_runs_usage_and_trajectory(tmp_path):
    made, _, _ = make([repl("print(llm_query('half?'))"), "FINAL(forty-two)"], log_dir=str(tmp_path))
    result = made.run(context="the context", query="what?")
    assert isinstance(result, RLMResult)
    assert (result.answer, result.status, result.iterations, result.error) == ("forty-two", "final", 2, None)
    assert result.usage["root"]["calls"] == 2 and result.usage["sub"]["calls"] == 1
    assert result.usage == made.cost_summary()  # the only run so far: the same totals
    assert result.wall_time > 0 and result.run_id
    with open(result.trajectory_path, encoding="utf-8") as trajectory:
        events = [json.loads(line) for line in trajectory]
    assert events[0]["run_id"] == result.run_id and events[-1]["type"] == "run_end"


def test_no_final_answer_in_time_is_status_max_iterations():
    made, _, _ = make([repl("x = 1")] * 3, max_iterations=3)
    result = made.run(context="c", query="q")
    assert (result.answer, result.status, result.iterations) == (None, "max_iterations", 3)
    assert result.trajectory_path is None  # no log_dir: nothing written


def test_a_budget_is_status_budget_with_what_was_spent():
    made, _, _ = make([repl("print(llm_query('a'))")] * 5, ["sub"] * 10, max_sub_calls=2, max_iterations=5, cache=False)
    result = made.run(context="c", query="q")
    assert result.status == "budget" and result.answer is None
    assert "max_sub_calls" in result.error
    assert result.usage["sub"]["calls"] == 2


def test_an_endpoint_error_is_status_error_not_an_exception():
    with FakeOpenAIServer(root=["FINAL(never)"]) as server:
        url = server.url
    result = rlm.run(context="c", query="q", model="m", recursive_model="m", api_url=url, sandbox="inprocess",
                     max_retries=0, request_timeout=2)
    assert result.status == "error" and result.answer is None
    assert result.error.startswith("EndpointUnreachable")


def test_a_mistake_in_the_call_still_raises():
    made, _, _ = make(["FINAL(x)"])
    with pytest.raises(ConfigError):
        made.run(context="c", query="  ")


def test_the_module_level_run_and_arun_make_and_close_their_own_rlm():
    with FakeOpenAIServer(root=[repl("print(len(context))"), "FINAL(done)"] * 2) as server:
        options = {"model": "m", "recursive_model": "m", "api_url": server.url, "sandbox": "subprocess"}
        result = rlm.run(context="abc", query="q", **options)
        assert (result.answer, result.status) == ("done", "final")
        result = asyncio.run(rlm.arun(context="abc", query="q", **options))
        assert (result.answer, result.status) == ("done", "final")


def test_statuses_are_the_documented_ones():
    assert STATUSES == ("final", "max_iterations", "no_progress", "budget", "error")
