"""`rlm ask --session NAME`: a session continued across invocations, against the fake server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlm.cli.main import app
from rlm.testing import FakeOpenAIServer

LEVELS = ["subprocess", "strict", "bwrap"]


def ask(server: FakeOpenAIServer, runs: Path, context: Path, query: str, *extra: str):
    args = ["ask", query, "-c", str(context), "--api-url", server.url, "--log-dir", str(runs), "--session", "work",
            *extra]
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize("level", LEVELS)
def test_a_named_session_continues_with_its_contexts_history_and_variables(tmp_path: Path, level: str) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("alpha beta", encoding="utf-8")
    second.write_text("gamma", encoding="utf-8")
    script = [
        "```repl\nwords = context.split()\n```", "FINAL_VAR(words)",
        "```repl\nprint(words, context_0, context_1, history[0]['content'])\n```", "FINAL(ok)",
    ]
    with FakeOpenAIServer(root=script) as server:
        one = ask(server, tmp_path / "runs", first, "Which words?", "--sandbox", level)
        two = ask(server, tmp_path / "runs", second, "And now?", "--sandbox", level)
        requests = server.requests
    assert (one.exit_code, one.stdout, two.exit_code, two.stdout) == (0, "['alpha', 'beta']\n", 0, "ok\n")
    output = requests[-1]["messages"][-1]["content"]
    assert "['alpha', 'beta'] alpha beta gamma Which words?" in output
    kept = json.loads((tmp_path / "runs" / "sessions" / "work" / "session.json").read_text())
    assert kept["contexts"] == ["context_0.txt", "context_1.txt"] and len(kept["history"]) == 4


def test_variables_made_with_sub_calls_are_said_to_be_gone(tmp_path: Path) -> None:
    context = tmp_path / "a.txt"
    context.write_text("text", encoding="utf-8")
    script = [
        "```repl\nnote = llm_query('read it')\n```", "FINAL(first)",
        "```repl\nprint('note' in dir(), context_0)\n```", "FINAL(second)",
    ]
    with FakeOpenAIServer(root=script, sub=["a note"]) as server:
        ask(server, tmp_path / "runs", context, "q1", "--sandbox", "subprocess")
        result = ask(server, tmp_path / "runs", context, "q2", "--sandbox", "subprocess")
        output = server.requests[-1]["messages"][-1]["content"]
    assert result.stdout == "second\n"
    assert "the REPL variables of earlier questions are gone" in result.stderr
    assert "False text" in output
    assert "questions are gone" in server.requests[-2]["messages"][1]["content"]


def test_a_bad_session_name_is_refused(tmp_path: Path) -> None:
    context = tmp_path / "a.txt"
    context.write_text("text", encoding="utf-8")
    with FakeOpenAIServer(root=["FINAL(x)"]) as server:
        result = CliRunner().invoke(app, ["ask", "q", "-c", str(context), "--api-url", server.url, "--session", "../x"])
    assert result.exit_code != 0 and "session name" in result.stderr


def test_a_cell_failing_when_run_again_is_reported_and_failed_cells_are_not_run_again(tmp_path: Path) -> None:
    context = tmp_path / "a.txt"
    context.write_text("text", encoding="utf-8")
    marker = tmp_path / "marker"
    marker.write_text("1", encoding="utf-8")
    script = [
        "```repl\nundefined_name\n```",  # fails the first time: not run again
        f"```repl\nkept = open({str(marker)!r}).read()\n```", "FINAL(first)",
        "```repl\nprint('kept' in dir())\n```", "FINAL(second)",
    ]
    with FakeOpenAIServer(root=script) as server:
        ask(server, tmp_path / "runs", context, "q1", "--sandbox", "subprocess")
        marker.unlink()
        result = ask(server, tmp_path / "runs", context, "q2", "--sandbox", "subprocess")
    assert result.stdout == "second\n"
    assert "cell 1 of 1 failed when run again: FileNotFoundError" in result.stderr
