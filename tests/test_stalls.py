"""Replies that make no progress: a reply cut at the reply cap with no code and no FINAL, or one
that repeats the previous reply, gets a pointed note; three in a row stop the run (no_progress)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

import rlm
from helpers import last_user, make, repl
from rlm.cli.exits import ExitCode
from rlm.cli.main import app
from rlm.parsing import parse_reply
from rlm.rlm_repl import RLM_REPL
from rlm.stalls import STALL_LIMIT, StallWatch
from rlm.testing import FakeOpenAIServer, FakeReply, ScriptedModel
from rlm.usage import Usage
from rlm.utils.llm import Completion

RAMBLE = "I am a REPL. I am a REPL. I am a REPL. " * 20


def capped(text: str = RAMBLE) -> FakeReply:
    return FakeReply(content=text, finish_reason="length")


def completion(text: str, finish: str | None = "stop") -> Completion:
    return Completion(text=text, usage=Usage(), model="m", latency=0.0, finish_reason=finish)


def test_the_watch_counts_only_replies_in_a_row() -> None:
    watch = StallWatch()
    ramble = completion(RAMBLE, "length")
    assert "reply length limit" in watch.check(ramble, parse_reply(RAMBLE))
    assert watch.in_a_row == 1 and not watch.stalled
    code = repl("print(1)")
    assert watch.check(completion(code), parse_reply(code)) is None  # progress: the count starts again
    assert watch.in_a_row == 0
    assert watch.check(completion(code), parse_reply(code)).startswith("Your reply repeats your previous one")
    assert watch.check(completion(code), parse_reply(code)) is not None
    assert watch.check(ramble, parse_reply(RAMBLE)) is not None
    assert watch.stalled and watch.in_a_row == STALL_LIMIT == 3
    assert "no progress in 3 replies in a row" in watch.reason and "repeated the previous reply" in watch.reason


def test_a_capped_reply_with_code_or_an_answer_is_progress() -> None:
    watch = StallWatch()
    for text in (repl("print(1)") + " and then I kept talking", "FINAL(42) and then some more words"):
        assert watch.check(completion(text, "length"), parse_reply(text)) is None


def test_three_capped_rambles_stop_the_run_as_no_progress_with_notes_between() -> None:
    with FakeOpenAIServer(root=[capped(), capped(RAMBLE + "!"), capped(RAMBLE + "?"), "FINAL(never)"]) as server:
        with RLM_REPL("m", "m", api_url=server.url, sandbox="inprocess", max_iterations=10) as engine:
            result = engine.run(context="c", query="q")
        requests = server.chat_requests(root=True)
    assert len(requests) == 3  # the fourth turn was never asked for
    for request in requests[1:]:
        assert "reached the reply length limit" in request["messages"][-1]["content"]
    assert result.status == "no_progress" and result.answer is None and result.iterations == 3
    assert "no progress in 3 replies in a row" in result.reason and "reply cap" in result.reason
    end = [event for event in engine.trace if event.type == "run_end"][0]
    assert end.status == "no_progress" and end.reason == result.reason


def test_a_repeated_reply_is_pointed_out_and_three_stop_the_run() -> None:
    same = repl("print('same')")
    rlm_repl, root, _ = make([same] * 5 + ["FINAL(late)"], max_iterations=10)
    assert rlm_repl.completion(context="c", query="q") is None
    assert len(root.requests) == 4  # the first reply, then three repeats of it
    assert "repeats your previous one" in last_user(root.requests[2])
    assert "repeats your previous one" not in last_user(root.requests[1])


def test_rlm_ask_exits_1_with_the_reason_and_json_says_no_progress(tmp_path: Path) -> None:
    context = tmp_path / "context.txt"
    context.write_text("some context\n", encoding="utf-8")
    with FakeOpenAIServer(root=[capped()] * 6) as server:
        args = ["ask", "q", "--context", str(context), "--api-url", server.url, "--sandbox", "inprocess"]
        plain = CliRunner().invoke(app, args)
        as_json = CliRunner().invoke(app, [*args, "--json"])
    assert plain.exit_code == as_json.exit_code == ExitCode.NO_ANSWER
    last = plain.stderr.strip().splitlines()[-1]
    assert "no progress in 3 replies in a row" in last and "stopped after 3 turn(s)" in last and "--model" in last
    report = json.loads(as_json.stdout)
    assert report["status"] == "no_progress" and report["turns"] == 3 and "no progress" in report["reason"]


def test_run_reports_no_progress_as_its_own_status() -> None:
    client = ScriptedModel([repl("x = 1")] * 4)
    result = rlm.run(context="c", query="q", client=client, sub_client=client, sandbox="inprocess")
    assert result.status == "no_progress" and result.reason and result.error is None
