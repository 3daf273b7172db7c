"""The `rlm` command line, run for real against the fake OpenAI-compatible server on 127.0.0.1.

A few cases run `python -m rlm` in a subprocess (end to end: entry point, exit status, Ctrl-C,
a terminal on stderr); the rest call the typer app in-process through its CliRunner.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rlm
from rlm.cli.exits import ExitCode, failure_for
from rlm.errors import ClientError, ConfigError, ContextError, EndpointUnreachable, RLMError, SandboxError
from rlm.cli.main import app
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.utils.prompts import system_prompt

from helpers import read_until_closed

LENGTH_THEN_42 = ["```repl\nprint(len(context))\n```", "FINAL(42)"]
CONTEXT_TEXT = "The magic number is 42. " * 40


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text(CONTEXT_TEXT, encoding="utf-8")
    return path


def closed_port_url() -> str:
    """A /v1 URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None):
    """Run the app in-process; a crash (anything but an exit) fails the test with its traceback."""
    result = CliRunner().invoke(app, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr
    return result


def run_module(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlm", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=_child_env(),
    )


def _child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    env["PYTHONWARNINGS"] = "error"
    return env


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# -- end to end, in a subprocess ---------------------------------------------------------------


def test_python_m_rlm_version() -> None:
    done = run_module("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"rlm {rlm.__version__}\n"


def test_ask_prints_the_answer_alone_and_exits_0(context_file: Path) -> None:
    with FakeOpenAIServer(root=LENGTH_THEN_42) as server:
        done = run_module("ask", "How long is it?", "--context", str(context_file), "--api-url", server.url)
        second_turn = json.dumps(server.chat_requests(root=True)[1]["messages"])
    assert done.returncode == ExitCode.ANSWERED, done.stderr
    assert done.stdout == "42\n"
    assert str(len(CONTEXT_TEXT)) in second_turn  # the REPL read the file itself
    assert "turn 1/20" in done.stderr and "Traceback" not in done.stderr


def test_unreachable_endpoint_exits_3_with_one_line_naming_the_url_and_the_flag(context_file: Path) -> None:
    url = closed_port_url()
    done = run_module("ask", "q", "--context", str(context_file), "--api-url", url, "--max-retries", "0")
    assert done.returncode == ExitCode.ENDPOINT
    assert done.stdout == ""
    message = one_line(done.stderr)
    assert url in message and "--api-url" in message
    assert "RLM_API_URL" not in message  # the user set the flag: the message is about the flag


def test_ctrl_c_exits_130_without_traceback(context_file: Path) -> None:
    with FakeOpenAIServer(root=[FakeReply(content="FINAL(late)", delay=30)]) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlm", "ask", "q", "--context", str(context_file), "--api-url", server.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
        )
        deadline = time.monotonic() + 30
        while not server.chat_requests(root=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == ExitCode.INTERRUPTED
    assert stdout == ""
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_sigterm_exits_130_and_leaves_no_scratch_directory(context_file: Path, tmp_path: Path) -> None:
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    with FakeOpenAIServer(root=[FakeReply(content="FINAL(late)", delay=5)]) as server:
        process = subprocess.Popen(  # a level whose scratch is on the host's disk (bwrap's is in memory)
            [sys.executable, "-m", "rlm", "ask", "q", "--context", str(context_file), "--api-url", server.url,
             "--sandbox", "subprocess"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**_child_env(), "TMPDIR": str(scratch_root)},
        )
        try:
            deadline = time.monotonic() + 30
            while not server.chat_requests(root=True) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert server.chat_requests(root=True), "the run never asked the model"
            assert len(list(scratch_root.glob("rlm-session-*"))) == 1  # the worker's, while the run goes on
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            stdout, stderr = process.communicate(timeout=10)
            took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert took < 4
    assert stdout == ""
    assert "interrupted" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert list(scratch_root.glob("rlm-session-*")) == []


def test_status_on_a_terminal_is_a_rich_line_on_stderr(context_file: Path) -> None:
    master, slave = pty.openpty()
    with FakeOpenAIServer(root=LENGTH_THEN_42, latency=0.3) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlm", "ask", "q", "--context", str(context_file), "--api-url", server.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=_child_env(),
        )
        os.close(slave)
        terminal = read_until_closed(master, deadline=time.monotonic() + 60)
        stdout = process.stdout.read()
        process.stdout.close()
        assert process.wait(timeout=30) == ExitCode.ANSWERED
    assert stdout == b"42\n"
    assert b"turn 1/20" in terminal and b"\x1b[" in terminal  # drawn with terminal control codes
    assert b"answered after 2 turn(s)" in terminal and b"Traceback" not in terminal


# -- rlm ask, in-process ----------------------------------------------------------------------


def test_json_output_has_the_answer_status_and_costs(context_file: Path) -> None:
    script = ["```repl\nx = llm_query('summarise')\nprint(x)\n```", "FINAL(42)"]
    with FakeOpenAIServer(root=script, sub=["a summary"]) as server:
        result = invoke("ask", "q", "--context", str(context_file), "--api-url", server.url, "--json")
    assert result.exit_code == ExitCode.ANSWERED
    report = json.loads(result.stdout)
    assert report["answer"] == "42" and report["status"] == "answered" and report["error"] is None
    assert report["turns"] == 2 and report["duration"] > 0 and report["run_id"]
    costs = report["cost_summary"]
    assert isinstance(costs["total_cost"], float)
    assert costs["root"]["calls"] == 2 and costs["sub"]["calls"] == 1


def test_no_answer_within_max_iterations_exits_1(context_file: Path) -> None:
    with FakeOpenAIServer(root=["```repl\nprint(1)\n```"] * 3) as server:
        result = invoke("ask", "q", "--context", str(context_file), "--api-url", server.url, "--max-iterations", "2")
        as_json = invoke(
            "ask", "q", "--context", str(context_file), "--api-url", server.url, "--max-iterations", "1", "--json"
        )
    assert result.exit_code == as_json.exit_code == ExitCode.NO_ANSWER
    assert result.stdout == ""
    assert "no final answer within 2 turns" in result.stderr and "--max-iterations" in result.stderr
    report = json.loads(as_json.stdout)
    assert report["answer"] is None and report["status"] == "max_iterations" and report["turns"] == 1


def test_missing_context_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = invoke("ask", "q", "--context", str(missing), "--api-url", closed_port_url())
    assert result.exit_code == ExitCode.BAD_INPUT
    message = one_line(result.stderr)
    assert str(missing) in message and "--context" in message


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_max_iterations_exits_2(context_file: Path, value: str) -> None:
    result = invoke("ask", "q", "--context", str(context_file), "--max-iterations", value)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "--max-iterations" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("--sandbox", "docker-ish", "unknown sandbox"), ("--prompt", "fancy", "unknown prompt"),
     ("--api-url", "localhost:8080", "http://")],
)
def test_bad_option_values_exit_2_with_one_line(context_file: Path, option: str, value: str, expected: str) -> None:
    result = invoke("ask", "q", "--context", str(context_file), option, value)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert expected in one_line(result.stderr)


def test_server_error_500_exits_3_naming_the_url(context_file: Path) -> None:
    with FakeOpenAIServer(root=LENGTH_THEN_42) as server:
        server.fail_next(FakeReply(status=500))
        url = server.url
        result = invoke("ask", "q", "--context", str(context_file), "--api-url", url, "--max-retries", "0")
    assert result.exit_code == ExitCode.ENDPOINT
    assert result.stdout == ""
    status, message = result.stderr.strip().splitlines()  # the run started: it said where, then failed
    assert status.startswith("rlm: sandbox: ") and status.endswith(" (auto)")
    assert url in message and "500" in message and "--max-retries" in message


def test_one_500_is_retried_when_retries_are_allowed(context_file: Path) -> None:
    with FakeOpenAIServer(root=LENGTH_THEN_42) as server:
        server.fail_next(FakeReply(status=500, headers={"Retry-After": "0"}))
        result = invoke("ask", "q", "--context", str(context_file), "--api-url", server.url, "--max-retries", "1", "-q")
    assert result.exit_code == ExitCode.ANSWERED
    assert result.stdout == "42\n"


def test_json_output_on_failure_reports_the_error(context_file: Path) -> None:
    url = closed_port_url()
    result = invoke("ask", "q", "--context", str(context_file), "--api-url", url, "--max-retries", "0", "--json")
    assert result.exit_code == ExitCode.ENDPOINT
    report = json.loads(result.stdout)
    assert report["status"] == "error" and report["answer"] is None
    assert report["exit_code"] == ExitCode.ENDPOINT and url in report["error"]


def test_context_dash_reads_stdin() -> None:
    script = ["```repl\nprint(context[:30])\n```", "FINAL(done)"]
    with FakeOpenAIServer(root=script) as server:
        result = invoke("ask", "q", "--context", "-", "--api-url", server.url, input="stdin-marker and more text")
        second_turn = json.dumps(server.chat_requests(root=True)[1]["messages"])
    assert result.exit_code == ExitCode.ANSWERED
    assert result.stdout == "done\n"
    assert "stdin-marker and more text" in second_turn


def test_empty_stdin_exits_2() -> None:
    result = invoke("ask", "q", "--context", "-", "--api-url", closed_port_url(), input="")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "stdin" in one_line(result.stderr)


def test_status_goes_to_stderr_and_quiet_silences_it(context_file: Path) -> None:
    script = ["```repl\nprint(llm_query('hello'))\n```", "FINAL(42)"]
    with FakeOpenAIServer(root=script * 2) as server:
        loud = invoke("ask", "q", "--context", str(context_file), "--api-url", server.url)
        quiet = invoke("ask", "q", "--context", str(context_file), "--api-url", server.url, "--quiet")
    assert loud.stdout == quiet.stdout == "42\n"
    lines = loud.stderr.splitlines()
    assert lines[0] in ("rlm: sandbox: bwrap (auto)", "rlm: sandbox: strict (auto)")
    assert lines[1].startswith("rlm: turn 1/20, 0 sub-calls, ") and lines[1].endswith("$0.0000")
    assert lines[2].startswith("rlm: turn 2/20, 1 sub-call, ")
    assert lines[3].startswith("rlm: answered after 2 turn(s): 1 sub-call, ")
    assert quiet.stderr == ""


def test_model_options_reach_the_server(context_file: Path) -> None:
    script = ["```repl\nprint(llm_query('hi'))\n```", "FINAL(42)"]
    with FakeOpenAIServer(root=script) as server:
        result = invoke(
            "ask", "q", "--context", str(context_file), "--api-url", server.url,
            "--model", "big-root", "--sub-model", "small-sub", "--prompt", "cautious", "--sandbox", "inprocess",
        )
        root = server.chat_requests(root=True)
        sub = server.chat_requests(root=False)
    assert result.exit_code == ExitCode.ANSWERED
    assert {request["model"] for request in root} == {"big-root"}
    assert [request["model"] for request in sub] == ["small-sub"]
    assert root[0]["messages"][0]["content"] == system_prompt("cautious")


def test_log_dir_writes_the_trajectory(context_file: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    with FakeOpenAIServer(root=LENGTH_THEN_42) as server:
        result = invoke("ask", "q", "--context", str(context_file), "--api-url", server.url,
                        "--log-dir", str(logs), "--json")
    report = json.loads(result.stdout)
    trajectory = Path(report["trajectory"])
    assert trajectory.parent == logs
    events = [json.loads(line) for line in trajectory.read_text(encoding="utf-8").splitlines()]
    assert events[0]["type"] == "run_start" and events[-1]["type"] == "run_end"
    assert f"trajectory: {trajectory}" in result.stderr


def test_a_log_dir_that_cannot_be_made_exits_2_with_one_line(context_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    result = invoke("ask", "q", "--context", str(context_file), "--api-url", closed_port_url(),
                    "--log-dir", str(blocker / "sub"))
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stdout == ""
    message = one_line(result.stderr)
    assert str(blocker / "sub") in message and "--log-dir" in message


def test_exit_codes_are_the_documented_ones() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "ANSWERED": 0, "NO_ANSWER": 1, "BAD_INPUT": 2, "ENDPOINT": 3, "SANDBOX": 4, "BUDGET": 5, "REPLAY_DIVERGED": 6,
        "CONTEXT_WINDOW": 7, "BATCH_INCOMPLETE": 8, "INTERNAL": 70,
        "INTERRUPTED": 130,
    }


URL = "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [
        (SandboxError("the REPL worker did not start:\nTraceback ...\nboom"), ExitCode.SANDBOX, "--sandbox inprocess"),
        (ConfigError("max_iterations must be a positive number, got 0"), ExitCode.BAD_INPUT, "--help"),
        (ContextError("context file 'x' does not exist"), ExitCode.BAD_INPUT, "--context -"),
        (EndpointUnreachable(f"the model endpoint {URL} could not be reached. Start it.", url=URL), ExitCode.ENDPOINT,
         URL),
        (ClientError(f"the model endpoint {URL} answered HTTP 503: busy", url=URL, status=503), ExitCode.ENDPOINT,
         "check its log"),
        (ClientError(f"{URL} answered HTTP 401: no (set RLM_API_KEY)", url=URL, status=401), ExitCode.ENDPOINT,
         "RLM_API_KEY"),
        (RLMError("some newer failure"), ExitCode.INTERNAL, "some newer failure"),
        (KeyError("oops"), ExitCode.INTERNAL, "bug in rlm"),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED, "interrupted"),
    ],
)
def test_each_failure_maps_to_its_exit_code_and_one_line(error: BaseException, code: ExitCode, says: str) -> None:
    failure = failure_for(error)
    assert failure.code is code
    assert says in one_line(failure.message)


@pytest.mark.parametrize("error", [KeyError(), KeyError("oops"), AttributeError("'NoneType' has no attribute 'get'")])
def test_an_unexpected_exception_exits_70_with_one_line_naming_its_type(error: Exception) -> None:
    failure = failure_for(error)
    assert failure.code is ExitCode.INTERNAL and int(failure.code) == 70
    line = one_line(failure.message)
    assert line.startswith(f"error: {type(error).__name__}") and "report" in line


def test_unknown_option_is_a_usage_error_exit_2(context_file: Path) -> None:
    result = invoke("ask", "q", "--context", str(context_file), "--no-such-option")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "--no-such-option" in result.stderr


# -- rlm models -------------------------------------------------------------------------------


def test_models_lists_the_endpoint_models() -> None:
    with FakeOpenAIServer(root=[], models=["alpha", "beta-long-name"], context_window=32768) as server:
        url = server.url
        result = invoke("models", "--api-url", url)
        as_json = invoke("models", "--api-url", url, "--json")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["alpha           32,768 tokens", "beta-long-name  32,768 tokens"]
    report = json.loads(as_json.stdout)
    assert report["api_url"] == url
    assert report["models"] == [
        {"id": "alpha", "context_window": 32768}, {"id": "beta-long-name", "context_window": 32768}
    ]


def test_models_reads_rlm_api_url_from_the_environment() -> None:
    with FakeOpenAIServer(root=[], models=["from-env"]) as server:
        result = invoke("models", env={"RLM_API_URL": server.url})
    assert result.exit_code == 0
    assert result.stdout == "from-env\n"


def test_models_unreachable_exits_3() -> None:
    url = closed_port_url()
    result = invoke("models", "--api-url", url, "--max-retries", "0")
    assert result.exit_code == ExitCode.ENDPOINT
    assert url in one_line(result.stderr)
