"""What only one backend can do: the worker process (crashes, kills, scrubbed environment, clean-up)
and the in-process sandbox (output capture that leaves the host's printing alone)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import RecordingBridge, make, ok, process_alive, repl, run
from rlm.sandbox import ContextSource, SandboxLimits, create_sandbox
from rlm.sandbox import subprocess as subprocess_sandbox
from rlm.sandbox.workerio import STDERR_KEPT


@pytest.fixture(params=["subprocess", "strict", "bwrap"])
def worker_sandbox(request: pytest.FixtureRequest, bridge: RecordingBridge):
    """Each level that runs a worker process (the confined ones are subclasses of subprocess)."""
    box = create_sandbox(request.param, bridge)
    yield box
    box.close()


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
    old_pid = worker_sandbox.worker_pid  # as the host sees it (inside bwrap it is another number)
    assert run(worker_sandbox, "sum(range(10**12))", timeout=0.2).restarted
    new_pid = worker_sandbox.worker_pid
    assert new_pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)



# -- what crosses the pipe: frames under the cap, read-only files, bounded stderr ------------------


def test_a_batch_too_large_for_one_frame_goes_as_several_requests(worker_sandbox, bridge):
    out = ok(worker_sandbox, "answers = llm_query_batched([str(i) * 1_000_000 for i in range(10)])\n"
                             "print(len(answers), [len(a) for a in answers] == [1_000_000] * 10, answers[9][:3])")
    assert out == "10 True 999\n"
    assert [len(prompts) for _, prompts in bridge.calls] == [4, 4, 2]
    assert [prompts[0][0] for _, prompts in bridge.calls] == ["0", "4", "8"]  # in order


def test_a_prompt_too_large_for_a_frame_fails_in_model_code_saying_the_limit(worker_sandbox, bridge):
    result = run(worker_sandbox, "llm_query('é' * 3_000_000)")
    assert "ValueError: llm_query: the prompt is 6,000,003 bytes" in result.error
    assert "at most 4,190,208 bytes (about 4 MiB)" in result.error and "subcalls.py" not in result.error
    assert not result.restarted and bridge.calls == []
    assert ok(worker_sandbox, "print(llm_query('fine'))") == "FINE\n"


def test_answers_too_large_for_one_frame_come_in_several_and_one_too_long_alone_is_cut(worker_sandbox):
    answers = {"many": "m" * 1_000_000, "huge": "é" * 3_000_000}
    box = create_sandbox(worker_sandbox.name, lambda kind, prompts: [answers[prompt] for prompt in prompts])
    try:
        code = ("a = llm_query_batched(['many'] * 10 + ['huge'])\n"
                "print(len(a), a[:10] == ['m' * 1_000_000] * 10, len(a[10].encode()) < 4 << 20, a[10][:2])\n"
                "print('characters omitted; the full text was 3,000,000 characters' in a[10])")
        assert ok(box, code) == "11 True True éé\nTrue\n"
        assert ok(box, "print(llm_query('many') == 'm' * 1_000_000)") == "True\n"  # and the stream is in step
    finally:
        box.close()


@pytest.mark.parametrize("level", ["subprocess", "strict"])
def test_a_sandbox_works_while_the_host_has_more_than_1024_descriptors_open(bridge, level):
    """select() refuses a descriptor numbered past 1023; every wait on a worker polls instead."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2048:
        pytest.skip("needs 2048 descriptors")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with create_sandbox(level, bridge) as box:
            assert box._held.worker.process.stdout.fileno() >= 1024  # noqa: SLF001 - the pipe the host waits on
            assert ok(box, "print(llm_query('still fine'))") == "STILL FINE\n"
            result = run(box, "import time\ntime.sleep(30)", timeout=0.5)  # the host waits with a deadline
            assert result.timed_out and not result.restarted
            assert ok(box, "print('after')") == "after\n"
    finally:
        for fd in held:
            os.close(fd)


def test_a_large_rlm_query_context_comes_as_a_read_only_file_and_data_as_json_text(worker_sandbox):
    seen = []

    def bridge(kind, items):
        for item in items:
            source = item.context
            if source.handle is not None:
                with pytest.raises(OSError):
                    os.pwrite(source.handle, b"changed", 0)
                mode = fcntl.fcntl(source.handle, fcntl.F_GETFL) & os.O_ACCMODE
                seen.append(("file", source.fmt, os.pread(source.handle, 10, 0), os.fstat(source.handle).st_size,
                             mode == os.O_RDONLY))
            else:
                seen.append(("text", source.json_text, source.value))
        return ["ok"] * len(items)

    box = create_sandbox(worker_sandbox.name, bridge)
    try:
        code = "print(rlm_query('big', 'ü' * 300_000), rlm_query_batched(['a', 'b'], [[1, [2]], 'plain']))"
        assert ok(box, code) == "ok ['ok', 'ok']\n"
        # The file was in scratch, without a name, and is gone with the host's descriptor.
        assert ok(box, "import os\nprint(os.listdir('.'))") == "[]\n"
    finally:
        box.close()
    (_, fmt, head, size, read_only), *rest = seen
    assert (fmt, head, size, read_only) == ("text", ("ü" * 5).encode(), 600_000, True)
    assert rest == [("text", "[1, [2]]", None), ("text", None, "plain")]


def test_a_context_file_scratch_cannot_hold_fails_in_model_code_saying_what_to_do():
    """The file counts against scratch like any other: here against the file-size limit."""
    calls = []

    def bridge(kind, items):
        calls.append([os.fstat(item.context.handle).st_size for item in items])
        return ["ok"] * len(items)

    with create_sandbox("strict", bridge, SandboxLimits(file_size=1 << 20)) as box:
        result = run(box, "import os\nos.chdir('/')\nrlm_query('big', 'x' * 2_000_000)")
        assert "OSError: [Errno 27] rlm_query: context 0 (2,000,000 characters)" in result.error
        assert "file_size_limit" in result.error and not result.restarted
        assert ok(box, "print(rlm_query('small', 'y' * 300_000))") == "ok\n"  # written in scratch, not in /
    assert calls == [[300_000]]


@pytest.mark.parametrize("kind", ["str", "json", "path", "handle"])
def test_every_context_descriptor_the_worker_gets_is_read_only(worker_sandbox, tmp_path, kind):
    text = "y" * 200_000
    path = tmp_path / "context.txt"
    path.write_text(text, encoding="utf-8")
    with open(path, "r+b") as writable:
        sources = {"str": ContextSource(value=text), "json": ContextSource(value=[text]),
                   "path": ContextSource(path=path), "handle": ContextSource(handle=writable.fileno())}
        worker_sandbox.load_context(sources[kind])
    passed = worker_sandbox._held.context_file  # noqa: SLF001 - what the host passed
    assert fcntl.fcntl(passed.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    # The worker keeps a text context's descriptor (its mapping); a JSON one it closes once parsed.
    code = ("import fcntl, os, stat\nfound = []\nfor name in os.listdir('/proc/self/fd'):\n    try:\n"
            "        info = os.fstat(int(name))\n    except OSError:\n        continue\n"
            "    if stat.S_ISREG(info.st_mode) and info.st_size > 100_000:\n"
            "        found.append(fcntl.fcntl(int(name), fcntl.F_GETFL) & os.O_ACCMODE)\nprint(found)")
    assert ok(worker_sandbox, code) == ("[]\n" if kind == "json" else f"[{os.O_RDONLY}]\n")


def test_worker_stderr_is_kept_bounded_in_host_memory(worker_sandbox):
    code = "import os\nfor _ in range(300):\n    os.write(2, b'e' * 65536)\n    os.write(1, b'o' * 65536)\n" \
           "os.write(2, b'THE LAST WORDS')\nprint('still fine')"
    assert ok(worker_sandbox, code) == "still fine\n"
    worker = worker_sandbox._held.worker
    assert len(worker.stderr_tail(limit=1 << 30)) <= STDERR_KEPT
    result = run(worker_sandbox, "import os\nos._exit(5)")
    assert result.restarted and "code 5" in result.error and "THE LAST WORDS" in result.error


def test_a_sub_call_from_a_thread_its_cell_left_behind_fails_in_that_thread_only(worker_sandbox, bridge):
    code = ("import threading, time\nerrors = []\n"
            "def late():\n    time.sleep(0.3)\n    try:\n        llm_query('late')\n"
            "    except Exception as exc:\n        errors.append(str(exc))\n"
            "threading.Thread(target=late).start()")
    ok(worker_sandbox, code)
    time.sleep(0.8)
    assert "only be called while a cell runs" in ok(worker_sandbox, "print(errors)")
    assert bridge.calls == []



# A host that starts a worker, reports the worker's pid and scratch directory, then waits on
# a cell that never ends, until it is killed.
KILLED_HOST = """\
from rlm.sandbox import ContextSource, create_sandbox
box = create_sandbox("subprocess", lambda kind, prompts: prompts)
box.load_context(ContextSource(value="the context"))
# A process that detaches itself (a new session, a double fork) and tells its pid on a pipe.
detach = '''
import os, json, time
read, write = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(write, str(os.getpid()).encode())
        time.sleep(120)
    os._exit(0)
os.wait()
print(json.dumps([os.getpid(), os.getcwd(), int(os.read(read, 32))]))
'''
cell = box.run(detach, timeout=30, max_output=1000)
print(cell.stdout, end="", flush=True)
box.run("while True:\\n    pass", timeout=600, max_output=1000)
"""


def _first_line(stream, deadline: float) -> str:
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        if select.select([stream], [], [], 0.1)[0]:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data.decode()


def test_worker_of_a_killed_host_exits_with_what_it_started_and_removes_its_scratch_directory(tmp_path):
    """SIGKILL gives the host no chance to clean up: the orphaned worker must notice and go,
    taking along a process its model code detached."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    host = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOST], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env,
    )
    pid, scratch, detached = None, None, None
    try:
        line = _first_line(host.stdout, time.monotonic() + 30)
        assert line, host.stderr.read().decode() if host.poll() is not None else "no output from the host"
        pid, scratch, detached = json.loads(line)
        assert process_alive(pid) and process_alive(detached) and Path(scratch).is_dir() and Path(scratch).parent == tmp_path
        host.kill()
        host.wait(timeout=10)
        deadline = time.monotonic() + 3
        while (process_alive(pid) or process_alive(detached) or Path(scratch).exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(pid), "the orphaned worker is still running"
        assert not process_alive(detached), "a process the worker's model code started is still running"
        assert not Path(scratch).exists(), "the orphaned worker left its scratch directory"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(timeout=10)
        for pipe in (host.stdout, host.stderr):
            pipe.close()
        for leftover in (pid, detached):  # do not leave a spinning worker behind a failed test
            if leftover is not None and process_alive(leftover):
                os.kill(leftover, signal.SIGKILL)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


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


# -- rlm_query contexts through a whole run ---------------------------------------------------------


@pytest.mark.parametrize("level", ["subprocess", "strict"])
def test_child_runs_load_contexts_sent_as_files_and_as_json_text(level):
    def sub(messages: list[dict]) -> str:
        if messages[0]["role"] != "system":
            return "leaf"
        if len(messages) == 2:
            return repl("print(type(context).__name__, len(context), context[0] if isinstance(context, list) else '')")
        return f"FINAL({messages[-1]['content'].split('Output:')[-1][:60].strip()})"

    code = "print(rlm_query('big', 'z' * 400_000))\nprint(rlm_query('data', [['a', 1], {'b': None}]))\n" \
           "try:\n    rlm_query_batched(['x'], [object()])\nexcept TypeError as exc:\n    print('refused', exc)"
    rlm, _, _ = make([repl(code), "FINAL(top)"], sub, sandbox=level, max_depth=2)
    assert rlm.completion(context="c", query="q") == "top"
    starts = [event for event in rlm.trace if event.type == "run_start"]
    assert [(s.depth, s.context["type"], s.context["total_length"]) for s in starts[1:]] == [
        (1, "str", 400_000), (1, "list", len('["a", 1]') + len('{"b": null}'))]
    out = [event for event in rlm.trace if event.type == "exec" and event.depth == 0][0].stdout
    assert "str 400000" in out and "list 2 ['a', 1]" in out and "refused rlm_query: context 0 must be" in out
