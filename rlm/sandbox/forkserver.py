"""A fork server for REPL workers: a new worker in ~5 ms instead of ~45 ms for a new interpreter.

A call tree with `max_depth >= 2` starts one worker per child RLM; eight children on two
cores paid ~300 ms of interpreter start-up before any of them could run a cell. The fork
server is one clean interpreter per host process (`python -I -S`, scrubbed environment, no
threads) that has imported the worker's modules once; each worker is a fork of it.

Host side: `spawn(...)` hands the server a worker's pipes over a Unix socket (SCM_RIGHTS)
with its directory and environment, and gets back a `ForkedProcess`, which behaves as much
like `subprocess.Popen` as `WorkerProcess` needs (pid, pipes, poll, wait, returncode). The server
reaps its children and tells the host their exit status on request.

In the child, before any model code: the server's socket is closed, a new session is
started, the pipes become fds 0-2, the directory and environment are the session's own.
Confinement (limits, Landlock, seccomp) is applied by the worker itself, exactly as in a
freshly started one. The server dies with the host (end of its socket). A worker watches the
host, not its parent: it outlives a server that dies (the next spawn starts a new server),
and leaves when the host dies (see worker._exit_when_orphaned).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import sys
import threading

from rlm.sandbox import kernel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

__all__ = ["ForkedProcess", "spawn", "serve"]

_MESSAGE = 64 * 1024  # bytes: a request (directory and environment) or a reply
_STRAY_CHECK = 0.5  # seconds between looks, while idle, for ended workers and what they left running
_PR_SET_CHILD_SUBREAPER = 36
_ANSWER_TIMEOUT = 30.0  # seconds the server may take to fork (or reap) before it is abandoned
# Imported once in the server, so that no worker imports them again (and, on a spawn that
# asks for them, the modules its confinement needs: see spawn()).
_PRELOAD = ("rlm.sandbox.worker", "rlm.sandbox.serve", "rlm.sandbox.confine", "rlm.sandbox.protocol", "rlm.sandbox.textfile",
            "rlm.sandbox.integrity", "rlm.sandbox.subcalls", "shutil", "select", "socket", "fcntl")


# -- the host side ----------------------------------------------------------------------------


class ForkedProcess:
    """A worker forked by the server: the parts of `subprocess.Popen` the sandbox uses.

    `pidfd` (sent by the server, which opened it right after the fork) always refers to this
    worker, however long ago it ended: the pid is never trusted alone.
    """

    def __init__(self, server: "_Server", pid: int, pidfd: int, stdin: "IO[bytes]", stdout: "IO[bytes]") -> None:
        self._server = server
        self.pid = pid
        self.args = [f"forked worker {pid}"]
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self._pidfd: int | None = pidfd
        self._lock = threading.Lock()  # the session's cell thread and its closer may both wait

    def poll(self) -> int | None:
        import subprocess

        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: the signal that killed it); TimeoutExpired if still running."""
        import subprocess

        with self._lock:
            if self.returncode is not None:
                return self.returncode
            if self._pidfd is not None:
                ended = select.poll()
                ended.register(self._pidfd, select.POLLIN)  # readable once the process has ended
                if not ended.poll(None if timeout is None else max(0, int(timeout * 1000))):
                    raise subprocess.TimeoutExpired(self.args, timeout or 0)
                os.close(self._pidfd)
                self._pidfd = None
            self.returncode = self._server.reap(self.pid)
            return self.returncode


class _Server:
    """The host's end of one running fork server."""

    def __init__(self, key: tuple, paths: str, env: dict[str, str]) -> None:
        import subprocess

        self.key = key
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._socket.settimeout(_ANSWER_TIMEOUT)
        boot = "import json, sys; path = json.loads(sys.argv[1]); sys.path[:0] = path[:1]; sys.path += path[1:]; " \
               "from rlm.sandbox.forkserver import serve; serve(int(sys.argv[2]))"
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", boot, paths, str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd="/", env=env, pass_fds=(theirs.fileno(),), start_new_session=True,
            )
        finally:
            theirs.close()
        self._lock = threading.Lock()
        self._broken = False
        self.owner = os.getpid()

    def ask(self, request: dict, fds: "list[int] | None" = None) -> tuple[dict, list[int]]:
        """Send a request; its reply and the descriptors that came with it."""
        with self._lock:
            if self._broken:
                raise OSError("the REPL fork server was abandoned")
            try:
                socket.send_fds(self._socket, [json.dumps(request).encode()], fds or [])
                reply, got, _, _ = socket.recv_fds(self._socket, _MESSAGE, 1)
            except BaseException:
                # Interrupted between a request and its reply (Ctrl-C, a timeout): a late reply
                # would answer the next request. Abandon this server; the next spawn starts one.
                self._broken = True
                self._socket.close()
                raise
        if not reply:
            self._broken = True
            raise OSError("the REPL fork server has stopped")
        return json.loads(reply), got

    def reap(self, pid: int) -> int:
        try:
            return int(self.ask({"op": "reap", "pid": pid})[0]["status"])
        except OSError:
            # The server is gone and init reaped its children: their status is lost. Most
            # likely they were killed with it.
            return -signal.SIGKILL

    def alive(self) -> bool:
        return not self._broken and self._process.poll() is None and self.owner == os.getpid()

    def close(self) -> None:
        """Stop the server (it exits when its socket closes); its workers live on."""
        self._broken = True
        self._socket.close()
        import subprocess

        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # stuck (or stopped): do not hang the host's exit
            self._process.kill()
            self._process.wait()


def _stop_server() -> None:
    if _server is not None and _server.owner == os.getpid():
        _server.close()


def _forget_server_after_fork() -> None:
    """In a forked host: the parent's server, socket and locks are not ours (a lock held by
    another thread at the fork would stay held here forever)."""
    global _server, _start_lock
    if _server is not None:
        _server._socket.close()  # our copy only: the parent's server must see its host leave
    _server = None
    _start_lock = threading.Lock()


_server: _Server | None = None


def spawn(
    paths: str, cwd: str, env: dict[str, str], stderr: int, files: int, preload: tuple[str, ...] = ()
) -> ForkedProcess:
    """Fork a worker with its own directory, environment, stderr and file channel.

    `paths` is the worker's `sys.path` as `python_argv()` gives it (JSON: our package first,
    then site-packages after the standard library); `preload` names modules the server
    imports first, once (Landlock and seccomp bindings take ~70 ms to import: only the strict
    level asks for them). Raises OSError when the fork server cannot be started or cannot fork.
    """
    global _server
    # The loader reads LD_LIBRARY_PATH only when a program starts: the server needs the worker's.
    server_env = {"PATH": env.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    server_env.update({name: env[name] for name in ("LD_LIBRARY_PATH",) if name in env})
    key = (paths, tuple(sorted(server_env.items())))
    with _start_lock:
        if _server is None or not _server.alive() or _server.key != key:
            if _server is not None and _server.owner == os.getpid():
                _server.close()
            _server = _Server(key, paths, server_env)
        server = _server
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    try:
        request = {"op": "spawn", "cwd": cwd, "env": env, "host": os.getpid(), "preload": list(preload)}
        reply, pidfds = server.ask(request, [stdin_read, stdout_write, stderr, files])
        if "error" in reply or len(pidfds) != 1:
            for fd in pidfds:
                os.close(fd)
            raise OSError(reply.get("error") or "the REPL fork server did not say which process it made")
    except BaseException:
        for fd in (stdin_write, stdout_read):
            os.close(fd)
        raise
    finally:
        os.close(stdin_read)
        os.close(stdout_write)
    stdin, stdout = open(stdin_write, "wb", buffering=0), open(stdout_read, "rb", buffering=0)
    return ForkedProcess(server, int(reply["pid"]), pidfds[0], stdin, stdout)


_start_lock = threading.Lock()
atexit.register(_stop_server)
os.register_at_fork(after_in_child=_forget_server_after_fork)


# -- the server side ----------------------------------------------------------------------------


def serve(control: int) -> None:
    """Run the fork server on `control` until the host closes it (never returns in a child).

    The server is a child subreaper: what a worker's model code left running when the worker
    died (crashed, or killed without its descendants) comes to us, and is killed at once. When
    the host is gone, the server kills every worker, whatever its model code did to its own
    exit path, and removes their scratch directories. A server that dies first (killed) leaves
    its workers to their sessions: each still leaves by itself when the host goes.
    """
    _import(_PRELOAD)
    kernel.libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    channel = socket.socket(fileno=control)
    channel.settimeout(_STRAY_CHECK)
    workers: dict[int, str] = {}  # pid: working directory (its scratch at the worker levels)
    finished: dict[int, int] = {}
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, _MESSAGE, 4)
        except TimeoutError:
            _reap_finished(workers, finished)
            continue
        except OSError:
            data, fds = b"", []
        if not data:
            _leave(workers)
        _reap_finished(workers, finished)
        request = json.loads(data)
        sent: list[int] = []
        if request["op"] == "spawn":
            _import(request["preload"])
            reply, sent = _fork(channel, fds, request)
            if "pid" in reply:
                workers[reply["pid"]] = request["cwd"]
        else:
            reply = {"status": _status(request["pid"], workers, finished)}
        socket.send_fds(channel, [json.dumps(reply).encode()], sent)
        for fd in sent:
            os.close(fd)


def _import(names: "list[str] | tuple[str, ...]") -> None:
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the worker will say what is missing when it needs it


def _fork(channel: socket.socket, fds: list[int], request: dict) -> tuple[dict, list[int]]:
    """Fork a worker: the reply, and the worker's pidfd to send with it (opened before any reaping)."""
    sent: list[int] = []
    try:
        pid = os.fork()
    except OSError as exc:
        reply: dict = {"error": f"cannot fork a REPL worker: {exc}"}
    else:
        if pid == 0:
            _become_worker(channel, fds, request)
        reply = {"pid": pid}
        sent = [os.pidfd_open(pid)]
    for fd in fds:
        os.close(fd)
    return reply, sent


def _become_worker(channel: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked child: become a worker as if started afresh; never returns."""
    code = 1
    try:
        channel.close()
        os.setsid()
        stdin, stdout, stderr, files = fds
        for target, fd in enumerate((stdin, stdout, stderr)):
            os.dup2(fd, target)
        for fd in (stdin, stdout, stderr):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if "tempfile" in sys.modules:
            sys.modules["tempfile"].tempdir = None  # found again from TMPDIR, the session's scratch
        sys.argv = [sys.argv[0], sys.argv[1], str(files), str(request["host"])]
        from rlm.sandbox.serve import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # nothing more can be said
        os._exit(code)


def _leave(workers: dict[int, str]) -> None:
    """The host is gone: kill every worker and what it started, remove their scratch, exit."""
    import shutil

    kernel.kill_strays(set())
    for cwd in workers.values():
        if os.path.basename(cwd).startswith("rlm-session-"):
            shutil.rmtree(cwd, ignore_errors=True)
    os._exit(0)


def _reap_finished(workers: dict[int, str], finished: dict[int, int]) -> None:
    """Collect the exit status of every ended child; after a worker's end, kill its strays."""
    reaped = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped = True
        if workers.pop(pid, None) is not None:
            finished[pid] = os.waitstatus_to_exitcode(status)
    if reaped:
        kernel.kill_strays(set(workers))


def _status(pid: int, workers: dict[int, str], finished: dict[int, int]) -> int:
    if pid not in finished:
        try:
            _, status = os.waitpid(pid, 0)  # the host saw it end: this does not block for long
            finished[pid] = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            return -9
        workers.pop(pid, None)
        kernel.kill_strays(set(workers))
    return finished.pop(pid)
