"""Replay: a recorded run served from its file, and the first divergence when the code changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from typer.testing import CliRunner

from helpers import make, repl
from rlm.cli.exits import ExitCode
from rlm.cli.main import app
from rlm.replay import ReplayDiverged, replay_run
from rlm.rlm_repl import RLM_REPL
from rlm.testing import replay_clients
from rlm.trajectory import load
from rlm.utils.llm import LLMClient

DATA = Path(__file__).parent / "data"
RECORDING = DATA / "recorded_run.jsonl"
CONTEXT = DATA / "recorded_context.txt"
QUESTION = "Which line holds the secret number, and what is it?"
ANSWER = "line 27 holds the secret number 4711"
RERECORD = "if this change was deliberate, record again: python tests/data/record_run.py"


def test_the_recorded_run_replays_identically_with_the_test_clients() -> None:
    session = replay_clients(RECORDING)
    assert isinstance(session.root, LLMClient) and isinstance(session.sub, LLMClient)
    rlm = RLM_REPL(client=session.root, sub_client=session.sub, sandbox="inprocess", max_depth=2, max_iterations=6)
    answer = rlm.completion(context=CONTEXT, query=QUESTION)
    try:
        session.assert_same(answer)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{RERECORD}") from None
    assert answer == ANSWER
    assert [e.depth for e in rlm.trace if e.type == "run_start"] == [0, 1, 1]
    assert session.recording.trajectory.totals()["sub_calls"] == sum(1 for e in rlm.trace if e.type == "sub_call")


def test_replay_run_uses_the_recorded_settings_and_any_sandbox() -> None:
    result = replay_run(RECORDING, CONTEXT, sandbox="subprocess")  # the code really runs again, isolated
    assert result.divergence is None, f"{result.describe()}\n{RERECORD}"
    assert (result.answer, result.status, result.turns) == (ANSWER, "answered", 4)
    assert "matched the recording" in result.describe()


def test_a_changed_chunk_shows_up_as_an_unknown_sub_call_prompt(tmp_path: Path) -> None:
    context = tmp_path / "changed.txt"
    context.write_text(CONTEXT.read_text(encoding="utf-8").replace("4711", "4712"), encoding="utf-8")
    result = replay_run(RECORDING, context)
    assert result.divergence is not None and result.divergence.kind == "sub_call"
    described = result.describe()
    assert "not in the recording" in described and "4712" in described and "4711" in described


def test_a_change_in_the_feedback_is_found_at_the_turn_it_reaches_the_model(tmp_path: Path) -> None:
    context = tmp_path / "shifted.txt"
    original = CONTEXT.read_text(encoding="utf-8")
    context.write_text(original.replace("line 1:", "LINE 1:", 1), encoding="utf-8")  # same size
    result = replay_run(RECORDING, context)
    divergence = result.divergence
    assert divergence is not None and (divergence.kind, divergence.turn) == ("root_request", 2)
    assert divergence.run_id == json.loads(RECORDING.read_text(encoding="utf-8").splitlines()[0])["run_id"]
    assert "LINE 1:" in divergence.now and "line 1:" in divergence.recorded


def test_a_context_of_another_size_is_reported(tmp_path: Path) -> None:
    context = tmp_path / "longer.txt"
    context.write_text(CONTEXT.read_text(encoding="utf-8") + "one more line\n", encoding="utf-8")
    divergence = replay_run(RECORDING, context).divergence
    assert divergence is not None and divergence.kind == "context"


def _edited(tmp_path: Path, change: Callable[[list[dict]], list[dict]]) -> Path:
    events = [json.loads(line) for line in RECORDING.read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in change(events)), encoding="utf-8")
    return path


def test_a_different_final_answer_is_a_divergence(tmp_path: Path) -> None:
    def new_answer(events: list[dict]) -> list[dict]:
        last_call = [e for e in events if e["type"] == "llm_call" and e["depth"] == 0][-1]
        last_call["reply"] = "FINAL(line 28)"
        return events

    result = replay_run(_edited(tmp_path, new_answer), CONTEXT)
    assert result.answer == "line 28"
    assert result.divergence is not None and result.divergence.kind == "answer"
    assert "line 28" in result.describe() and ANSWER in result.describe()


def test_a_turn_the_recording_lacks_is_a_divergence(tmp_path: Path) -> None:
    def cut_after_turn_3(events: list[dict]) -> list[dict]:
        root_calls = [i for i, e in enumerate(events) if e["type"] == "llm_call" and e["depth"] == 0]
        position = root_calls[3]  # turn 4
        return events[:position]

    result = replay_run(_edited(tmp_path, cut_after_turn_3), CONTEXT)
    assert result.divergence is not None and (result.divergence.kind, result.divergence.turn) == ("extra_turn", 4)
    assert result.status == "error"


def _request(run: Any, turn: int) -> list[dict]:
    """The messages a recorded run sent for `turn` (system prompt, then each turn's new messages and reply)."""
    messages = [{"role": "system", "content": run.start["system_prompt"]}]
    for number in range(1, turn + 1):
        call = run.turns[number - 1].call
        messages += call["new_messages"] + ([{"role": "assistant", "content": call["reply"]}] if number < turn else [])
    return messages


def test_child_runs_asked_the_same_question_are_each_served(tmp_path: Path) -> None:
    def sub(messages: list[dict]) -> str:
        if messages[0]["role"] == "system":
            if not any(m["role"] == "assistant" for m in messages):
                return repl("print(context)")
            return "FINAL(saw abc)" if "abc" in messages[-1]["content"] else "FINAL(saw xyz)"
        return "leaf"

    code = "print(rlm_query_batched(['same question', 'same question'], ['abc', 'xyz']))"
    rlm, _, _ = make([repl(code), "FINAL(done)"], sub, max_depth=2, log_dir=str(tmp_path))
    assert rlm.completion(context="c", query="q") == "done"
    children = sorted(load(rlm.tracer.path).root.turns[0].cells[0].children, key=lambda r: r.start["batch_index"])
    assert [child.answer for child in children] == ["saw abc", "saw xyz"]
    # Both runs asked the same first question; the second one's turn 2, asked first, gets its own reply.
    session = replay_clients(rlm.tracer.path)
    assert session.sub.complete(_request(children[1], 2)).text == "FINAL(saw xyz)"
    assert session.sub.complete(_request(children[0], 2)).text == "FINAL(saw abc)"
    session = replay_clients(rlm.tracer.path)
    again = RLM_REPL(client=session.root, sub_client=session.sub, sandbox="inprocess", max_depth=2)
    session.assert_same(again.completion(context="c", query="q"))
    assert sum(1 for e in again.trace if e.type == "llm_call") == 6


def test_a_diverged_call_fails_the_run_and_is_kept() -> None:
    session = replay_clients(RECORDING)
    rlm = RLM_REPL(client=session.root, sub_client=session.sub, sandbox="inprocess", max_depth=2)
    with pytest.raises(ReplayDiverged) as caught:
        rlm.completion(context="an entirely different context", query=QUESTION)
    assert caught.value.divergence is session.divergence
    with pytest.raises(AssertionError, match="replay diverged"):
        session.assert_same(None, "error")


# -- the command ----------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_rlm_replay_exits_0_when_identical_and_6_when_diverged(tmp_path: Path) -> None:
    same = invoke("replay", str(RECORDING), "--context", str(CONTEXT))
    assert same.exit_code == ExitCode.ANSWERED, same.stderr
    assert same.stdout.startswith("replay matched the recording: 4 turn(s)")
    changed = tmp_path / "changed.txt"
    changed.write_text(CONTEXT.read_text(encoding="utf-8").replace("4711", "4712"), encoding="utf-8")
    diverged = invoke("replay", str(RECORDING), "--context", str(changed), "--json")
    assert diverged.exit_code == ExitCode.REPLAY_DIVERGED == 6
    report = json.loads(diverged.stdout)
    assert report["identical"] is False and report["divergence"]["kind"] == "sub_call"
    missing = invoke("replay", str(tmp_path / "nope.jsonl"), "--context", str(CONTEXT))
    assert missing.exit_code == ExitCode.BAD_INPUT and "nope.jsonl" in missing.stderr
