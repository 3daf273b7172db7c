"""A replay of an unchanged run matches it, however the run's conversation was fitted: old turns
removed, a server's refusal retried, a run ended by the window, a run stopped for no progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import make, repl
from rlm.cli.exits import ExitCode
from rlm.cli.main import app
from rlm.errors import ContextWindowExceeded
from rlm.replay import replay_run
from rlm.rlm_repl import RLM_REPL
from rlm.testing import FakeOpenAIServer, replay_clients
from rlm.trajectory import load

CONTEXT = "The ledger: " + "entry; " * 200


def printing(turn: int, size: int = 2_000) -> str:
    return repl(f"print('{turn % 10}' * {size})  # turn {turn}")


def replay_cli(path: Path, tmp_path: Path, context: str = CONTEXT) -> object:
    file = tmp_path / "context.txt"
    file.write_text(context, encoding="utf-8")
    return CliRunner().invoke(app, ["replay", str(path), "--context", str(file), "--json"])


def test_a_run_whose_old_turns_were_removed_replays_identically(tmp_path: Path) -> None:
    replies = [printing(turn) for turn in range(1, 13)] + ["FINAL(fitted)"]
    recorded, _, _ = make(replies, window=4_000, log_dir=str(tmp_path), compact=False)
    assert recorded.completion(context=CONTEXT, query="q") == "fitted"
    trajectory = load(recorded.tracer.path)
    assert trajectory.root.start["context_window"] == 4_000  # the window the server reported, recorded
    assert any(turn.call["removed_turns"] for turn in trajectory.root.turns)

    session = replay_clients(recorded.tracer.path)
    assert session.root.context_window() == 4_000
    again = RLM_REPL(client=session.root, sub_client=session.sub, sandbox="inprocess", compact=False)
    session.assert_same(again.completion(context=CONTEXT, query="q"))
    done = replay_cli(recorded.tracer.path, tmp_path)
    assert done.exit_code == ExitCode.ANSWERED, done.stdout + done.stderr
    assert json.loads(done.stdout)["identical"] is True


def test_a_run_with_a_refusal_retried_replays_identically(tmp_path: Path) -> None:
    script = [printing(turn, 1_500) for turn in range(1, 9)] + ["FINAL(done)"]
    with FakeOpenAIServer(root=script, enforced_window=3_000) as server:
        with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", max_reply_tokens=200,
                      log_dir=str(tmp_path)) as recorded:
            assert recorded.completion(context=CONTEXT, query="q") == "done"
    assert any(event.overflow for event in recorded.trace if event.type == "llm_call")
    result = replay_run(recorded.tracer.path, CONTEXT, sandbox="inprocess")
    assert result.divergence is None, result.describe()
    assert (result.answer, result.status) == ("done", "answered")


def test_a_run_ended_by_the_window_replays_identically(tmp_path: Path) -> None:
    with FakeOpenAIServer(root=[printing(1, 3_000), "FINAL(never)"], enforced_window=1_300) as server:
        with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", max_reply_tokens=100,
                      log_dir=str(tmp_path)) as recorded:
            with pytest.raises(ContextWindowExceeded):
                recorded.completion(context=CONTEXT, query="q " * 1_000)
    result = replay_run(recorded.tracer.path, CONTEXT, sandbox="inprocess")
    assert result.divergence is None, result.describe()
    assert result.status == "error"


def test_a_run_stopped_for_no_progress_replays_identically(tmp_path: Path) -> None:
    recorded, _, _ = make([repl("x = 1")] * 4, log_dir=str(tmp_path))  # a reply, then three repeats of it
    assert recorded.completion(context=CONTEXT, query="q") is None
    done = replay_cli(recorded.tracer.path, tmp_path)
    assert done.exit_code == ExitCode.ANSWERED, done.stdout
    report = json.loads(done.stdout)
    assert report["identical"] is True and report["status"] == "no_progress"
