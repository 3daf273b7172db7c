"""`rlm batch` on this machine, against the fake OpenAI-compatible server on 127.0.0.1: every
item answered once, resumed after failures and after a driver killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import pytest
import typer
from typer.testing import CliRunner

import rlm.batch
from rlm.cli.cluster import RAY_OPTION, OptionalRayValue
from rlm.cli.exits import ExitCode
from rlm.cli.main import app
from rlm.errors import EndpointUnreachable
from rlm.testing import FakeOpenAIServer, FakeReply, is_root_request, message_text
from test_async import InFlight

FENCE = "```"
INPROCESS = {"sandbox": "inprocess"}


class Model(InFlight):
    """A scripted model: the root answers "answer <QID>" (after one cell reading the context when
    the question asks for it); some ids fail with HTTP 400 until `heal()`; `peak` counts the
    calls it answered at once, `asked` each item's first questions."""

    def __init__(self, *, delay: float = 0.0, failing: tuple[str, ...] = ()) -> None:
        super().__init__(delay, answer=self._reply)
        self.failing = set(failing)
        self.asked: Counter[str] = Counter()

    def heal(self) -> None:
        self.failing.clear()

    def _reply(self, request: dict) -> FakeReply:
        if not is_root_request(request):
            return FakeReply("sub")
        messages = request["messages"]
        qid = re.search(r"QID-(\w+)", message_text(messages[1])).group(1)
        turns = sum(1 for message in messages if message["role"] == "assistant")
        with self._lock:
            self.asked[qid] += turns == 0
        if qid in self.failing:
            return FakeReply(status=400, content="refused")
        if "READ" in message_text(messages[1]) and turns == 0:
            return FakeReply(f"{FENCE}repl\nFINAL('read ' + context.strip())\n{FENCE}")
        if "NEVER" in message_text(messages[1]):
            return FakeReply(f"{FENCE}repl\nx = 1\n{FENCE}")
        return FakeReply(f"FINAL(answer {qid} by {request['model']})")


def questions(path: Path, count: int, **extra: object) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({"id": f"q{index}", "query": f"what is QID-q{index}?", "context": "ctx",
                                     **extra}) + "\n")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def answered_once(path: Path, count: int) -> None:
    finals = Counter(line["id"] for line in lines(path) if line["status"] != "error")
    assert finals == Counter({f"q{index}": 1 for index in range(count)})


def test_every_item_is_answered_once_and_a_rerun_runs_nothing(tmp_path):
    model = Model(delay=0.05)
    source = questions(tmp_path / "q.jsonl", 8)
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=model) as server:
        options = {**INPROCESS, "api_url": server.url}
        plans, seen = [], []
        summary = rlm.batch.run(source, out=out, concurrency=3, options=options,
                                on_plan=lambda *plan: plans.append(plan), on_result=seen.append)
        again = rlm.batch.run(source, out=out, concurrency=3, options=options)
    assert plans == [(8, 0, 0)] and len(seen) == 8
    assert (summary.items, summary.answered, summary.failed, summary.pending, summary.ran) == (8, 8, 0, 0, 8)
    assert summary.complete and summary.cost == 0.0 and summary.cost_complete
    assert (again.ran, again.skipped, again.answered) == (0, 8, 8)
    assert model.peak <= 3 and sum(model.asked.values()) == 8
    answered_once(out, 8)
    first = lines(out)[0]
    assert tuple(first) == rlm.batch.FIELDS and first["answer"] == f"answer {first['id']} by fake-model"
    assert first["usage"]["root"]["calls"] == 1 and first["wall_time"] > 0
    trajectory = Path(first["trajectory"])
    assert trajectory.parent == tmp_path / "a.runs" and trajectory.is_file()
    assert json.loads((tmp_path / "a.batch.json").read_text())["input"]["items"] == 8


def test_failed_items_are_recorded_and_run_again_only_when_asked(tmp_path):
    model = Model(failing=("q1", "q4"))
    source = questions(tmp_path / "q.jsonl", 6)
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=model) as server:
        options = {**INPROCESS, "api_url": server.url, "max_retries": 0}
        first = rlm.batch.run(source, out=out, options=options)
        model.heal()
        plans = []
        skipped = rlm.batch.run(source, out=out, options=options, on_plan=lambda *plan: plans.append(plan))
        retried = rlm.batch.run(source, out=out, options=options, retry_failed=True)
    assert (first.answered, first.failed, first.complete) == (4, 2, False)
    assert [item for item, _ in first.failures] == ["q1", "q4"] and "HTTP 400" in first.failures[0][1]
    assert plans == [(0, 4, 2)] and skipped.ran == 0 and skipped.failed == 2
    assert (retried.ran, retried.answered, retried.failed, retried.complete) == (2, 6, 0, True)
    statuses = [(line["id"], line["status"]) for line in lines(out)]
    assert statuses.count(("q1", "error")) == 1 and statuses.count(("q1", "final")) == 1
    answered_once(out, 6)


def test_per_item_options_and_contexts_by_path(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("from the file\n", encoding="utf-8")
    source = tmp_path / "q.jsonl"
    source.write_text("\n".join(json.dumps(item) for item in [
        {"id": "read", "query": "READ QID-read", "context_path": "docs/a.txt"},
        {"id": "other", "query": "QID-other", "context": "c", "model": "model-b"},
        {"id": 3, "query": "NEVER QID-3", "context": {"k": [1, 2]}, "max_iterations": 2},
        {"id": "gone", "query": "READ QID-gone", "context_path": "docs/missing.txt"},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=Model()) as server:
        summary = rlm.batch.run(source, out=out, options={"api_url": server.url, "model": "model-a"},
                                log_dir="")
    found = {line["id"]: line for line in lines(out)}
    assert found["read"]["answer"] == "read from the file"  # read by the item's own sandboxed worker
    assert found["other"]["answer"] == "answer other by model-b"
    assert (found[3]["status"], found[3]["answer"]) == ("max_iterations", None)
    assert found["gone"]["status"] == "error" and "ContextError" in found["gone"]["error"]
    assert all(line["trajectory"] is None for line in found.values())
    assert (summary.answered, summary.no_answer, summary.failed) == (2, 1, 1)


def test_nothing_runs_when_the_endpoint_is_down_or_the_out_file_is_the_input(tmp_path):
    source = questions(tmp_path / "q.jsonl", 3)
    with FakeOpenAIServer(responder=Model()) as server:
        url = server.url
    with pytest.raises(EndpointUnreachable):
        rlm.batch.run(source, out=tmp_path / "a.jsonl", options={**INPROCESS, "api_url": url, "max_retries": 0})
    assert (tmp_path / "a.jsonl").read_text() == ""
    with pytest.raises(rlm.ConfigError, match="is the questions file itself"):
        rlm.batch.run(source, out=source, options=INPROCESS)
    with pytest.raises(rlm.ConfigError, match="concurrency must be"):
        rlm.batch.run(source, out=tmp_path / "b.jsonl", concurrency=0)
    with pytest.raises(rlm.ConfigError, match="unknown option 'temperature'"):
        rlm.batch.run(source, out=tmp_path / "b.jsonl", options={"temperature": 0})


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr
    return result


def test_the_command_prints_a_summary_and_exits_by_how_the_batch_stands(tmp_path):
    model = Model(failing=("q2",))
    source = questions(tmp_path / "q.jsonl", 4)
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=model) as server:
        common = [str(source), "--out", str(out), "--api-url", server.url, "--sandbox", "inprocess",
                  "--max-retries", "0"]
        failed = invoke("batch", *common, "-j", "2")
        model.heal()
        changed = invoke("batch", *common, "--max-iterations", "3")
        done = invoke("batch", *common, "--retry-failed", "--json")
    assert failed.exit_code == ExitCode.BATCH_INCOMPLETE
    assert "4 items: 3 answered, 0 without an answer, 1 failed" in failed.stdout
    assert "failed: q2: ClientError" in failed.stdout and "--retry-failed" in failed.stderr
    assert "[4/4]" in failed.stderr and "sandbox: inprocess" in failed.stderr
    assert changed.exit_code == ExitCode.BAD_INPUT and "--max-iterations 20 (now 3)" in changed.stderr
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["answered"], report["ran"], report["skipped"], report["complete"]) == (4, 1, 3, True)
    assert "resuming: 3 item(s) done before, 1 failed" not in done.stderr  # retried: not counted as left out
    answered_once(out, 4)


def test_the_command_refuses_a_bad_line_before_running_anything(tmp_path):
    source = tmp_path / "q.jsonl"
    source.write_text('{"id": "a", "query": "q", "context": "c"}\n{"id": "b", "query": "q"}\n', encoding="utf-8")
    result = invoke("batch", str(source), "--out", str(tmp_path / "a.jsonl"), "--sandbox", "inprocess")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert f"{source}, line 2: give the context either inline" in result.stderr
    assert not (tmp_path / "a.jsonl").exists()
    both = invoke("batch", str(source), "--out", str(tmp_path / "a.jsonl"), "--no-logs", "--log-dir", "x")
    assert both.exit_code == ExitCode.BAD_INPUT and "--no-logs and --log-dir" in both.stderr


def test_a_bare_ray_option_means_a_local_ray_and_takes_an_address_otherwise():
    seen = []
    demo = typer.Typer()

    @demo.command(cls=OptionalRayValue)
    def show(ray: Annotated[Optional[str], RAY_OPTION] = None, out: str = "") -> None:
        seen.append(ray)

    @demo.command()
    def other() -> None:  # two commands: `show` is named, as `batch` is
        pass

    existing = str(Path(__file__))
    for args in (["--ray"], ["--ray", "--out", "a"], ["--ray", "ray://h:10001"], ["--ray=auto"], ["--out", "a"],
                 ["--ray", existing], ["--out", "a", "--", "--ray"]):
        result = CliRunner().invoke(demo, ["show", *args])
        assert result.exit_code == (2 if existing in args or "--" in args else 0), result.output
    assert seen == ["local", "local", "ray://h:10001", "auto", None]


def test_a_driver_killed_mid_run_loses_only_what_was_in_flight(tmp_path):
    """SIGKILL the `rlm batch` process (default sandbox) while items run; tear the last line as a
    kill inside a write would; run again: every id is answered exactly once."""
    count = 12
    model = Model(delay=0.3)
    source = questions(tmp_path / "q.jsonl", count)
    out = tmp_path / "a.jsonl"
    with FakeOpenAIServer(responder=model) as server:
        command = [sys.executable, "-m", "rlm", "batch", str(source), "--out", str(out), "--api-url", server.url,
                   "-j", "3", "--quiet"]
        driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (not out.exists() or len(out.read_bytes().splitlines()) < 3) and time.monotonic() < deadline:
            assert driver.poll() is None, driver.stderr.read().decode()
            time.sleep(0.02)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        driver.stderr.close()
        before = lines(out)
        assert 3 <= len(before) < count
        with open(out, "ab") as handle:
            handle.write(b'{"id": "q11", "answer": "answer q1')  # a line cut short by a kill inside its write
        rerun = subprocess.run(command[:-1] + ["--json"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["repaired_bytes"] == len(b'{"id": "q11", "answer": "answer q1')
    assert (report["skipped"], report["ran"], report["answered"]) == (len(before), count - len(before), count)
    answered_once(out, count)
    assert max(model.asked.values()) <= 2  # only the items in flight at the kill were asked twice
