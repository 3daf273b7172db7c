"""Workers forked from the fork server: each as if started afresh; the server's death and
restart; and the REPL starting while the model writes its first reply."""

from __future__ import annotations

import glob
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import make, ok, process_alive, repl
from rlm.errors import BudgetExceeded
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
        return {pid for pid in map(int, children.read().split()) if process_alive(pid)}


# -- regressions found in review: closing while a cell runs, waits from two threads, a broken
# -- exchange with the server, and the server's environment ------------------------------------


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Sessions of this test make their scratch here, apart from other processes' sessions."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _scratch_dirs() -> set[str]:
    from rlm.sandbox.subprocess import disk_tempdir

    return set(glob.glob(os.path.join(disk_tempdir(), "rlm-session-*")))


def _until_no_new_scratch(before: set[str]) -> set[str]:
    """A REPL still opening when its run ended is closed when it is ready, in the pool: wait."""
    deadline = time.monotonic() + 5
    while _scratch_dirs() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    return _scratch_dirs() - before


def _until_no_new_workers(before: set[int]) -> set[int]:
    deadline = time.monotonic() + 5
    while _workers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    return _workers() - before


def test_a_budget_stop_while_cells_run_is_budget_exceeded_and_leaves_nothing_behind(private_tmp):
    workers, scratch = _workers(), _scratch_dirs()
    for _ in range(4):
        rlm, _, _ = make([repl("import time; time.sleep(3)"), "FINAL(x)"], sandbox="subprocess", max_time=0.3)
        with pytest.raises(BudgetExceeded):
            rlm.completion(context="c", query="q")
    assert not _until_no_new_workers(workers)
    assert not _until_no_new_scratch(scratch)


def test_a_child_still_running_when_its_tree_ends_closes_its_worker(private_tmp):
    workers, scratch = _workers(), _scratch_dirs()
    root = ScriptedModel([repl("print(rlm_query('child question'))"), "FINAL(done)"], model="root")
    child = ScriptedModel(lambda messages: repl("import time; time.sleep(6)"), model="sub")
    rlm = RLM_REPL(client=root, sub_client=child, sandbox="subprocess", max_depth=2, max_time=1.0, exec_timeout=30)
    with pytest.raises(BudgetExceeded):
        rlm.completion(context="c", query="q")
    assert not _until_no_new_workers(workers)
    assert not _until_no_new_scratch(scratch)


def test_two_threads_waiting_for_one_worker_both_get_its_exit_status(bridge):
    box = create_sandbox("subprocess", bridge)
    try:
        process = box._held.worker.process
        box._held.worker.request({"op": "exec", "code": "import os; os._exit(3)", "max_output": 100})
        with ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda _: process.wait(5), range(2)))
        assert codes == [3, 3] and process.returncode == 3
    finally:
        box.close()


def test_an_exchange_cut_short_abandons_the_server_and_the_next_start_gets_a_new_one(bridge, monkeypatch):
    first = create_sandbox("subprocess", bridge)
    server = _server_pid(first)
    first.close()
    real = forkserver.socket.recv_fds

    def interrupted(*args, **kwargs):
        monkeypatch.setattr(forkserver.socket, "recv_fds", real)
        raise KeyboardInterrupt  # Ctrl-C between the request and its reply

    monkeypatch.setattr(forkserver.socket, "recv_fds", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create_sandbox("subprocess", bridge)
    again = create_sandbox("subprocess", bridge)
    try:
        assert _server_pid(again) != server
        assert ok(again, "print(6 * 7)").strip() == "42"
    finally:
        again.close()


def test_the_server_starts_with_the_library_path_its_workers_need(bridge, monkeypatch, tmp_path):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path))
    box = create_sandbox("subprocess", bridge)
    try:
        with open(f"/proc/{_server_pid(box)}/environ", "rb") as environ:
            assert f"LD_LIBRARY_PATH={tmp_path}".encode() in environ.read().split(b"\0")
    finally:
        box.close()
