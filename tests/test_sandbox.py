"""The sandbox contract, run against every backend, plus what only the worker process can do.

Also the pieces both backends are built on: the frame protocol and the bounded text buffers.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from rlm._text import BoundedText, omission_marker, truncate_middle
from rlm.sandbox import SANDBOXES, ContextSource, Sandbox, SubCallFailed, create_sandbox
from rlm.sandbox import subprocess as subprocess_sandbox
from rlm.sandbox.protocol import MAX_FRAME, FrameReader, ProtocolError, encode_frame, write_frame

TIMEOUT = 10.0
MAX_OUTPUT = 10_000


class RecordingBridge:
    """The host side of `llm_query`: records every call and answers with the prompts upper-cased."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_with: str | None = None
        self.sleep = 0.0
        self.during_call = None  # a function run inside the bridge, in the cell's thread

    def __call__(self, kind: str, prompts: list[str]) -> list[str]:
        self.calls.append((kind, list(prompts)))
        if self.sleep:
            time.sleep(self.sleep)
        if self.during_call is not None:
            self.during_call()
        if self.fail_with is not None:
            raise SubCallFailed(self.fail_with)
        return [prompt.upper() for prompt in prompts]


@pytest.fixture
def bridge() -> RecordingBridge:
    return RecordingBridge()


@pytest.fixture(params=sorted(SANDBOXES))
def sandbox(request: pytest.FixtureRequest, bridge: RecordingBridge):
    box = create_sandbox(request.param, bridge)
    yield box
    box.close()


@pytest.fixture
def worker_sandbox(bridge: RecordingBridge):
    box = create_sandbox("subprocess", bridge)
    yield box
    box.close()


def run(box: Sandbox, code: str, *, timeout: float = TIMEOUT, max_output: int = MAX_OUTPUT):
    return box.run(code, timeout=timeout, max_output=max_output)


def ok(box: Sandbox, code: str, **kwargs) -> str:
    """Run a cell that must succeed; return its stdout."""
    result = run(box, code, **kwargs)
    assert result.error is None, result.error
    assert not result.timed_out and not result.restarted
    return result.stdout


# -- the contract every sandbox keeps ------------------------------------------------------------


def test_unknown_sandbox_name_is_a_config_error(bridge):
    from rlm.errors import ConfigError

    with pytest.raises(ConfigError, match="subprocess"):
        create_sandbox("no-such-sandbox", bridge)


def test_variables_imports_and_functions_persist_across_cells(sandbox):
    ok(sandbox, "import math\nbase = 10\ndef scale(x):\n    return x * base")
    ok(sandbox, "class Box:\n    size = 3")
    assert ok(sandbox, "print(scale(math.floor(2.7)), Box.size)") == "20 3\n"


def test_stdout_and_stderr_are_captured_separately_per_cell(sandbox):
    first = run(sandbox, "import sys\nprint('out one')\nprint('err one', file=sys.stderr)")
    second = run(sandbox, "print('out two')\n_ = sys.stderr.write('err two\\n')")
    assert (first.stdout, first.stderr) == ("out one\n", "err one\n")
    assert (second.stdout, second.stderr) == ("out two\n", "err two\n")


def test_last_expression_value_is_displayed(sandbox):
    assert ok(sandbox, "x = 6\nx * 7") == "42\n"
    assert ok(sandbox, "'text'") == "'text'\n"
    assert ok(sandbox, "None") == ""  # like the Python prompt: None is not echoed
    assert ok(sandbox, "y = 1") == ""


def test_exception_is_a_traceback_naming_the_cell_line_and_session_survives(sandbox):
    ok(sandbox, "kept = 'still here'")
    result = run(sandbox, "a = 1\nb = 0\nprint('before')\na / b")
    assert result.error is not None
    assert "ZeroDivisionError" in result.error
    assert "line 4" in result.error and "a / b" in result.error
    assert "worker.py" not in result.error  # only the model's own frames
    assert result.stdout == "before\n"
    assert not result.restarted
    assert ok(sandbox, "print(kept)") == "still here\n"


def test_exception_inside_a_function_shows_both_frames(sandbox):
    ok(sandbox, "def inner(d):\n    return d['missing']")
    result = run(sandbox, "inner({})")
    assert "KeyError: 'missing'" in result.error
    assert "in inner" in result.error and "return d['missing']" in result.error


def test_syntax_error_is_reported(sandbox):
    result = run(sandbox, "x = 1\ndef broken(:\n    pass")
    assert result.error is not None
    assert "SyntaxError" in result.error and "line 2" in result.error
    # The model gets its own cell in the report, not the parser's innards.
    assert "ast.py" not in result.error
    assert ok(sandbox, "print('fine')") == "fine\n"


def test_scaffold_names_are_restored_after_model_code_overwrites_them(sandbox):
    sandbox.load_context(ContextSource(value="the context"))
    ok(sandbox, "llm_query = llm_query_batched = FINAL = FINAL_VAR = SHOW_VARS = None\ncontext = 'clobbered'")
    assert ok(sandbox, "print(llm_query('a'), llm_query_batched(['b']))") == "A ['B']\n"
    assert ok(sandbox, "print(context)") == "the context\n"
    assert ok(sandbox, "print(callable(SHOW_VARS), callable(FINAL_VAR))") == "True True\n"
    assert run(sandbox, "FINAL('still works')").final == "still works"


def test_final_from_code_cannot_be_swallowed_by_except_exception(sandbox):
    code = "try:\n    FINAL('the answer')\nexcept Exception:\n    print('swallowed')\nprint('after')"
    result = run(sandbox, code)
    assert result.final == "the answer"
    assert result.error is None
    assert "swallowed" not in result.stdout and "after" not in result.stdout


def test_final_converts_non_strings(sandbox):
    assert run(sandbox, "FINAL(6 * 7)").final == "42"


def test_final_var_from_code(sandbox):
    result = run(sandbox, "answer = 'forty-two'\nFINAL_VAR('answer')")
    assert result.final == "forty-two"
    assert result.error is None


def test_final_var_with_missing_name_is_an_error_the_model_sees(sandbox):
    ok(sandbox, "present = 1")
    result = run(sandbox, "FINAL_VAR('absent')")
    assert result.final is None
    assert "absent" in result.error and "present" in result.error
    assert run(sandbox, "FINAL_VAR(present)").final is None  # a value instead of a name: told how to fix


def test_get_variable_reports_values_and_known_names(sandbox):
    ok(sandbox, "result = [1, 2]")
    assert sandbox.get_variable("result") == {"found": True, "value": "[1, 2]"}
    missing = sandbox.get_variable("nothing")
    assert missing["found"] is False and "result" in missing["names"]
    assert sandbox.get_variable("llm_query")["found"] is False  # scaffold names are not answers


def test_show_vars_lists_user_variables_only(sandbox):
    sandbox.load_context(ContextSource(value="ctx"))
    ok(sandbox, "import json\nalpha = 1\nbeta = 'b'\ndef gamma():\n    pass")
    shown = ok(sandbox, "SHOW_VARS()")
    for name in ("alpha", "beta", "gamma"):
        assert name in shown
    for name in ("json", "llm_query", "FINAL", "context", "__builtins__"):
        assert f"'{name}'" not in shown


def test_llm_query_reaches_the_bridge(sandbox, bridge):
    assert ok(sandbox, "print(llm_query('hello'))") == "HELLO\n"
    assert bridge.calls == [("llm_query", ["hello"])]


def test_llm_query_batched_reaches_the_bridge_and_keeps_order(sandbox, bridge):
    prompts = [f"p{i}" for i in range(20)]
    out = ok(sandbox, f"r = llm_query_batched({prompts!r})\nprint(r)")
    assert out == repr([p.upper() for p in prompts]) + "\n"
    assert bridge.calls == [("llm_query_batched", prompts)]
    assert ok(sandbox, "print(llm_query_batched([]))") == "[]\n"
    assert len(bridge.calls) == 1  # an empty batch costs no call


def test_failed_sub_call_is_an_exception_the_model_can_catch(sandbox, bridge):
    bridge.fail_with = "the sub-model is overloaded"
    code = "try:\n    llm_query('x')\nexcept Exception as exc:\n    caught = str(exc)\nprint(caught)"
    assert ok(sandbox, code) == "the sub-model is overloaded\n"
    uncaught = run(sandbox, "llm_query_batched(['a', 'b'])")
    assert "the sub-model is overloaded" in uncaught.error
    assert not uncaught.restarted
    bridge.fail_with = None
    assert ok(sandbox, "print(llm_query('again'))") == "AGAIN\n"


def test_bridge_failure_that_is_not_a_sub_call_error_fails_the_run(sandbox, bridge):
    """A failure of the host (a bug, the endpoint down) is not data for the model: it propagates,
    even when model code catches every Exception, and the session stays usable afterwards."""

    def broken() -> None:
        raise RuntimeError("host bug")

    bridge.during_call = broken
    with pytest.raises(RuntimeError, match="host bug"):
        run(sandbox, "try:\n    llm_query('x')\nexcept Exception:\n    print('hidden')")
    bridge.during_call = None
    assert ok(sandbox, "print(llm_query('next'))") == "NEXT\n"


def test_non_str_prompt_is_a_type_error(sandbox, bridge):
    assert "TypeError" in run(sandbox, "llm_query(123)").error
    assert "TypeError" in run(sandbox, "llm_query_batched(['ok', None])").error
    assert bridge.calls == []


def test_long_output_is_cut_to_head_and_tail_with_true_length(sandbox):
    result = run(sandbox, "print('H' * 500 + 'M' * 5000 + 'T' * 500)", max_output=400)
    total = 500 + 5000 + 500 + 1  # with print's newline
    assert result.stdout.startswith("H" * 200)
    assert result.stdout.endswith("T" * 199 + "\n")
    assert f"{total:,}" in result.stdout
    assert result.stdout == truncate_middle("H" * 500 + "M" * 5000 + "T" * 500 + "\n", 400)


def test_stderr_is_cut_too(sandbox):
    result = run(sandbox, "import sys\nsys.stderr.write('e' * 10_000)", max_output=100)
    assert len(result.stderr) < 300 and "10,000" in result.stderr


def test_fifty_megabyte_print_is_cut_and_memory_stays_bounded(sandbox):
    # Written piece by piece, 50 MB must not accumulate anywhere: peak memory barely moves.
    # (Measured first: the single 50 MB string below raises the peak by itself.)
    ok(sandbox, "import resource\npeak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss")
    streamed = run(sandbox, "for i in range(500):\n    print('x' * 100_000)", max_output=1000)
    assert "50,000,500" in streamed.stdout and len(streamed.stdout) < 1200
    grown_kib = int(ok(sandbox, "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before"))
    assert grown_kib < 20_000, f"peak memory grew by {grown_kib} KiB while printing 50 MB"
    result = run(sandbox, "print('b' * 50_000_000)", max_output=1000)
    assert "50,000,001" in result.stdout
    assert len(result.stdout) < 1200


def test_infinite_loop_times_out_and_variables_survive(sandbox):
    ok(sandbox, "survivor = 'alive'")
    started = time.monotonic()
    result = run(sandbox, "while True:\n    pass", timeout=0.5)
    assert time.monotonic() - started < 3
    assert result.timed_out is True
    assert result.restarted is False
    assert "0.5 s" in result.error
    assert ok(sandbox, "print(survivor)") == "alive\n"


def test_time_spent_in_the_bridge_does_not_count_against_the_cell(sandbox, bridge):
    bridge.sleep = 1.5
    result = run(sandbox, "reply = llm_query('slow')\nprint(reply)", timeout=1.0)
    assert result.timed_out is False, result.error
    assert result.error is None
    assert result.stdout == "SLOW\n"


@pytest.mark.parametrize(
    ("value", "expected_type", "total", "chunks"),
    [
        ("hello world", "str", 11, [11]),
        (["ab", "cde", ""], "list", 5, [2, 3, 0]),
        ({"a": "xyz", "b": [1, 2]}, "dict", 3 + len("[1, 2]"), [3, 6]),
        ("naïve ünïcode ✓", "str", 15, [15]),
    ],
)
def test_context_values_load_with_their_description(sandbox, value, expected_type, total, chunks):
    described = sandbox.load_context(ContextSource(value=value))
    assert described == {"type": expected_type, "total_length": total, "chunk_count": len(chunks), "chunk_lengths": chunks}
    assert json.loads(ok(sandbox, "import json\nprint(json.dumps(context))")) == value
    assert ok(sandbox, "print(type(context).__name__)") == expected_type + "\n"


def test_context_from_a_file(sandbox, tmp_path):
    text = "line one\nlíne twö\n" * 1000
    path = tmp_path / "context.txt"
    path.write_text(text, encoding="utf-8")
    described = sandbox.load_context(ContextSource(path=path))
    assert described == {"type": "str", "total_length": len(text), "chunk_count": 1, "chunk_lengths": [len(text)]}
    assert ok(sandbox, "print(len(context), context[:8], context.count('twö'))") == f"{len(text)} line one 1000\n"
    assert path.read_text(encoding="utf-8") == text  # the user's file is left alone


def test_empty_context_file(sandbox, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert sandbox.load_context(ContextSource(path=path))["total_length"] == 0
    assert ok(sandbox, "print(repr(context))") == "''\n"


def test_chunk_lengths_are_capped_at_one_hundred(sandbox):
    chunks = ["x" * (i % 7) for i in range(150)]
    described = sandbox.load_context(ContextSource(value=chunks))
    assert described["chunk_count"] == 150
    assert described["chunk_lengths"] == [len(c) for c in chunks[:100]]
    assert described["total_length"] == sum(len(c) for c in chunks)
    assert ok(sandbox, "print(len(context))") == "150\n"


def test_a_new_context_replaces_the_old_one(sandbox):
    sandbox.load_context(ContextSource(value="first"))
    sandbox.load_context(ContextSource(value=["second"]))
    assert ok(sandbox, "print(context)") == "['second']\n"


def test_closed_sandbox_refuses_cells(sandbox):
    from rlm.errors import SandboxError

    sandbox.close()
    sandbox.close()  # twice is fine
    with pytest.raises(SandboxError, match="closed"):
        run(sandbox, "1")


# -- what only the worker process can do ---------------------------------------------------------


def test_loop_that_ignores_sigint_is_killed_and_the_context_reloaded(worker_sandbox, monkeypatch):
    """In-process, a long call into C cannot be stopped at all: threads cannot be killed."""
    monkeypatch.setattr(subprocess_sandbox, "INTERRUPT_GRACE", 0.3)
    worker_sandbox.load_context(ContextSource(value=["alpha", "beta"]))
    ok(worker_sandbox, "doomed = 'lost'")
    started = time.monotonic()
    result = run(worker_sandbox, "sum(range(10**12))", timeout=0.3)
    assert time.monotonic() - started < 5
    assert result.timed_out is True and result.restarted is True
    assert "0.3 s" in result.error
    assert "NameError" in run(worker_sandbox, "doomed").error
    assert ok(worker_sandbox, "print(context)") == "['alpha', 'beta']\n"


def test_worker_crash_is_reported_and_the_session_restarts(worker_sandbox, tmp_path):
    """In-process, `os._exit` would end the test run itself: there is no second process to lose."""
    path = tmp_path / "ctx.txt"
    path.write_text("from a file", encoding="utf-8")
    worker_sandbox.load_context(ContextSource(path=path))
    result = run(worker_sandbox, "import os\nos._exit(3)")
    assert result.restarted is True
    assert "died" in result.error and "code 3" in result.error
    assert ok(worker_sandbox, "print(context)") == "from a file\n"
    assert ok(worker_sandbox, "print(llm_query('alive'))") == "ALIVE\n"


def test_worker_killed_by_a_signal_is_reported(worker_sandbox):
    """In-process, a signal to our own pid would kill the host."""
    result = run(worker_sandbox, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert result.restarted is True and "signal 9" in result.error
    assert ok(worker_sandbox, "print(1 + 1)") == "2\n"


def test_raw_writes_to_file_descriptor_one_do_not_corrupt_the_protocol(worker_sandbox):
    """In-process, fd 1 is the host's own stdout; there is no protocol on it to protect."""
    result = run(worker_sandbox, "import os\nos.write(1, b'garbage\\x00\\xff' * 1000)\nprint('clean')")
    assert result.error is None and result.stdout == "clean\n"
    assert not result.restarted
    assert ok(worker_sandbox, "print(llm_query('after garbage'))") == "AFTER GARBAGE\n"


def test_worker_environment_has_no_host_secrets(bridge, monkeypatch):
    """In-process, model code shares the host's `os.environ`: that is the documented lack of isolation."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-test")
    monkeypatch.setenv("RLM_API_KEY", "sk-secret-test")
    with create_sandbox("subprocess", bridge) as box:
        code = "import os\nprint(sorted(os.environ))\nprint(open('/proc/self/environ', 'rb').read())"
        out = ok(box, code)
    assert "sk-secret-test" not in out
    assert "OPENAI_API_KEY" not in out and "RLM_API_KEY" not in out


def test_close_removes_the_scratch_directory_and_ends_the_worker(bridge):
    """In-process there is neither a worker process nor a scratch directory."""
    box = create_sandbox("subprocess", bridge)
    box.load_context(ContextSource(value="written to scratch"))
    pid, scratch = json.loads(ok(box, "import os, json\nprint(json.dumps([os.getpid(), os.getcwd()]))"))
    assert Path(scratch).is_dir() and pid != os.getpid()
    box.close()
    assert not Path(scratch).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_restart_after_kill_also_cleans_up(worker_sandbox, monkeypatch):
    """The killed worker must not linger as a process once it is replaced."""
    monkeypatch.setattr(subprocess_sandbox, "INTERRUPT_GRACE", 0.2)
    old_pid = int(ok(worker_sandbox, "import os\nos.getpid()"))
    assert run(worker_sandbox, "sum(range(10**12))", timeout=0.2).restarted
    new_pid = int(ok(worker_sandbox, "import os\nos.getpid()"))
    assert new_pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)


# -- what only the in-process sandbox has to get right -------------------------------------------


@pytest.fixture
def inprocess_sandbox(bridge: RecordingBridge):
    box = create_sandbox("inprocess", bridge)
    yield box
    box.close()


def test_inprocess_cell_output_never_reaches_the_host_stdout(inprocess_sandbox, capsys):
    result = run(inprocess_sandbox, "import sys\nprint('cell says hi')\nprint('cell err', file=sys.stderr)")
    assert result.stdout == "cell says hi\n" and result.stderr == "cell err\n"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_inprocess_host_prints_from_other_threads_are_not_captured(inprocess_sandbox, bridge, capsys):
    def host_prints_meanwhile() -> None:
        # Runs while the cell is mid-way, in another thread of the host.
        thread = threading.Thread(target=lambda: print("host progress line"))
        thread.start()
        thread.join()

    bridge.during_call = host_prints_meanwhile
    result = run(inprocess_sandbox, "print('cell before')\nllm_query('x')\nprint('cell after')")
    assert result.stdout == "cell before\ncell after\n"
    assert capsys.readouterr().out == "host progress line\n"


# -- the frame protocol ---------------------------------------------------------------------------


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def test_frames_round_trip(pipe):
    read_fd, write_fd = pipe
    messages = [
        {"op": "exec", "code": "print('hi')", "max_output": 10},
        {"op": "result", "stdout": "ünïcode ✓ \u2028 and text", "n": [1, 2.5, None, True]},
        {"op": "empty"},
    ]
    for message in messages:
        write_frame(write_fd, message)
    reader = FrameReader(read_fd)
    assert [reader.read() for _ in messages] == messages


def test_a_lone_surrogate_crosses_the_pipe_as_a_question_mark(pipe):
    """Such text could not be sent on over HTTP or written to a trace, so it is replaced."""
    read_fd, write_fd = pipe
    write_frame(write_fd, {"op": "result", "stdout": "bad \ud800 text"})
    assert FrameReader(read_fd).read() == {"op": "result", "stdout": "bad ? text"}


def test_frames_arriving_in_pieces_are_assembled(pipe):
    read_fd, write_fd = pipe
    reader = FrameReader(read_fd)
    frame = encode_frame({"op": "llm_query", "prompts": ["a" * 1000]})
    for piece in (frame[:2], frame[2:4], frame[4:500]):
        os.write(write_fd, piece)
        assert reader.read(deadline=time.monotonic() + 0.02) is None
    os.write(write_fd, frame[500:] + encode_frame({"op": "next"}))
    assert reader.read(deadline=time.monotonic() + 1) == {"op": "llm_query", "prompts": ["a" * 1000]}
    assert reader.read(deadline=time.monotonic() + 1) == {"op": "next"}


def test_read_returns_none_when_the_deadline_passes(pipe):
    reader = FrameReader(pipe[0])
    started = time.monotonic()
    assert reader.read(deadline=started + 0.1) is None
    assert 0.08 <= time.monotonic() - started < 1
    assert reader.read(deadline=time.monotonic() - 1) is None  # already past: no wait


def test_large_frame_round_trips_through_a_pipe(pipe):
    read_fd, write_fd = pipe
    message = {"op": "result", "stdout": "z" * 3_000_000}
    writer = threading.Thread(target=write_frame, args=(write_fd, message))
    writer.start()  # larger than the pipe buffer: the write blocks until we read
    assert FrameReader(read_fd).read(deadline=time.monotonic() + 10) == message
    writer.join()


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ((MAX_FRAME + 1).to_bytes(4, "big") + b"{}", "corrupt frame header"),
        (len(b"{not json").to_bytes(4, "big") + b"{not json", "not valid JSON"),
        (len(b"\xff\xfe").to_bytes(4, "big") + b"\xff\xfe", "not valid JSON"),
        (len(b"[1, 2]").to_bytes(4, "big") + b"[1, 2]", "'op'"),
        (len(b'{"no": 1}').to_bytes(4, "big") + b'{"no": 1}', "'op'"),
    ],
)
def test_corrupt_frames_raise_protocol_error(pipe, raw, complaint):
    read_fd, write_fd = pipe
    os.write(write_fd, raw)
    with pytest.raises(ProtocolError, match=complaint):
        FrameReader(read_fd).read(deadline=time.monotonic() + 1)


def test_end_of_stream_raises_protocol_error(pipe):
    read_fd, write_fd = pipe
    os.write(write_fd, encode_frame({"op": "x"})[:3])
    os.close(write_fd)
    with pytest.raises(ProtocolError, match="end of stream"):
        FrameReader(read_fd).read()


def test_frames_are_json_never_pickle():
    frame = encode_frame({"op": "ready", "pid": 7})
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert json.loads(frame[4:]) == {"op": "ready", "pid": 7}


# -- text helpers ---------------------------------------------------------------------------------


def test_truncate_middle_leaves_short_text_alone():
    assert truncate_middle("", 0) == ""
    assert truncate_middle("abc", 3) == "abc"
    assert truncate_middle("abc", 100) == "abc"


def test_truncate_middle_keeps_head_and_tail_and_states_the_length():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    cut = truncate_middle(text, 101)
    assert cut == text[:50] + omission_marker(1000 - 101, 1000) + text[-51:]
    assert "899 characters omitted" in cut and "1,000 characters" in cut


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_truncate_middle_with_tiny_limits(limit):
    text = "0123456789"
    cut = truncate_middle(text, limit)
    head, tail = limit // 2, limit - limit // 2
    assert cut.startswith(text[:head]) and cut.endswith(text[len(text) - tail :] if tail else "]\n")
    assert "10 characters" in cut


@pytest.mark.parametrize("limit", [0, 1, 2, 7, 100, 1001, 5000])
def test_bounded_text_equals_truncate_middle_for_many_write_patterns(limit):
    rng = random.Random(limit)
    for trial in range(40):
        total = rng.choice([0, 1, limit, limit + 1, 2 * limit + 4096, 2 * limit + 4097, rng.randrange(30_000)])
        text = "".join(rng.choice("abcdefgh\n✓") for _ in range(total))
        pattern = trial % 4
        sink = BoundedText(limit)
        position = 0
        while position < len(text):
            if pattern == 0:
                step = len(text)  # one write
            elif pattern == 1:
                step = 1  # one character at a time
            elif pattern == 2:
                step = rng.randrange(1, 9000)  # mixed sizes, some larger than the limit
            else:
                step = rng.choice([0, 1, 4096, limit + 1])  # empty writes included
            if step == 0:
                sink.write("")
                step = 1
            position_end = min(len(text), position + step)
            assert sink.write(text[position:position_end]) == position_end - position
            position = position_end
        assert sink.getvalue() == truncate_middle(text, limit), (limit, total, pattern)
        assert sink.total == len(text)


def test_bounded_text_memory_stays_bounded():
    sink = BoundedText(1000)
    piece = "y" * 1000
    tracemalloc.start()
    try:
        for _ in range(10_000):
            sink.write(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"{peak} bytes held while writing 10 MB"
    assert "10,000,000 characters" in sink.getvalue()
