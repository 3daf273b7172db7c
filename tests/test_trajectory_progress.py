"""Live progress of `rlm ask`: what the terminal view shows, plain lines, and many threads at once."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from helpers import make, read_until_closed, repl
from rlm.cli.exits import ExitCode
from rlm.cli.progress import Progress
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.utils.tracing import CodeExec, LLMCall, RunStart, SubCall

CHUNKS = "chunks = [context[i:i + 1000] for i in range(0, len(context), 1000)]\nr = llm_query_batched(chunks)"
TWO_CELLS = repl(CHUNKS) + "\n" + repl("print(len(r))")
USAGE = {"input_tokens": 100, "output_tokens": 10}


def start(run_id: str = "top", depth: int = 0, parent: str | None = None) -> RunStart:
    return RunStart(run_id=run_id, parent_id=parent, depth=depth, query="q", context={}, root_model="m",
                    sub_model="s", sandbox="inprocess", max_iterations=20, system_prompt="s")


def call(turn: int, reply: str, run_id: str = "top", depth: int = 0, parent: str | None = None) -> LLMCall:
    return LLMCall(run_id=run_id, parent_id=parent, depth=depth, turn=turn, model="m", new_messages=[],
                   message_count=2, prefix_unchanged=1, reply=reply, usage=USAGE, cost=0.001, latency=0.1)


def sub(index: int, size: int | None = 64, cell: int = 1, run_id: str = "top") -> SubCall:
    return SubCall(run_id=run_id, depth=1, turn=1, model="s", prompt="p", reply="r", usage=USAGE, cost=0.0001,
                   latency=0.1, batch_index=index, kind="llm_query_batched" if size else "llm_query", cell=cell,
                   batch_size=size)


def cell_done(index: int) -> CodeExec:
    return CodeExec(run_id="top", turn=1, index=index, code="", stdout="", stderr="", error=None, timed_out=False,
                    restarted=False, duration=0.1)


def shown(progress: Progress) -> str:
    console = Console(width=110, record=True, force_terminal=False)
    console.print(progress._view())
    return console.export_text()


def test_the_live_view_shows_the_turn_the_code_running_the_batch_and_totals() -> None:
    progress = Progress(20, "rich")
    progress(start())
    assert "turn 1/20" in shown(progress) and "waiting for the model" in shown(progress)
    progress(call(1, TWO_CELLS))
    view = shown(progress)
    assert "running cell 1 of 2: chunks = [context[i:i + 1000]" in view and "r = llm_query_batched(chunks)" in view
    for index in range(23):
        progress(sub(index))
    view = shown(progress)
    assert "batch" in view and "23/64" in view and "━" in view
    assert "turn 1/20, 23 sub-calls, 2,640 tokens, $0.0033" in view
    progress(cell_done(1))
    assert "running cell 2 of 2: print(len(r))" in shown(progress)
    progress(cell_done(2))
    assert "waiting for the model's reply" in shown(progress)
    for index in range(23, 64):
        progress(sub(index))
    assert "/64" not in shown(progress)  # a finished batch leaves the view


def test_child_runs_are_counted_but_do_not_move_the_turn() -> None:
    progress = Progress(20, "rich")
    progress(start())
    progress(call(2, "thinking"))
    progress(start("child", depth=1, parent="top"))
    progress(call(5, repl("x = 1"), run_id="child", depth=1, parent="top"))
    assert progress.turn == 2 and progress.child_runs == 1 and progress.tokens == 220
    assert "1 child run(s) started" in shown(progress) and "turn 2/20" in shown(progress)


def test_events_from_many_threads_add_up_exactly() -> None:
    progress = Progress(20, "plain")
    progress(start())
    progress(call(1, "x"))

    def send(thread: int) -> None:
        for index in range(500):
            progress(sub(index, size=500, cell=thread))

    threads = [threading.Thread(target=send, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.sub_calls == 4000 and progress.tokens == 110 + 4000 * 110
    assert progress.cost == pytest.approx(0.001 + 4000 * 0.0001) and progress._batches == {}


def test_plain_lines_per_turn_and_per_finished_batch(capsys: pytest.CaptureFixture[str]) -> None:
    code = "print(llm_query_batched(['a', 'b', 'c']))\nprint(llm_query('single'))"
    with Progress(20, "plain") as progress:
        rlm, _, _ = make([repl(code), "FINAL(done)"], lambda messages: "answer", on_event=progress)
        assert rlm.completion(context="c", query="q") == "done"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "rlm: sandbox: inprocess"
    assert lines[1].startswith("rlm: turn 1/20, 0 sub-calls")
    assert lines[2] == "rlm: turn 1: batch of 3 sub-calls done"
    assert lines[3].startswith("rlm: turn 2/20, 4 sub-calls") and lines[4].startswith("rlm: answered after 2 turn(s)")
    assert len(lines) == 5


def test_quiet_shows_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress.for_stderr(20, quiet=True) as progress:
        script = [repl("print(llm_query_batched(['a', 'b']))"), "FINAL(done)"]
        rlm, _, _ = make(script, lambda messages: "x", on_event=progress)
        rlm.completion(context="c", query="q")
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_the_live_view(tmp_path: Path) -> None:
    context = tmp_path / "context.txt"
    context.write_text("".join(f"w{i:04d} " for i in range(1333)), encoding="utf-8")  # 8 different chunks
    answered = iter(range(100))

    def slow(request: dict) -> FakeReply:  # the batch's replies come back one by one, 0.15 s apart
        return FakeReply(content="found", delay=0.15 * next(answered))

    master, slave = pty.openpty()
    with FakeOpenAIServer(root=[TWO_CELLS, "FINAL(8)"], sub=slow, latency=0.3) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLM_")} | {"PYTHONWARNINGS": "error"}
        process = subprocess.Popen(
            [sys.executable, "-m", "rlm", "ask", "q", "--context", str(context), "--api-url", server.url,
             "--sandbox", "inprocess"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        terminal = read_until_closed(master, time.monotonic() + 30)
        assert process.wait(timeout=30) == ExitCode.ANSWERED
        assert process.stdout.read() == b"8\n"
        process.stdout.close()
    assert b"running cell 1 of 2" in terminal and b"llm_query_batched" in terminal
    assert b"batch" in terminal and b"/8" in terminal and b"answered after 2 turn(s)" in terminal
