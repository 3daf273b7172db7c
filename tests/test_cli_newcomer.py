"""The newcomer's path through the installed `rlm` command, run in a terminal (a pty) and through
a pipe: help that follows the usual conventions, and failures that say what the user set and
how to fix it, with the documented exit codes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sysconfig
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer

from helpers import read_until_closed, repl
from rlm.cli.exits import ExitCode, failure_for
from rlm.cli.main import app
from rlm.errors import EndpointUnreachable
from rlm.testing import FakeOpenAIServer, FakeReply
from rlm.utils.llm import DEFAULT_API_URL

RLM = Path(sysconfig.get_path("scripts")) / "rlm"  # the entry point pip installed
COLUMNS = 132  # the terminal's width in the pty runs
MODES = ["pty", "pipe"]


@dataclass
class Done:
    code: int
    out: str  # stdout (in a pty: everything the terminal showed)
    err: str  # stderr (in a pty: also in `out`)

    @property
    def text(self) -> str:
        return self.out + self.err


def rlm(mode: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Done:
    """Run the installed `rlm` with `args`: attached to a terminal of COLUMNS columns, or to pipes."""
    assert RLM.exists(), f"{RLM} is missing: install the project (pip install -e '.[dev]')"
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    environment.update({"PYTHONWARNINGS": "error", **(env or {})})
    environment.pop("COLUMNS", None)
    if mode == "pipe":
        done = subprocess.run([str(RLM), *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=environment)
        return Done(done.returncode, done.stdout, done.stderr)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, COLUMNS, 0, 0))
    process = subprocess.Popen([str(RLM), *args], stdin=slave, stdout=slave, stderr=slave, env=environment)
    os.close(slave)
    shown = read_until_closed(master, deadline=time.monotonic() + timeout).decode("utf-8", "replace")
    return Done(process.wait(timeout=timeout), shown.replace("\r\n", "\n"), "")


def commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of a command group, the group itself first."""
    found: list[tuple[str, ...]] = [prefix]
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):  # a group of its own
            found += commands(command, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("The magic number is 42.\n" * 20, encoding="utf-8")
    return path


# -- help -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_command_answers_h_as_plain_help_wrapped_to_the_terminal(mode: str) -> None:
    every = commands(typer.main.get_command(app))
    assert ("ask",) in every and ("bench", "run") in every and ("demo",) in every
    width = COLUMNS if mode == "pty" else 80
    for path in every:
        done = rlm(mode, *path, "-h")
        where = f"rlm {' '.join(path)} -h"
        assert done.code == 0, f"{where}: {done.text}"
        assert f"Usage: rlm {' '.join(path)}".rstrip() in done.out, where
        assert "<bool>" not in done.out and "[default: (" not in done.out, where  # flags bare, defaults as typed
        assert "\u2026" not in done.out and "\u256d" not in done.out, where  # nothing cut, no boxes
        assert max(len(line) for line in done.out.splitlines()) <= width, where
    wide = rlm(mode, "ask", "-h").out
    if mode == "pty":  # the terminal is wider than 80 columns: help uses it
        assert max(len(line) for line in wide.splitlines()) > 80


def test_flags_show_no_value_defaults_are_plain_and_extras_keep_their_brackets() -> None:
    ask = rlm("pipe", "ask", "--help").out
    keep = next(line for line in ask.splitlines() if "--keep-logs" in line)
    assert keep.split()[0] == "--keep-logs" and keep.split()[1] == "Keep"  # no value after the flag
    assert re.search(r"\[default:\s+120;", ask) and "--max-reply-tokens N" in ask and "--context-window TOKENS" in ask
    assert "rlm[bench]" in rlm("pipe", "bench", "run", "-h").out
    serve = rlm("pipe", "serve", "-h").out
    assert "--max-reply-tokens N" in serve and "[default: 256" in serve  # the cap --model local uses too


# -- what the user set, and the fix -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_an_unreachable_api_url_names_the_flag(mode: str, context_file: Path) -> None:
    url = "http://127.0.0.1:9/v1"  # nothing listens on the discard port (refused at once: test_overflow.py)
    done = rlm(mode, "ask", "q", "-c", str(context_file), "--api-url", url, "--max-retries", "3")
    assert done.code == ExitCode.ENDPOINT
    assert f"{url} could not be reached (the URL given with --api-url)" in done.text
    assert "RLM_API_URL is not set" not in done.text and "Traceback" not in done.text


def test_each_source_of_the_url_is_named_in_its_own_message(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:9/v1"
    error = EndpointUnreachable(f"the model endpoint {url} could not be reached. Start it.", url=url)
    monkeypatch.setenv("RLM_API_URL", url)
    assert "(the URL in RLM_API_URL); start your server there, or correct RLM_API_URL" in failure_for(error).message
    assert "--api-url" in failure_for(error, api_url=url).message
    monkeypatch.delenv("RLM_API_URL")
    default = EndpointUnreachable("down", url=DEFAULT_API_URL)
    assert "neither --api-url nor RLM_API_URL is set" in failure_for(default).message
    given = failure_for(default, api_url=DEFAULT_API_URL).message
    assert "is not set" not in given and "(the URL given with --api-url)" in given


@pytest.mark.parametrize("mode", MODES)
def test_library_errors_name_the_flag_not_the_python_parameter(mode: str, context_file: Path) -> None:
    done = rlm(mode, "ask", "q", "-c", str(context_file), "--api-url", "localhost:8080")
    assert done.code == ExitCode.BAD_INPUT
    assert "--api-url" in done.text and "api_url=" not in done.text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("content", "says"), [
    (b"\x7fELF\x02\x01\x01\x00\x00", "a NUL byte at byte 7: it looks like a binary file"),
    ("caf\u00e9 ".encode("utf-8") * 3 + b"\xff\xfe tail", "byte 18 cannot be decoded"),
    (b"text " * 10 + "\u00e9".encode("utf-8")[:1], "byte 50 cannot be decoded"),  # cut in a character at the end
])
def test_a_context_file_that_is_not_utf8_text_exits_2_naming_the_byte(
    mode: str, tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    done = rlm(mode, "ask", "q", "-c", str(path), "--api-url", "http://127.0.0.1:9/v1")
    assert done.code == ExitCode.BAD_INPUT
    assert says in done.text and str(path) in done.text and "iconv" in done.text


def test_the_check_reads_in_pieces_and_counts_bytes_across_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlm.cli import inputs
    from rlm.cli.exits import BadInput

    monkeypatch.setattr(inputs, "_PIECE", 4)
    good = tmp_path / "good.txt"
    good.write_bytes("ab\u00e9\u00e9\u20ac x".encode("utf-8"))  # characters split across 4-byte pieces
    inputs.check_text_file(good)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("ab\u00e9\u00e9".encode("utf-8") + b"\xc3(")
    with pytest.raises(BadInput, match="byte 6 cannot be decoded"):
        inputs.check_text_file(bad)


@pytest.mark.parametrize("mode", MODES)
def test_viewing_a_file_that_is_not_a_run_says_so(mode: str) -> None:
    readme = Path(__file__).parent.parent / "README.md"
    done = rlm(mode, "view", str(readme))
    assert done.code == ExitCode.BAD_INPUT
    assert "is not an rlm trajectory" in done.text and "damaged" not in done.text and "rlm runs" in done.text


# -- rlm ask's options reach the loop ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_max_reply_tokens_and_context_window_reach_the_run(mode: str, context_file: Path, tmp_path: Path) -> None:
    with FakeOpenAIServer(root=[repl("print(len(context))"), "FINAL(42)"]) as server:
        done = rlm(mode, "ask", "q", "-c", str(context_file), "--api-url", server.url, "--max-reply-tokens", "77",
                   "--context-window", "3000", "--log-dir", str(tmp_path / "runs"))
        requests = server.chat_requests(root=True)
    assert done.code == ExitCode.ANSWERED, done.text
    assert [request["max_tokens"] for request in requests] == [77, 77]
    (trajectory,) = (tmp_path / "runs").glob("*.jsonl")
    calls = [json.loads(line) for line in trajectory.read_text(encoding="utf-8").splitlines()]
    assert [call["window"] for call in calls if call["type"] == "llm_call"] == [3000, 3000]


# -- a request too long for the window: exit 7, with the fixes named ---------------------------------


OPENAI_BODY = json.dumps({"error": {
    "message": "This model's maximum context length is 4096 tokens. However, your messages resulted in 5120 tokens. "
               "Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}).encode()
VLLM_BODY = json.dumps({"object": "error", "type": "BadRequestError", "code": 400, "message": (
    "This model's maximum context length is 4096 tokens. However, you requested 5120 tokens (4864 in the messages, "
    "256 in the completion). Please reduce the length of the messages or completion.")}).encode()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("body", [OPENAI_BODY, VLLM_BODY], ids=["openai", "vllm"])
def test_an_overflow_from_the_server_exits_7_naming_the_window_and_the_fixes(
    mode: str, body: bytes, context_file: Path
) -> None:
    refusal = FakeReply(status=400, raw=body)
    with FakeOpenAIServer(root=[refusal, refusal, "FINAL(never)"]) as server:
        done = rlm(mode, "ask", "q", "-c", str(context_file), "--api-url", server.url)
        sent = len(server.chat_requests(root=True))
    assert done.code == ExitCode.CONTEXT_WINDOW == 7, done.text
    assert sent == 1  # refused; with the server's sizes the first request alone is too long to send again
    line = done.text.strip().splitlines()[-1]
    assert "does not fit the model's context window (4,096 tokens)" in line and "5,120 tokens" in line
    for fix in ("rlm serve --ctx", "--context-window", "--prompt small", "--max-reply-tokens", "--max-iterations"):
        assert fix in line


def test_llama_cpp_s_refusal_is_retried_and_then_exits_7(context_file: Path) -> None:
    with FakeOpenAIServer(root=["FINAL(never)"], enforced_window=500) as server:
        done = rlm("pipe", "ask", "q", "-c", str(context_file), "--api-url", server.url, "--json")
    assert done.code == ExitCode.CONTEXT_WINDOW
    report = json.loads(done.out)
    assert report["status"] == "error" and report["exit_code"] == 7 and "(500 tokens)" in report["error"]


# -- the local model's commands ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_demo_with_a_bad_gguf_exits_2_with_a_fix_it_accepts(mode: str, tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model" * 100)
    done = rlm(mode, "demo", "--gguf", str(fake))
    assert done.code == ExitCode.BAD_INPUT, done.text
    assert "valid GGUF" in done.text and f"rlm serve --gguf {fake} --verbose" in done.text
    assert "run with --verbose" not in done.text


def test_demo_runs_are_kept_with_the_others_and_leave_no_scratch(tmp_path: Path) -> None:
    runs, scratch = tmp_path / "runs", tmp_path / "tmp"
    scratch.mkdir()
    env = {"RLM_LOG_DIR": str(runs), "TMPDIR": str(scratch)}
    done = rlm("pipe", "demo", "--max-iterations", "1", "--max-reply-tokens", "16", "--json", env=env)
    assert done.code == 0, done.err
    trajectory = Path(json.loads(done.out)["trajectory"])
    assert trajectory.parent == runs
    listed = rlm("pipe", "runs", "--json", env=env)
    assert [json.loads(line)["file"] for line in listed.out.splitlines()] == [str(trajectory)]
    viewed = rlm("pipe", "view", env=env)
    assert viewed.code == 0 and viewed.out.strip() == str(trajectory.with_suffix(".html"))
    assert list(scratch.iterdir()) == []  # no rlm-demo-* folder, no session scratch left behind
