"""One REPL worker process, seen from the host: how it starts, the handshake, frames and signals.

The host starts the worker (`python_argv()`, or a fork of the fork server), learns its pid
from the kernel (the credentials on its first byte), sends the setup frame its level asks for
and waits for "ready", which says what confinement the worker applied before any model code
ran. Afterwards every frame from it is checked (protocol.py); its stderr is drained into a
bounded buffer (workerio.py). `kill()` takes every process below it along.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import IO, Any, Callable, Iterable

from rlm.errors import SandboxError
from rlm.sandbox import forkserver, kernel
from rlm.sandbox.launch import Launch, worker_path
from rlm.sandbox.protocol import (
    MAX_JSON_ITEMS, WORKER_FRAME_CAP, WORKER_FRAMES, FrameReader, ProtocolError, ProtocolViolation, encode_frame,
)
from rlm.sandbox.workerio import StderrTail, receive_context_files

__all__ = ["BOOT", "START_TIMEOUT", "WorkerProcess", "python_argv"]

START_TIMEOUT = 30.0
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid

# The worker imports our package from where the host found it, nothing from the environment.
BOOT = ("import json, sys; path = json.loads(sys.argv[1]); sys.path[:0] = path[:1]; sys.path += path[1:]; "
        "from rlm.sandbox.serve import main; main()")


def python_argv() -> list[str]:
    """The command that starts a worker, before the file channel's descriptor number.

    `-S`: no `site` at start-up. Its `.pth` hooks (editable installs, certificate shims...)
    cost 50-70 ms on a 2-core machine, which a tree of child REPLs pays once per child, and
    they run code nobody chose for the sandbox. The worker gets our package and the
    installation's site-packages on `sys.path` instead, so model code can still import
    what is installed (but not packages that only a `.pth` hook makes importable).
    """
    return [sys.executable, "-I", "-S", "-c", BOOT, worker_path()]


class WorkerProcess:
    """One worker process, the pipes to it, and the socket that carries file descriptors."""

    def __init__(self, launch: Launch, setup: Callable[[int], dict]) -> None:
        self.launch = launch
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.confinement: dict[str, Any] = {}  # what the worker said it applied, before any model code ran
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
        # Our end of its input never blocks: a worker that stops reading cannot hold the host past
        # a deadline (send_frames).
        os.set_blocking(self.process.stdin.fileno(), False)
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
        self.confinement = {key: value for key, value in ready.items() if key not in ("op", "pid")}

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
        self._write(encode_frame(message), None)

    def send_frames(self, frames: Iterable[bytes], deadline: float) -> bool:
        """Write `frames`, taking each only when the last is written; False if the worker has not
        read them all by `deadline` (time.monotonic): the stream is then cut mid-frame."""
        return all(self._write(frame, deadline) for frame in frames)

    def _write(self, frame: bytes, deadline: float | None) -> bool:
        view = memoryview(frame)
        writable: Any = None
        try:
            fd = self.process.stdin.fileno()
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    if writable is None:
                        writable = select.poll()
                        writable.register(fd, select.POLLOUT)
                    wait = None if deadline is None else (deadline - time.monotonic()) * 1000
                    if wait is not None and wait <= 0:
                        return False
                    writable.poll(wait)  # room in the pipe, or the worker gone (then the write says so)
        except (OSError, ValueError) as exc:  # ValueError: the pipe was already closed
            raise ProtocolError(f"cannot write to the worker: {exc}") from None
        return True

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
        return receive_context_files(self.files, count) if count else []

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
