"""What a run records: cost accounting per role and the trace of typed events (in memory, JSONL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import SANDBOXES, make, repl
from rlm.errors import ConfigError
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, ScriptedModel
from rlm.utils.llm import estimate_tokens


# -- cost accounting -------------------------------------------------------------------------


def test_cost_summary_counts_root_and_sub_separately() -> None:
    code = "one = llm_query('summarise part one')\nmore = llm_query_batched(['part two', 'part three'])\nprint(one, more)"
    rlm, root, sub = make([repl(code), "FINAL(summary)"], lambda messages: "short")
    assert rlm.completion(context="c", query="q") == "summary"
    costs = rlm.cost_summary()

    assert isinstance(costs["total_cost"], float) and costs["total_cost"] == 0.0
    assert costs["unpriced_models"] == []
    for role in ("root", "sub"):
        entry = costs[role]
        for key in ("calls", "input_tokens", "output_tokens", "cost"):
            assert key in entry
        assert isinstance(entry["cost"], float)
    assert costs["root"]["calls"] == len(root.requests) == 2
    assert costs["sub"]["calls"] == len(sub.requests) == 3
    root_in = sum(estimate_tokens(sum(len(m["content"]) for m in request)) for request in root.requests)
    sub_in = sum(estimate_tokens(sum(len(m["content"]) for m in request)) for request in sub.requests)
    assert costs["root"]["input_tokens"] == root_in
    assert costs["sub"]["input_tokens"] == sub_in
    assert costs["root"]["output_tokens"] == estimate_tokens(repl(code)) + estimate_tokens("FINAL(summary)")
    assert costs["sub"]["output_tokens"] == 3 * estimate_tokens("short")
    assert costs["root"]["models"] == ["root-model"] and costs["sub"]["models"] == ["sub-model"]


def test_priced_and_unpriced_models_are_reported_apart() -> None:
    root = ScriptedModel(["FINAL(x)"], model="gpt-4o")
    root.base_url = "https://api.openai.com/v1"  # a hosted endpoint: its price is known
    sub = ScriptedModel(["s"], model="no-such-model-xyz-123")
    sub.base_url = "https://models.example.com/v1"  # a hosted endpoint with no known price
    rlm = RLM_REPL(client=root, sub_client=sub, sandbox="inprocess")
    assert rlm.completion(context="c", query="q") == "x"
    costs = rlm.cost_summary()
    assert costs["root"]["cost"] > 0
    assert costs["total_cost"] == pytest.approx(costs["root"]["cost"])
    assert costs["unpriced_models"] == []

    sub_rlm = RLM_REPL(client=ScriptedModel([repl("llm_query('hi')") + "\nFINAL(y)"]), sub_client=sub,
                       sandbox="inprocess")
    assert sub_rlm.completion(context="c", query="q") == "y"
    costs = sub_rlm.cost_summary()
    assert costs["unpriced_models"] == ["no-such-model-xyz-123"]
    assert costs["cost_complete"] is False
    assert isinstance(costs["total_cost"], float) and costs["total_cost"] == 0.0


def test_usage_adds_up_across_runs_and_reset_clears_usage_and_trace() -> None:
    rlm, root, _ = make(["FINAL(one)", "FINAL(two)", "FINAL(three)"])
    rlm.completion(context="c", query="q")
    rlm.completion(context="c", query="q")
    assert rlm.cost_summary()["root"]["calls"] == 2
    assert [event.type for event in rlm.trace][0] == "run_start"
    assert sum(1 for event in rlm.trace if event.type == "run_start") == 1  # only the last run

    rlm.reset()
    costs = rlm.cost_summary()
    assert costs["root"]["calls"] == 0 and costs["sub"]["calls"] == 0
    assert costs["root"]["input_tokens"] == 0 and costs["total_cost"] == 0.0
    assert rlm.trace == []
    assert rlm.completion(context="c", query="q") == "three"
    assert rlm.cost_summary()["root"]["calls"] == 1


def test_run_end_usage_covers_only_its_own_run_while_cost_summary_counts_all() -> None:
    first = [repl("print(llm_query('one'), llm_query('two'))"), "FINAL(first)"]
    rlm, _, _ = make([*first, "FINAL(second)"], lambda messages: "sub reply")
    assert rlm.completion(context="c", query="q") == "first"
    assert rlm.completion(context="c", query="q") == "second"
    end = rlm.trace[-1]
    assert end.type == "run_end"
    own_calls = sum(1 for event in rlm.trace if event.type == "llm_call")
    assert own_calls == 1
    assert end.usage["root"]["calls"] == own_calls and end.usage["sub"]["calls"] == 0
    total = rlm.cost_summary()
    assert total["root"]["calls"] == 3 and total["sub"]["calls"] == 2
    assert end.usage["root"]["input_tokens"] < total["root"]["input_tokens"]


# -- tracing ---------------------------------------------------------------------------------


def _traced_episode(**options: Any) -> RLM_REPL:
    code = "a = llm_query('first')\nb = llm_query_batched(['second', 'third'])\nprint(a, b)"
    rlm, _, _ = make([repl(code), "FINAL(traced)"], lambda messages: "sub answer", **options)
    assert rlm.completion(context="traced context", query="q") == "traced"
    return rlm


def test_events_are_kept_in_memory_by_type() -> None:
    seen: list[Any] = []
    rlm = _traced_episode(on_event=seen.append)
    types = [event.type for event in rlm.trace]
    assert types[0] == "run_start" and types[-1] == "run_end"
    assert types.count("llm_call") == 2
    assert types.count("exec") == 1
    assert types.count("sub_call") == 3
    assert types.count("final") == 1
    assert types.index("final") < types.index("run_end")
    run_ids = {event.run_id for event in rlm.trace}
    assert len(run_ids) == 1
    assert [event.type for event in seen] == types
    sub_prompts = sorted(event.prompt for event in rlm.trace if event.type == "sub_call")
    assert sub_prompts == ["first", "second", "third"]
    exec_event = next(event for event in rlm.trace if event.type == "exec")
    assert "sub answer" in exec_event.stdout
    assert rlm.trace[-1].status == "answered" and rlm.trace[-1].answer == "traced"


def test_log_dir_gets_one_jsonl_file_with_one_event_per_line(tmp_path: Path) -> None:
    log_dir = tmp_path / "traces" / "nested"
    rlm = _traced_episode(log_dir=str(log_dir))
    files = list(log_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl"
    run_id = rlm.trace[0].run_id
    assert files[0].name == f"{run_id}.jsonl"
    lines = files[0].read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == len(rlm.trace)
    for event in events:
        assert isinstance(event, dict)
        assert "v" in event and event["run_id"] == run_id
    assert [event["type"] for event in events] == [event.type for event in rlm.trace]


def test_nothing_is_written_without_a_log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    rlm = _traced_episode()
    assert rlm.tracer.path is None
    assert list(tmp_path.iterdir()) == []


def test_rlm_log_dir_environment_variable_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log_dir = tmp_path / "from-env"
    monkeypatch.setenv("RLM_LOG_DIR", str(log_dir))
    rlm = _traced_episode()
    files = list(log_dir.glob("*.jsonl"))
    assert [file.name for file in files] == [f"{rlm.trace[0].run_id}.jsonl"]
    assert len(files[0].read_text(encoding="utf-8").splitlines()) == len(rlm.trace)


def test_log_dir_argument_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLM_LOG_DIR", str(tmp_path / "env"))
    _traced_episode(log_dir=str(tmp_path / "arg"))
    assert len(list((tmp_path / "arg").glob("*.jsonl"))) == 1
    assert not (tmp_path / "env").exists()


def _echo(request: dict) -> str:
    return request["messages"][0]["content"]


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_lone_surrogates_from_model_code_reach_neither_server_nor_trace(sandbox: str, tmp_path: Path) -> None:
    """Such text cannot be encoded as UTF-8: it is replaced before it crosses HTTP or lands in the JSONL."""
    code = "print(chr(0xd800))\nreply = llm_query('a' + chr(0xdc80))\nprint('sub said', reply)"
    with FakeOpenAIServer(root=[repl(code), "FINAL(done)"], sub=_echo) as server:
        with RLM_REPL("root-model", "sub-model", api_url=server.url, sandbox=sandbox, log_dir=str(tmp_path),
                      max_retries=0) as rlm:
            assert rlm.completion(context="c", query="q") == "done"
        sub_prompts = [request["messages"][0]["content"] for request in server.chat_requests(root=False)]
    assert sub_prompts == ["a?"]
    [trajectory] = tmp_path.glob("*.jsonl")
    events = [json.loads(line) for line in trajectory.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8
    assert [event["type"] for event in events] == [event.type for event in rlm.trace]
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "answered"
    executed = next(event for event in events if event["type"] == "exec")
    assert executed["stdout"] == "?\nsub said a?\n"


def test_a_log_dir_that_cannot_be_made_is_a_config_error_before_any_request(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    rlm, root, _ = make(["FINAL(never)"], log_dir=str(blocker / "sub"))
    with pytest.raises(ConfigError, match="log") as caught:
        rlm.completion(context="c", query="q")
    assert str(blocker / "sub") in str(caught.value) and "RLM_LOG_DIR" in str(caught.value)
    assert root.requests == []
