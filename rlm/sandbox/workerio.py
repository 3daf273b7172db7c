"""The host's end of a worker's other channels: its stderr, kept bounded, and the sealed files it passes.

Stderr: a worker's fd 2 (and fd 1, which the worker points there) is a pipe that a small
thread of the host drains, keeping only the last `STDERR_KEPT` bytes, so a worker writing
without end costs the host neither memory nor disk; `death_note` shows its tail.

Files: an `rlm_query` context too large for a frame comes as a memory file on the file
channel (protocol.py). The host takes it only if it is a regular file sealed against writes,
growing, shrinking and new seals, no larger than `MAX_CONTEXT_FILE`; anything else is a
protocol violation. The host never reads it: the child's sandbox does.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import stat
import threading

from rlm.sandbox.protocol import MAX_CONTEXT_FILE, ProtocolViolation

__all__ = ["STDERR_KEPT", "StderrTail", "receive_sealed_files"]

STDERR_KEPT = 64 << 10  # bytes of a worker's stderr the host keeps (the last ones)
_POLL_MS = 250  # how often the drain thread looks whether it should stop
_CLOSE_WAIT = 0.2  # seconds close() waits for the drain thread to see the end of the pipe
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
_CREDENTIALS_SPACE = socket.CMSG_SPACE(12)  # the kernel may attach the sender's credentials too


class StderrTail:
    """A pipe for a worker's stderr, drained by a thread into a buffer of the last `STDERR_KEPT` bytes.

    Give `write_fd` to the worker, then call `started()`. The read end is closed by the
    drain thread alone (at end of file, or within `_POLL_MS` of `close()`), so it is never
    read after its number was reused.
    """

    def __init__(self) -> None:
        self._read, self.write_fd = os.pipe()
        self._data = bytearray()
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def started(self) -> None:
        """The worker has its copy of the write end: drop ours and start draining."""
        os.close(self.write_fd)
        self._thread = threading.Thread(target=self._drain, name="rlm-worker-stderr", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self._read, select.POLLIN)
        try:
            while not self._stop:
                if not poller.poll(_POLL_MS):
                    continue
                chunk = os.read(self._read, STDERR_KEPT)
                if not chunk:
                    return
                with self._lock:
                    self._data += chunk
                    del self._data[:-STDERR_KEPT]
        finally:
            os.close(self._read)
            self._ended.set()

    def tail(self, limit: int = 2000, wait: float = 0.0) -> str:
        """The last `limit` bytes written, as text; waits up to `wait` s for the worker's end of the pipe to close."""
        if wait and self._thread is not None:
            self._ended.wait(wait)
        with self._lock:
            data = bytes(self._data[-limit:])
        return data.decode("utf-8", "replace").strip()

    def close(self) -> None:
        """Stop draining (the buffer stays readable). Safe to call twice.

        Called once the worker is dead, when the pipe has already ended unless a process it
        left holds the write end: the wait for the drain thread is short either way.
        """
        if self._thread is None:  # never started: both ends are still ours
            if not self._stop:
                os.close(self._read)
                os.close(self.write_fd)
        self._stop = True
        if self._thread is not None:
            self._thread.join(_CLOSE_WAIT)


def receive_sealed_files(channel: socket.socket, count: int) -> list[int]:
    """`count` sealed context files the worker sent before the frame announcing them.

    They are already queued (the worker sends them first), so nothing here waits. Raises
    ProtocolViolation, with no descriptor left open, if one is missing or not as required.
    """
    files: list[int] = []
    try:
        for _ in range(count):
            try:
                data, ancillary, flags, _ = channel.recvmsg(
                    1, _CREDENTIALS_SPACE + socket.CMSG_SPACE(4), socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                raise ProtocolViolation(f"{count} context files announced, {len(files)} sent") from None
            received = _descriptors(ancillary)
            files += received
            if not data or len(received) != 1 or flags & socket.MSG_CTRUNC:
                raise ProtocolViolation("a message on the file channel that is not one file")
            _check_sealed(received[0])
    except BaseException:
        for fd in files:
            os.close(fd)
        raise
    return files


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    found = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            found.frombytes(payload[: len(payload) - len(payload) % found.itemsize])
    return list(found)


def _check_sealed(fd: int) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolViolation("a context file that is not a regular file")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # a file that cannot be sealed
    if seals & _SEALS != _SEALS:
        raise ProtocolViolation("a context file not sealed against writes, resizing and new seals")
    if info.st_size > MAX_CONTEXT_FILE:
        raise ProtocolViolation(f"a context file of {info.st_size:,} bytes, over the cap of {MAX_CONTEXT_FILE:,}")
