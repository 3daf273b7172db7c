"""Workers forked from the fork server: each as if started afresh; the server's death and
restart; and the REPL starting while the model writes its first reply."""

from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import make, ok, repl
from rlm.rlm_repl import RLM_REPL
from rlm.sandbox import create_sandbox, forkserver
from rlm.testing import ScriptedModel

FORKED_LEVELS = ("subprocess", "strict")


def _server_pid(box) -> int:
    return int(ok(box, "import os; print(os.getppid())").strip())


@pytest.mark.parametrize("level", FORKED_LEVELS)
def test_forked_workers_have_their_own_directory_environment_and_randomness(bridge, level):
    first, second = create_sandbox(level, bridge), create_sandbox(level, bridge)
    try:
        code = "import os, random, tempfile; print(os.getcwd(), os.environ['HOME'], tempfile.gettempdir(), random.random())"
        one, two = ok(first, code).split(), ok(second, code).split()
        assert one[0] == one[1] == one[2] and two[0] == two[1] == two[2]  # each its own scratch, as HOME and TMPDIR
        assert one[0] != two[0] and one[3] != two[3]
        assert _server_pid(first) == _server_pid(second) != os.getpid()  # both forked by one server
        assert ok(first, "import os; print(sorted(os.environ))").strip() == str(
            sorted(["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"] + [n for n in ("LD_LIBRARY_PATH",) if n in os.environ]))
    finally:
        first.close()
        second.close()


def test_sessions_outlive_a_killed_server_and_the_next_one_starts_a_new_server(bridge):
    box = create_sandbox("subprocess", bridge)
    try:
        ok(box, "x = 41")
        server = _server_pid(box)
        os.kill(server, signal.SIGKILL)
        time.sleep(0.7)  # longer than the worker's watch interval: it must not take this for the host dying
        assert ok(box, "print(x + 1)").strip() == "42"
        fresh = create_sandbox("subprocess", bridge)
        try:
            assert _server_pid(fresh) != server
        finally:
            fresh.close()
    finally:
        box.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_exit_statuses_come_through_the_server(bridge):
    box = create_sandbox("subprocess", bridge)
    try:
        result = box.run("import os; os._exit(3)", timeout=10, max_output=1000)
        assert result.restarted and "exited with code 3" in result.error
        result = box.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", timeout=10, max_output=1000)
        assert result.restarted and "SIGKILL" in result.error
        assert ok(box, "print('still serving')").strip() == "still serving"
    finally:
        box.close()


def test_a_host_that_forks_gets_its_own_server(bridge):
    box = create_sandbox("subprocess", bridge)
    parent_server = _server_pid(box)
    box.close()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a forked host must not share its parent's server socket
        code = 1
        try:
            other = create_sandbox("subprocess", bridge)
            os.write(write, str(_server_pid(other)).encode())
            other.close()
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(child, 0)
    seen = os.read(read, 100).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0 and int(seen) != parent_server


# -- the REPL starts while the model writes its first reply ----------------------------------------


def test_the_context_is_exactly_the_string_given_and_described_before_the_worker_runs():
    text = "caf\u00e9 \ud800 end"  # non-ASCII, and a lone surrogate that UTF-8 cannot carry
    rlm, _, _ = make([repl("print(len(context), context == 'caf\\u00e9 \\ud800 end')"), "FINAL(ok)"],
                     sandbox="subprocess")
    assert rlm.completion(context=text, query="q") == "ok"
    start = next(event for event in rlm.trace if event.type == "run_start")
    cell = next(event for event in rlm.trace if event.type == "exec")
    assert start.context["total_length"] == len(text) == 10
    assert cell.stdout.strip() == "10 True"


def test_a_failed_first_call_leaves_no_worker_behind():
    class Failing(ScriptedModel):
        async def acomplete(self, messages, *, max_tokens=None):
            raise RuntimeError("the model is down")

    before = _workers()
    rlm = RLM_REPL(client=Failing([]), sub_client=ScriptedModel(["unused"]), sandbox="subprocess")
    with pytest.raises(RuntimeError, match="the model is down"):
        rlm.completion(context="some text", query="q")
    deadline = time.monotonic() + 5
    while _workers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _workers() - before


def _workers() -> set[int]:
    """Our forked workers now alive: children of the fork server."""
    server = forkserver._server
    if server is None:
        return set()
    with open(f"/proc/{server._process.pid}/task/{server._process.pid}/children", encoding="ascii") as children:
        return {pid for pid in map(int, children.read().split()) if _alive(pid)}
