"""The host's end of a worker's other channels: its stderr, kept bounded, and the files passed either way.

Stderr: a worker's fd 2 (and fd 1, which the worker points there) is a pipe that a small
thread of the host drains, keeping only the last `STDERR_KEPT` bytes, so a worker writing
without end costs the host neither memory nor disk; `death_note` shows its tail.

Files: every descriptor the host passes to a worker is open read-only, a description of its
own (`reopen_read_only`), so model code can neither write nor resize the host's file. An
`rlm_query` context too large for a frame comes from the worker as a file in its scratch
(subcalls.py) on the file channel (protocol.py). The host takes it only if it is a regular
file the worker could read itself, no larger than `MAX_CONTEXT_FILE`; anything else is a
protocol violation. It reopens it read-only, closes the worker's read-write description, and
hands the new one to the child's sandbox; it never reads it. It cannot be sealed (memfds,
which can, are denied: their memory counts in no limit), so the worker may still change it
while the child reads it: that spoils the child's run (a crash, then a restart), not the host.
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

__all__ = ["STDERR_KEPT", "StderrTail", "receive_context_files", "reopen_read_only"]

STDERR_KEPT = 64 << 10  # bytes of a worker's stderr the host keeps (the last ones)
_POLL_MS = 250  # how often the drain thread looks whether it should stop
_CLOSE_WAIT = 0.2  # seconds close() waits for the drain thread to see the end of the pipe
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


def reopen_read_only(fd: int) -> int:
    """A new read-only open file description of the file `fd` refers to (through /proc/self/fd,
    so with its own offset: `fd`, read-write or not, is left as it was). Raises OSError.

    Non-blocking while it opens, so that a lease another process holds on the file (a lease
    holder can delay an open for up to /proc/sys/fs/lease-break-time) fails it at once.
    """
    new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    os.set_blocking(new, True)
    return new


def receive_context_files(channel: socket.socket, count: int) -> list[int]:
    """`count` context files the worker sent before the frame announcing them, each reopened read-only.

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
            try:
                if not data or len(received) != 1 or flags & socket.MSG_CTRUNC:
                    raise ProtocolViolation("a message on the file channel that is not one file")
                files.append(_read_only_copy(received[0]))
            finally:
                for fd in received:
                    os.close(fd)  # the worker's own description: it may be read-write
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


def _read_only_copy(fd: int) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolViolation("a context file that is not a regular file")
    if info.st_size > MAX_CONTEXT_FILE:
        raise ProtocolViolation(f"a context file of {info.st_size:,} bytes, over the cap of {MAX_CONTEXT_FILE:,}")
    # Only a file the worker could read itself: an O_PATH descriptor (which needs no right to
    # read, and which Landlock lets it open anywhere) reopened by the host would read for it.
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH or flags & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR):
        raise ProtocolViolation("a context file the worker did not open for reading")
    try:
        return reopen_read_only(fd)
    except OSError as exc:
        raise ProtocolViolation(f"a context file the host cannot reopen read-only ({exc.strerror})") from None
