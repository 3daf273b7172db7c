"""The default sandbox: a persistent worker process per session.

Protects the host from crashes, hangs and runaway output of model code; it does NOT protect
against hostile code (the worker runs as the same user and can read what that user can).
The worker gets a scrubbed environment, so API keys in the host's environment never reach it,
and the resource limits of `SandboxLimits` (address space, CPU time, file size).

Timeouts: SIGINT first (the worker raises KeyboardInterrupt only inside model code, so
variables survive); if the cell has not stopped after a grace period, SIGKILL, a new worker,
and the context loaded again. Time the host spends answering `llm_query` is not counted
against the cell's limit.

Files: the context is never sent through the pipe. A `Path` context is opened here (never
read) and its descriptor passed to the worker, which maps it; a `str` or JSON context is
first written once, in 16 MiB pieces, to an unnamed temporary file on disk, which the kernel
frees when the last descriptor to it closes, whatever happens to either process. Model
code's scratch directory is removed on close, or by the worker itself if the host dies.

The worker is untrusted whatever the level: every frame it sends is checked against the
schema and caps of protocol.py, and matched to the request in flight by an id it cannot
guess ahead. A frame that breaks them stops that worker: a cell reports it (the worker is
replaced, as after a crash), another request raises SandboxError. Its stderr is a pipe kept
bounded in memory (workerio.py).

The confined levels (`strict`, `bwrap`) are subclasses: they change how the worker is
launched and what confinement it applies to itself before it says it is ready.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, Callable

from rlm._text import is_utf8
from rlm.errors import ContextError, SandboxError
from rlm.sandbox.base import (
    ContextSource,
    ExecResult,
    LLMBridge,
    Sandbox,
    SandboxLimits,
    SubCallFailed,
    child_queries,
    result_from_session,
)
from rlm.sandbox import forkserver, kernel
from rlm.sandbox.launch import Launch, disk_tempdir, package_root, scrubbed_env, worker_path
from rlm.sandbox.protocol import (
    MAX_JSON_ITEMS,
    WORKER_FRAME_CAP,
    WORKER_FRAMES,
    FrameReader,
    ProtocolError,
    ProtocolViolation,
    write_frame,
)
from rlm.sandbox.workerio import StderrTail, receive_sealed_files
from rlm.sandbox.textfile import ascii_view

# Launch, disk_tempdir, package_root and scrubbed_env live in launch.py; the
# confined levels and the tools import them from here too.
__all__ = ["Launch", "SubprocessSandbox", "disk_tempdir", "package_root", "python_argv", "scrubbed_env"]

INTERRUPT_GRACE = 1.0  # seconds between SIGINT and SIGKILL
START_TIMEOUT = 30.0
_WRITE_CHUNK = 16 << 20
_INLINE_TEXT = 64 << 10  # characters: a str context up to this size goes in the frame itself

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid

# The worker imports our package from where the host found it, nothing from the environment.
BOOT = ("import json, sys; path = json.loads(sys.argv[1]); sys.path[:0] = path[:1]; sys.path += path[1:]; "
        "from rlm.sandbox.worker import main; main()")


def python_argv() -> list[str]:
    """The command that starts a worker, before the file channel's descriptor number.

    `-S`: no `site` at start-up. Its `.pth` hooks (editable installs, certificate shims...)
    cost 50-70 ms on a 2-core machine, which a tree of child REPLs pays once per child, and
    they run code nobody chose for the sandbox. The worker gets our package and the
    installation's site-packages on `sys.path` instead, so model code can still import
    what is installed (but not packages that only a `.pth` hook makes importable).
    """
    return [sys.executable, "-I", "-S", "-c", BOOT, worker_path()]


def _write_text(handle: IO[bytes], text: str) -> None:
    """Write `text` as UTF-8 in 16 MiB pieces; an ASCII string straight from its own buffer."""
    view = ascii_view(text)
    if view is not None:
        for start in range(0, len(view), _WRITE_CHUNK):
            handle.write(view[start : start + _WRITE_CHUNK])
        return
    for start in range(0, len(text), _WRITE_CHUNK):
        handle.write(text[start : start + _WRITE_CHUNK].encode("utf-8", "surrogatepass"))


class _Worker:
    """One worker process, the pipes to it, and the socket that carries file descriptors."""

    def __init__(self, launch: Launch, setup: Callable[[int], dict]) -> None:
        self.launch = launch
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.stderr = StderrTail()
        self.files, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.files.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            self.process = self._forked(worker_end) if launch.forked else subprocess.Popen(
                [*launch.argv, str(worker_end.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr.write_fd,
                cwd=launch.cwd,
                env=launch.env,
                pass_fds=(worker_end.fileno(), *launch.pass_fds),
                start_new_session=True,
            )
        except BaseException as exc:
            self.files.close()
            self.stderr.close()
            if isinstance(exc, OSError):
                raise SandboxError(f"cannot start the REPL worker ({launch.argv[0]}): {exc}") from None
            raise
        finally:
            worker_end.close()
        self.stderr.started()
        self.reader = FrameReader(
            self.process.stdout.fileno(), limit=WORKER_FRAME_CAP, max_items=MAX_JSON_ITEMS, schema=WORKER_FRAMES
        )
        self._handshake(setup, time.monotonic() + START_TIMEOUT)

    def _forked(self, worker_end: socket.socket) -> forkserver.ForkedProcess:
        launch = self.launch
        return forkserver.spawn(worker_path(), launch.cwd, launch.env, self.stderr.write_fd, worker_end.fileno(), launch.preload)

    def _handshake(self, setup: Callable[[int], dict], deadline: float) -> None:
        ready = None
        try:
            self.pid = self._peer_pid(deadline)
            self.pidfd = os.pidfd_open(self.pid)
            hello = self.receive(deadline)
            if hello is not None and hello["op"] == "hello":
                self.send({"op": "setup", **setup(hello["pid"])})
                ready = self.receive(deadline)
        except (ProtocolError, OSError):
            ready = None
        if ready is None or ready["op"] != "ready":
            self.kill()
            output = self.stderr.tail(wait=1.0) or "no output"
            self.close_log()
            raise SandboxError(f"the REPL worker ({self.launch.argv[0]}) did not start: {output}")

    def _peer_pid(self, deadline: float) -> int:
        """The worker's pid in our pid namespace, from the credentials on its first byte."""
        self.files.settimeout(max(0.001, deadline - time.monotonic()))
        data, ancillary, _, _ = self.files.recvmsg(1, socket.CMSG_SPACE(_CREDENTIALS.size))
        self.files.settimeout(None)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and data:
                return _CREDENTIALS.unpack_from(payload)[0]
        raise ProtocolError("the worker closed its file channel before saying who it is")

    def send(self, message: dict) -> None:
        try:
            write_frame(self.process.stdin.fileno(), message)
        except (OSError, ValueError) as exc:  # ValueError: the pipe was already closed
            raise ProtocolError(f"cannot write to the worker: {exc}") from None

    def send_file(self, handle: IO[bytes]) -> None:
        try:
            socket.send_fds(self.files, [b"f"], [handle.fileno()])
        except OSError as exc:
            raise ProtocolError(f"cannot pass a file to the worker: {exc}") from None

    def receive(self, deadline: float | None) -> dict | None:
        return self.reader.read(deadline)

    def request(self, message: dict) -> int:
        """Send a request with a new id (unguessable: model code cannot forge a later reply early)."""
        request_id = secrets.randbits(48)
        self.send({**message, "id": request_id})
        return request_id

    def reply(self, request_id: int, ops: tuple[str, ...], deadline: float | None) -> dict | None:
        """The next frame, which must be one of `ops` for request `request_id`; None past `deadline`."""
        message = self.receive(deadline)
        if message is None:
            return None
        if message["op"] not in ops:
            raise ProtocolViolation(f"a {message['op']!r} frame where {' or '.join(map(repr, ops))} was due")
        if message["id"] != request_id:
            raise ProtocolViolation(f"a {message['op']!r} frame for another request than the one in flight")
        return message

    def receive_files(self, count: int) -> list[int]:
        return receive_sealed_files(self.files, count) if count else []

    def _signal(self, signum: int) -> None:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass  # already gone

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        """Kill the worker and every process below it, then close our ends.

        The worker is a child subreaper (confine.py), so whatever its model code started stays
        below it however it detached (setsid, double fork). Stopped first, it starts nothing
        more while those are killed; then it goes.
        """
        if self.pid is not None and self.process.poll() is None:
            self._signal(signal.SIGSTOP)
            kernel.kill_descendants(self.pid)
        self._signal(signal.SIGKILL)
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # and anything the worker started
            except ProcessLookupError:
                pass
        self.process.wait()
        self._close_handles()

    def _close_handles(self) -> None:
        for handle in (self.process.stdin, self.process.stdout, self.files):
            handle.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def death_note(self) -> str:
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:  # alive but talking nonsense: it cannot be trusted
            self.kill()
            code = self.process.returncode
        if self.launch.signal_in_exit_code and code > 128:
            code = -(code - 128)
        how = _signal_note(-code) if code < 0 else f"exited with code {code}"
        tail = self.stderr.tail(wait=0.5)
        return how + (f"; its last output:\n{tail}" if tail else "")

    def stderr_tail(self, limit: int = 2000) -> str:
        return self.stderr.tail(limit)

    def close_log(self) -> None:
        self.stderr.close()


def _signal_note(signum: int) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown"
    note = f"killed by signal {signum} ({name})"
    if signum == signal.SIGXCPU:
        note += ": it used up its CPU time limit"
    return note


class _Held:
    """What a session holds outside Python: released by close() or when the sandbox is collected.

    close() may come from another thread while a cell's thread is replacing a dead worker:
    the worker is swapped under a lock, and none is adopted once the session is closed.
    """

    def __init__(self, scratch: Path | None) -> None:
        self.scratch = scratch
        self.worker: _Worker | None = None
        self.context_file: IO[bytes] | None = None
        self.closed = False
        self._lock = threading.Lock()

    def adopt(self, worker: _Worker) -> bool:
        """Make `worker` the session's; False (and the worker stopped) if the session is closed."""
        with self._lock:
            if not self.closed:
                self.worker = worker
                return True
        worker.kill()
        worker.close_log()
        return False

    def drop_worker(self) -> None:
        with self._lock:
            worker, self.worker = self.worker, None
        if worker is not None:
            worker.kill()
            worker.close_log()

    def release(self) -> None:
        with self._lock:
            self.closed = True
        try:
            self.drop_worker()
        finally:
            if self.context_file is not None:
                self.context_file.close()
                self.context_file = None
            if self.scratch is not None:
                shutil.rmtree(self.scratch, ignore_errors=True)


class SubprocessSandbox(Sandbox):
    """Runs cells in a persistent child process (`python -I`), talking JSON frames."""

    name = "subprocess"
    isolated = False
    _preload: tuple[str, ...] = ()  # what the worker's confinement imports (see forkserver.spawn)

    def __init__(self, bridge: LLMBridge, limits: SandboxLimits | None = None) -> None:
        self._bridge = bridge
        self.limits = limits if limits is not None else SandboxLimits()
        self.check_platform()
        self._held = _Held(self._make_scratch())
        self._finalizer = weakref.finalize(self, self._held.release)
        self._context_message: dict | None = None
        self._held.adopt(self._start())

    # -- what the confined levels change ----------------------------------------------------

    def _make_scratch(self) -> Path | None:
        return Path(tempfile.mkdtemp(prefix="rlm-session-", dir=disk_tempdir()))

    def _launch(self) -> Launch:
        scratch = str(self._held.scratch)
        argv = python_argv()  # cwd is the scratch dir
        return Launch(argv=argv, cwd=scratch, env=scrubbed_env(scratch), forked=True, preload=self._preload)

    def _confinement(self, worker_pid: int) -> dict[str, Any]:
        """Landlock and seccomp settings for the worker's setup frame (none here)."""
        return {}

    # -- workers ---------------------------------------------------------------------------

    def _start(self) -> _Worker:
        return _Worker(self._launch(), lambda pid: {"limits": self.limits.as_message(), **self._confinement(pid)})

    @property
    def _worker(self) -> _Worker | None:
        return self._held.worker

    @property
    def worker_pid(self) -> int | None:
        """The worker's process id as the host sees it (None between a crash and the next cell)."""
        return self._held.worker.pid if self._held.worker is not None else None

    def _discard_worker(self) -> None:
        self._held.drop_worker()

    def _replace_worker(self) -> bool:
        """A new worker with the context loaded again; False if the session was closed meanwhile."""
        self._discard_worker()
        if self._held.closed or not self._held.adopt(self._start()):
            return False
        if self._context_message is not None:
            self._send_context()
        return True

    def _require_worker(self) -> _Worker:
        worker = self._held.worker
        if worker is None and not self._held.closed and self._replace_worker():
            worker = self._held.worker
        if worker is None:
            raise SandboxError("this REPL session is closed")
        return worker

    # -- context ---------------------------------------------------------------------------

    def load_context(self, source: ContextSource) -> dict:
        message, handle = self._context_file(source)
        if self._held.context_file is not None:
            self._held.context_file.close()
        self._held.context_file = handle
        self._context_message = message
        return self._send_context()

    def _context_file(self, source: ContextSource) -> tuple[dict, IO[bytes] | None]:
        if source.path is not None:
            return {"op": "load_context", "format": source.fmt}, open(source.path, "rb")  # noqa: SIM115
        if source.handle is not None:  # our own copy: the caller closes theirs when it likes
            return {"op": "load_context", "format": source.fmt}, open(os.dup(source.handle), "rb")  # noqa: SIM115
        if source.json_text is not None:
            if len(source.json_text) <= _INLINE_TEXT and is_utf8(source.json_text):
                return {"op": "load_context", "json": source.json_text}, None
            handle = tempfile.TemporaryFile(prefix="rlm-context-", dir=disk_tempdir())
            handle.write(source.json_text.encode("utf-8", "replace"))
            handle.flush()
            return {"op": "load_context", "format": "json"}, handle
        if source.value is None:
            return {"op": "load_context", "value": None}, None
        if isinstance(source.value, str) and len(source.value) <= _INLINE_TEXT and is_utf8(source.value):
            # A child's query, say: no file. (Frames cannot carry lone surrogates: protocol.py.)
            return {"op": "load_context", "text": source.value}, None
        handle = tempfile.TemporaryFile(prefix="rlm-context-", dir=disk_tempdir())
        if isinstance(source.value, str):
            _write_text(handle, source.value)
            fmt = "str"  # our own writing of a str: read back exactly, lone surrogates too
        else:
            text = io.TextIOWrapper(handle, encoding="utf-8")
            json.dump(source.value, text, ensure_ascii=False)  # written piece by piece, never whole
            text.flush()
            text.detach()
            fmt = "json"
        handle.flush()
        return {"op": "load_context", "format": fmt}, handle

    def _send_context(self) -> dict:
        worker = self._require_worker()
        message = self._context_message or {"op": "load_context", "value": None}
        try:
            if self._held.context_file is not None:
                worker.send_file(self._held.context_file)
        except ProtocolError as exc:
            raise SandboxError(f"the REPL worker stopped while loading the context ({exc})") from None
        reply = self._request(message, "context")
        if reply["op"] != "context":
            error = reply["error"]
            hint = "; raise the memory limit (memory_limit)" if error.startswith("MemoryError") else ""
            raise ContextError(f"the REPL worker could not load the context: {error}{hint}")
        return {key: value for key, value in reply.items() if key not in ("op", "id")}

    def _request(self, message: dict, answer: str) -> dict:
        """Send a request that is not a cell; its reply (`answer` or "error"), or SandboxError."""
        worker = self._require_worker()
        try:
            return worker.reply(worker.request(message), (answer, "error"), None)  # type: ignore[return-value]
        except ProtocolViolation as exc:
            self._discard_worker()  # a new one is started if another cell is run
            raise SandboxError(
                f"the REPL worker broke the protocol ({exc}) and was stopped; its variables are lost"
            ) from None
        except ProtocolError as exc:
            raise SandboxError(f"the REPL worker stopped responding ({exc}): {worker.death_note()}") from None

    # -- cells -----------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float, max_output: int) -> ExecResult:
        worker = self._require_worker()
        started = time.monotonic()
        try:
            request_id = worker.request({"op": "exec", "code": code, "max_output": max_output})
            return self._await_result(worker, request_id, timeout, max_output)
        except ProtocolViolation as exc:
            note = f"The REPL worker broke the protocol ({exc}) and was stopped"
        except ProtocolError:
            note = f"The REPL worker process died ({worker.death_note()})"
        if not self._replace_worker():
            return ExecResult(error=f"{note}; the session was closed.", restarted=True,
                              duration=time.monotonic() - started)
        return ExecResult(
            error=f"{note}; a new worker took its place: variables are lost, the context is loaded again.",
            restarted=True, duration=time.monotonic() - started,
        )

    def _await_result(self, worker: _Worker, request_id: int, timeout: float, max_output: int) -> ExecResult:
        started = time.monotonic()
        deadline = started + timeout
        interrupted = False
        while True:
            message = worker.reply(request_id, ("llm_query", "result"), deadline)
            if message is None:
                if interrupted:
                    self._replace_worker()
                    return ExecResult(
                        error=f"The cell ran past its {timeout:g} s limit and did not stop when interrupted.",
                        timed_out=True,
                        restarted=True,
                        duration=time.monotonic() - started,
                    )
                worker.interrupt()
                interrupted = True
                deadline = time.monotonic() + INTERRUPT_GRACE
            elif message["op"] == "llm_query":
                started = time.monotonic()
                worker.send(self._answer(worker, message))
                deadline += time.monotonic() - started
            else:
                stopped_by_us = interrupted and message["interrupted"]
                return result_from_session(message, timed_out=stopped_by_us, timeout=timeout, max_output=max_output)

    def _answer(self, worker: _Worker, message: dict) -> dict:
        kind, items = message["kind"], message["prompts"]
        files = worker.receive_files(sum(item["file"] for item in items)) if kind.startswith("rlm_") else []
        try:
            if kind.startswith("rlm_"):
                items = child_queries(items, files)
            return {"op": "llm_result", "id": message["id"], "results": self._bridge(kind, items)}
        except SubCallFailed as exc:
            return {"op": "llm_result", "id": message["id"], "error": str(exc)}
        except BaseException:
            # The run is failing; the worker is mid-cell waiting for us, so it cannot be reused.
            # A new one is started only if another cell is run.
            self._discard_worker()
            raise
        finally:
            for fd in files:
                os.close(fd)

    def get_variable(self, name: str) -> dict:
        reply = self._request({"op": "get_var", "name": name}, "var")
        return {key: value for key, value in reply.items() if key not in ("op", "id")}

    def close(self) -> None:
        self._finalizer()
