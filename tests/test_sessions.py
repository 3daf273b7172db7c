"""Multi-turn sessions (rlm.session): one REPL worker, its variables and `history` across completions."""

from __future__ import annotations

from pathlib import Path

import pytest

import rlm
from helpers import last_user, make, repl, run_readme_example
from rlm.errors import ConfigError
from rlm.testing import ScriptedModel

LEVELS = ["subprocess", "strict", "bwrap"]


@pytest.mark.parametrize("level", LEVELS)
def test_a_session_keeps_its_worker_variables_and_contexts(level: str) -> None:
    agent, root, _ = make([
        repl("import os\npid = os.getpid()\ncount = len(context)"),
        "FINAL_VAR(count)",
        repl("print(pid == os.getpid(), count, context_0 == context, context_1, "
             "context_2 if 'context_2' in dir() else '-')"),
        "FINAL(second)",
    ], sandbox=level)
    with rlm.session(agent) as s:
        assert s.completion(context="hello world", query="How long?") == "11"
        assert s.completion(context={"k": [1, 2]}, query="And now?") == "second"
        assert "True 11 True {'k': [1, 2]} -" in last_user(root.requests[-1])
        assert "`context_1`" in root.requests[2][1]["content"]  # the later question names its context
        assert s.workers_started == 1
    assert s._env is None  # closing freed the worker


@pytest.mark.parametrize("level", LEVELS)
def test_history_lists_earlier_questions_and_answers_and_survives_overwriting(level: str) -> None:
    agent, root, _ = make([
        "FINAL(first answer)",
        repl("history = 'overwritten'"),
        repl("print([(m['role'], m['content'], m['completion']) for m in history])"),
        "FINAL(done)",
    ], sandbox=level)
    with rlm.session(agent) as s:
        s.completion(context="a", query="first question")
        s.completion(context="b", query="second question")
    assert "[('user', 'first question', 0), ('assistant', 'first answer', 0)]" in last_user(root.requests[-1])
    assert s.history[-1] == {"role": "assistant", "content": "done", "completion": 1}


def test_each_completion_has_its_own_cost_and_the_session_sums_them() -> None:
    agent, _, _ = make([
        repl("llm_query('x')"), "FINAL(one)", "FINAL(two)",
    ], sandbox="subprocess")
    with rlm.session(agent) as s:
        s.completion(context="a", query="q1")
        s.completion(context="b", query="q2")
    first, second = s.usage
    assert (first["root"]["calls"], first["sub"]["calls"]) == (2, 1)
    assert (second["root"]["calls"], second["sub"]["calls"]) == (1, 0)
    assert s.cost_summary()["total_calls"] == 4
    runs = [event.run_id for event in agent.trace if event.type == "run_end"]
    assert len(runs) == 1  # the trace holds the last completion, a run of its own


def test_a_failed_completion_frees_the_worker_and_the_next_one_says_so() -> None:
    def model(messages: list[dict]) -> str:
        if "q2" in messages[1]["content"]:
            raise rlm.ClientError("the endpoint is down", url="http://127.0.0.1/scripted")
        return "FINAL(fine)" if messages[-1]["role"] == "user" and len(messages) > 2 else repl("x = 1")

    agent, root, _ = make(model, sandbox="subprocess")
    with rlm.session(agent) as s:
        assert s.completion(context="a", query="q1") == "fine"
        with pytest.raises(rlm.ClientError):
            s.completion(context="b", query="q2")
        assert s._env is None
        assert s.completion(context="c", query="q3") == "fine"
        assert s.workers_started == 2
    assert "variables and contexts are gone" in root.requests[-1][1]["content"]


def test_a_closed_session_refuses_completions() -> None:
    agent, _, _ = make(["FINAL(x)"])
    s = rlm.session(agent)
    s.close()
    with pytest.raises(ConfigError, match="session is closed"):
        s.completion(context="a", query="q")
    with pytest.raises(ConfigError, match="not both"):
        rlm.session(agent, max_iterations=3)


def test_a_plain_completion_after_a_session_has_its_own_worker() -> None:
    agent, root, _ = make([repl("y = 1"), "FINAL(a)", repl("print('y' in dir())"), "FINAL(b)"], sandbox="subprocess")
    with rlm.session(agent) as s:
        s.completion(context="a", query="q1")
    assert agent.completion(context="b", query="q2") == "b"
    assert "False" in last_user(root.requests[-1])


def test_the_readme_example_runs_offline_and_prints_what_it_says(tmp_path: Path) -> None:
    printed, expected = run_readme_example("### Multi-turn sessions", tmp_path)
    assert printed == expected


def test_a_session_made_from_options_closes_its_clients() -> None:
    root = ScriptedModel(["FINAL(x)"])
    with rlm.session(client=root, sub_client=root, sandbox="subprocess") as s:
        assert s.completion(context="a", query="q") == "x"
    assert s._owned
