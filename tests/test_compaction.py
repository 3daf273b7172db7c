"""Compaction (compact=True): the root model summarises old turns near the window's end; their
full text stays in the REPL as `history`."""

from __future__ import annotations

from pathlib import Path

import pytest

import rlm
from helpers import make, repl, run_readme_example
from rlm.errors import ConfigError
from rlm.replay import replay_run
from rlm.utils.prompts import SUMMARY_PROMPT

LEVELS = ["subprocess", "strict", "bwrap"]
SUMMARY = "part0 and part1 hold x's."


def scripted(summary: str | Exception = SUMMARY, *, stop: str = "len(history)"):
    """A root model that prints 3,000 characters a turn until told of a summary (or a note)."""
    summaries: list[list[dict]] = []

    def model(messages: list[dict]) -> str:
        if messages[0]["content"] == SUMMARY_PROMPT:
            summaries.append(messages)
            if isinstance(summary, Exception):
                raise summary
            return summary
        if stop in messages[-2]["content"]:
            return "FINAL(done)"
        if "(Note: to fit your context window" in messages[-1]["content"]:
            return repl("print(len(history), [m.get('turn') for m in history], [m['role'] for m in history])")
        turn = sum(message["role"] == "assistant" for message in messages)
        return repl(f"part{turn} = 'x' * 3000\nprint(part{turn})")

    return model, summaries


@pytest.mark.parametrize("level", LEVELS)
def test_old_turns_are_summarised_and_kept_in_history(level: str) -> None:
    model, summaries = scripted()
    agent, root, _ = make(model, window=4000, sandbox=level, compact=True)
    assert agent.completion(context="abc", query="What is in the parts?") == "done"
    compactions = [event for event in agent.trace if event.type == "compaction"]
    assert [(event.removed_turns, event.summary, event.error) for event in compactions] == [([1, 2], SUMMARY, None)]
    assert "part0 = 'x' * 3000" in summaries[0][1]["content"]  # the summariser read the turns taken out
    last = root.requests[-1]
    assert "4 [1, 1, 2, 2] ['assistant', 'user', 'assistant', 'user']" in last[-1]["content"]
    assert any(f"Summary of turns 1-2:\n{SUMMARY}" in message["content"] for message in last)
    assert agent.cost_summary()["root"]["calls"] == len(root.requests)  # the summary call is counted
    calls = [event for event in agent.trace if event.type == "llm_call"]
    compacted = calls.index(next(call for call in calls if call.removed_turns))
    pairs = zip(calls[compacted:], calls[compacted + 1:])
    assert all(now.prefix_unchanged == before.message_count for before, now in pairs)  # append-only again


def test_a_failed_summary_falls_back_to_dropping_the_turns() -> None:
    down = rlm.ClientError("the server refused", url="http://127.0.0.1/scripted", status=400)
    model, _ = scripted(down)
    agent, root, _ = make(model, window=4000, sandbox="subprocess", compact=True)
    assert agent.completion(context="abc", query="q") == "done"
    (event,) = [event for event in agent.trace if event.type == "compaction"]
    assert event.summary == "" and "the server refused" in event.error
    assert "turns 1-2 of this conversation (your replies" in "\n".join(m["content"] for m in root.requests[-2])


def test_without_compact_old_turns_are_dropped_as_before() -> None:
    model, summaries = scripted()
    agent, _, _ = make(model, window=4000, sandbox="subprocess", compact=False)
    assert agent.completion(context="abc", query="q") == "done"
    assert summaries == [] and not [event for event in agent.trace if event.type == "compaction"]


def test_compaction_starts_at_compact_at_of_the_window() -> None:
    model, summaries = scripted()
    agent, _, _ = make(model, window=40_000, sandbox="subprocess", compact=True, compact_at=0.1)
    assert agent.completion(context="abc", query="q") == "done"  # 10% of 40,000 tokens: the budget is far
    assert len(summaries) == 1


@pytest.mark.parametrize("value", [0, 1.5, "0.8", True])
def test_compact_at_must_be_a_share_of_the_window(value: object) -> None:
    with pytest.raises(ConfigError, match="compact_at must be a share"):
        make(["FINAL(x)"], compact=True, compact_at=value)


def test_in_a_session_history_holds_earlier_answers_then_compacted_turns() -> None:
    model, _ = scripted()
    agent, root, _ = make(model, window=4000, sandbox="subprocess", compact=True)
    with rlm.session(agent) as s:
        s.completion(context="abc", query="q1")
        s.completion(context="def", query="q2")
    printed = "".join(message["content"] for message in root.requests[-1])
    assert "6 [None, None, 1, 1, 2, 2] ['user', 'assistant', 'assistant', 'user'" in printed


def test_a_compacted_run_replays_from_its_trajectory(tmp_path: Path) -> None:
    model, _ = scripted()
    agent, _, _ = make(model, window=4000, sandbox="subprocess", compact=True, log_dir=str(tmp_path))
    assert agent.completion(context="abc", query="q") == "done"
    (path,) = tmp_path.glob("*.jsonl")
    result = replay_run(path, context="abc", sandbox="subprocess")
    assert result.divergence is None, result.describe()


def test_the_readme_example_runs_offline_and_prints_what_it_says(tmp_path: Path) -> None:
    printed, expected = run_readme_example("### Compaction", tmp_path)
    assert printed == expected


def test_the_viewer_and_the_totals_show_the_compaction() -> None:
    from rlm.trajectory import from_events
    from rlm.viewer.model import page_data

    model, _ = scripted()
    agent, root, _ = make(model, window=4000, sandbox="subprocess", compact=True)
    agent.completion(context="abc", query="q")
    trajectory = from_events(agent.trace)
    assert trajectory.totals()["model_calls"] == len(root.requests)
    (turn,) = [turn for turn in trajectory.root.turns if turn.sub_calls]
    assert turn.sub_calls[0]["summary"] == SUMMARY and turn.call["removed_turns"] == [1, 2]
    assert "compaction" in str(page_data(trajectory))
