"""`sandbox="auto"`, the default: the strongest level this machine runs, chosen once, recorded and
shown; and what the `rlm` command prints of model and server text (no terminal control codes).

Each isolation claim is judged by an effect on the host (a file model code could not write),
each output claim by the bytes the command really wrote.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from helpers import read_until_closed, repl
from rlm._text import TERMINAL_UNSAFE, terminal_safe
from rlm.cli.output import json_text
from rlm.errors import IsolationWarning, SandboxUnavailable
from rlm.replay import replay_run
from rlm.rlm_repl import RLM_REPL
from rlm.sandbox.auto import AutoChoice, Chooser, auto_choice, default_checks
from rlm.testing import FakeOpenAIServer, FakeReply, ScriptedModel
from rlm.trajectory import read_events

# What a terminal would act on: OSC 52 (clipboard write), CSI clear screen, the C1 CSI byte,
# a carriage return that rewrites the line, backspaces, a bidi override, a full reset.
HOSTILE = "ok \x1b]52;c;SGFja2Vk\x07\x1b[2J\x9b31mred\rOVERWRITE \u202egnp.exe\x08\x08 \x1bc end"
CONTROLS = [b"\x1b", b"\x07", b"\r", b"\x08", "\x9b".encode(), "\u202e".encode()]
# The answer made by model code (its source is plain ASCII: Python turns the escapes into controls).
MAKE_HOSTILE = repl(f"answer = {HOSTILE!r}") + "\nFINAL_VAR(answer)"


def _unavailable(why: str):
    def check() -> None:
        raise SandboxUnavailable(why)

    return check


def _fine() -> None:
    return None


# -- choosing ----------------------------------------------------------------------------------


def test_the_first_level_whose_checks_pass_is_chosen_and_the_stronger_ones_say_why_not() -> None:
    chooser = Chooser([("bwrap", [_unavailable("no user namespaces")]), ("strict", [_fine]), ("other", [_fine])])
    assert chooser.choice() == AutoChoice("strict", (("bwrap", "no user namespaces"),))


def test_the_choice_is_made_once_for_all_threads() -> None:
    calls: list[int] = []

    def slow_check() -> None:
        calls.append(1)
        time.sleep(0.05)

    chooser = Chooser([("bwrap", [slow_check])])
    seen: list[AutoChoice] = []
    threads = [threading.Thread(target=lambda: seen.append(chooser.choice())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(seen) == 8 and all(choice is seen[0] for choice in seen)


def test_no_isolation_warns_once_naming_what_to_install() -> None:
    chooser = Chooser([("bwrap", [_unavailable("bwrap: not installed")]), ("strict", [_unavailable("no Landlock")])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = chooser.choice(), chooser.choice()
    assert first is second and first.level == "subprocess" and not first.isolated
    assert [type(w.message) for w in caught] == [IsolationWarning]
    said = str(caught[0].message)
    for words in ("bubblewrap", "libseccomp", "Landlock", "bwrap: not installed", "strict: no Landlock"):
        assert words in said


def test_this_machine_gets_an_isolating_level_without_a_warning() -> None:
    # Here bubblewrap runs (the suite needs it for the bwrap level's own tests).
    assert auto_choice().level == "bwrap" and auto_choice().isolated


@pytest.fixture
def refusing_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A `bwrap` first on PATH that fails as a kernel without user namespaces makes it fail."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    return str(fake)


def test_bwrap_that_cannot_start_is_passed_over_for_strict(refusing_bwrap: str) -> None:
    choice = Chooser(default_checks()).choice()
    assert choice.level == "strict"
    assert choice.passed_over[0][0] == "bwrap" and "setting up uid map" in choice.passed_over[0][1]


def test_an_explicit_level_that_cannot_start_raises_and_never_falls_back(refusing_bwrap: str, tmp_path: Path) -> None:
    escaped = tmp_path / "escaped.txt"
    code = repl(f"open({str(escaped)!r}, 'w').write('x')") + "\nFINAL(done)"
    rlm = RLM_REPL(client=ScriptedModel([code]), sub_client=ScriptedModel(["s"]), sandbox="bwrap")
    with pytest.raises(SandboxUnavailable, match="bubblewrap could not start"):
        rlm.completion(context="c", query="q")
    assert not escaped.exists()  # no weaker level ran the code instead


# -- the default, as run and as recorded --------------------------------------------------------


def test_the_default_runs_at_the_chosen_level_and_records_it(tmp_path: Path) -> None:
    escaped = tmp_path / "escaped.txt"
    code = repl(f"try:\n    open({str(escaped)!r}, 'w').write('x')\nexcept OSError as exc:\n    print(exc)")
    rlm = RLM_REPL(client=ScriptedModel([code, "FINAL(done)"]), sub_client=ScriptedModel(["s"]),
                   log_dir=str(tmp_path / "runs"))
    assert rlm.sandbox_level == "bwrap"
    assert rlm.completion(context="c", query="q") == "done"
    assert not escaped.exists()  # the host path is not even there inside bubblewrap
    events, _ = read_events(rlm.tracer.path)
    start = events[0]
    assert start["type"] == "run_start" and start["sandbox"] == "bwrap" and start["settings"]["sandbox"] == "auto"


def test_an_explicit_level_is_recorded_as_given(tmp_path: Path) -> None:
    rlm = RLM_REPL(client=ScriptedModel(["FINAL(done)"]), sub_client=ScriptedModel(["s"]), sandbox="subprocess",
                   log_dir=str(tmp_path))
    assert rlm.completion(context="c", query="q") == "done"
    start = read_events(rlm.tracer.path)[0][0]
    assert start["sandbox"] == start["settings"]["sandbox"] == "subprocess"


def test_a_run_recorded_with_auto_replays_with_auto(tmp_path: Path) -> None:
    script = [repl("print(len(context))"), "FINAL(done)"]
    rlm = RLM_REPL(client=ScriptedModel(script), sub_client=ScriptedModel(["s"]), log_dir=str(tmp_path / "a"))
    rlm.completion(context="some context", query="q")
    again = replay_run(rlm.tracer.path, "some context", log_dir=str(tmp_path / "b"))
    assert again.divergence is None and again.answer == "done"
    start = read_events(next((tmp_path / "b").iterdir()))[0][0]
    assert start["sandbox"] == "bwrap" and start["settings"]["sandbox"] == "auto"


# -- what the command prints ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("copy \x1b]52;c;SGFja2Vk\x07me", "copy me"),  # OSC 52, BEL-terminated
        ("title \x1b]0;pwned\x1b\\ok", "title ok"),  # OSC, ST-terminated
        ("\x1b[2J\x1b[1;1Hclear", "clear"),  # CSI
        ("\x9b31mred\x9d8;;http://x\x9c", "red"),  # C1 CSI and OSC
        ("safe\rEVIL", "safe\nEVIL"),
        ("dos\r\nline", "dos\nline"),
        ("pass\x08\x08\x08word\x7f", "password"),
        ("\u202eexe.txt \u2066x\u2069", "exe.txt x"),
        ("reset\x1bc \x1b(0box\x1b", "reset box"),
        ("keep\ttabs\nand lines, ünïcode, 日本", "keep\ttabs\nand lines, ünïcode, 日本"),
        ("a\u200fb\u061cc\ufeffd\u200be\u2060f", "abcdef"),  # invisible marks and format characters
        ("tag\U000e0041\U000e0042s hide text", "tags hide text"),
        ("line\u2028para\u2029end", "line\npara\nend"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("family \U0001f468\u200d\U0001f469 and \u200cjoiners", "family \U0001f468\u200d\U0001f469 and \u200cjoiners"),
    ],
)
def test_terminal_safe_drops_what_a_terminal_would_obey(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown
    assert json.loads(json_text({"text": text})) == {"text": text}
    assert not TERMINAL_UNSAFE.search(json_text({"text": text}))


# `rlm` on a machine with no isolating level: the process's chooser finds every level refused.
_NO_ISOLATION = """
import sys
from rlm.errors import SandboxUnavailable
from rlm.sandbox import auto

def refused():
    raise SandboxUnavailable("refused on this machine")

auto._CHOOSER = auto.Chooser([("bwrap", [refused]), ("strict", [refused])])
from rlm.cli.main import run
sys.argv[0] = "rlm"
run()
"""


def test_ask_without_isolation_says_so_in_one_line_and_runs_at_subprocess(context_file: Path, tmp_path: Path) -> None:
    logs = tmp_path / "runs"
    with FakeOpenAIServer(root=["FINAL(42)"] * 2) as server:
        args = ["ask", "q", "--context", str(context_file), "--api-url", server.url, "--log-dir", str(logs)]
        child_env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
        done = [
            subprocess.run([sys.executable, "-c", _NO_ISOLATION, *args, *extra], capture_output=True, text=True,
                           timeout=60, env={**child_env, "PYTHONWARNINGS": "error"})
            for extra in ([], ["--quiet"])
        ]
    for run in done:
        assert run.returncode == 0 and run.stdout == "42\n", run.stderr
        warning = [line for line in run.stderr.splitlines() if "warning" in line]
        assert len(warning) == 1 and warning[0].startswith('rlm: warning: sandbox="auto" found no isolation')
        assert "apt-get install bubblewrap" in warning[0] and "Traceback" not in run.stderr
    assert "rlm: sandbox: subprocess (auto)" in done[0].stderr
    trajectories = sorted(logs.iterdir())
    assert len(trajectories) == 2
    for trajectory in trajectories:
        start = read_events(trajectory)[0][0]
        assert start["sandbox"] == "subprocess" and start["settings"]["sandbox"] == "auto"


def _rlm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("RLM_")}
    return subprocess.run(
        [sys.executable, "-m", "rlm", *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**child_env, "PYTHONWARNINGS": "error", **(env or {})},
    )


def _no_control_codes(*outputs: bytes, text: bool = True) -> None:
    """No control character in any output; in text (not JSON) not even an escape sequence's payload."""
    for output in outputs:
        for forbidden in [*CONTROLS, *([b"52;c;"] if text else [])]:
            assert forbidden not in output, (forbidden, output)


@pytest.fixture
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("The magic number is 42. " * 20, encoding="utf-8")
    return path


def test_ask_prints_a_hostile_answer_without_its_control_codes(context_file: Path, tmp_path: Path) -> None:
    logs = str(tmp_path / "runs")
    with FakeOpenAIServer(root=[MAKE_HOSTILE] * 2) as server:
        shown = _rlm("ask", "q\x1b[2J", "--context", str(context_file), "--api-url", server.url, "--log-dir", logs)
        as_json = _rlm("ask", "q", "--context", str(context_file), "--api-url", server.url, "--json")
    assert shown.returncode == as_json.returncode == 0, shown.stderr
    _no_control_codes(shown.stdout, shown.stderr, as_json.stderr)
    _no_control_codes(as_json.stdout, text=False)
    assert shown.stdout.decode() == "ok red\nOVERWRITE gnp.exe  end\n"  # the CR became a line break
    assert b"rlm: sandbox: bwrap (auto)\n" in shown.stderr
    report = json.loads(as_json.stdout)
    assert report["answer"] == HOSTILE and report["sandbox"] == "bwrap"  # JSON keeps the text, escaped

    listed, listed_json = _rlm("runs", "--log-dir", logs), _rlm("runs", "--log-dir", logs, "--json")
    assert listed.returncode == listed_json.returncode == 0, listed.stderr
    _no_control_codes(listed.stdout, listed.stderr)
    _no_control_codes(listed_json.stdout, text=False)
    assert b"OVERWRITE" in listed.stdout
    row = json.loads(listed_json.stdout)
    assert row["answer"] == HOSTILE and row["query"] == "q\x1b[2J"


def test_a_server_error_quoted_on_stderr_loses_its_control_codes(context_file: Path) -> None:
    body = json.dumps({"error": {"message": f"overloaded {HOSTILE}"}}).encode()
    with FakeOpenAIServer(root=[FakeReply(status=500, raw=body)] * 2) as server:
        done = _rlm("ask", "q", "--context", str(context_file), "--api-url", server.url, "--max-retries", "0")
        as_json = _rlm("ask", "q", "--context", str(context_file), "--api-url", server.url, "--max-retries", "0",
                       "--json")
    assert done.returncode == as_json.returncode == 3
    _no_control_codes(done.stdout, done.stderr, as_json.stderr)
    _no_control_codes(as_json.stdout, text=False)
    assert b"overloaded ok" in done.stderr
    assert "overloaded" in json.loads(as_json.stdout)["error"]


def test_the_live_view_shows_model_code_without_its_control_codes(context_file: Path) -> None:
    # The reply itself carries the raw control characters, in the cell the live view shows (in a
    # comment, without the CR, which would end the comment's line).
    slow_cell = f"```repl\n# {HOSTILE.replace(chr(13), ' ')}\nimport time; time.sleep(1)\n```"
    master, slave = pty.openpty()
    with FakeOpenAIServer(root=[slow_cell, "FINAL(42)"]) as server:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlm", "ask", "q", "--context", str(context_file), "--api-url", server.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
            env={key: value for key, value in os.environ.items() if not key.startswith("RLM_")},
        )
        os.close(slave)
        terminal = read_until_closed(master, deadline=time.monotonic() + 60)
        stdout = process.stdout.read()
        process.stdout.close()
        assert process.wait(timeout=30) == 0
    assert stdout == b"42\n"
    assert b"running cell 1 of 1" in terminal and b"OVERWRITE" in terminal  # the cell was shown
    assert b"sandbox: bwrap (auto)" in terminal
    for forbidden in (b"52;c;", b"\x1b[2J", "\x9b".encode(), "\u202e".encode(), b"\x1bc", b"\x07"):
        assert forbidden not in terminal, forbidden
