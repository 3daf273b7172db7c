"""The default sandbox: a persistent worker process per session.

Protects the host from crashes, hangs and runaway output of model code; it does NOT protect
against hostile code (the worker runs as the same user and can read what that user can).
The worker gets a scrubbed environment, so API keys in the host's environment never reach it,
and the resource limits of `SandboxLimits` (address space, CPU time, file size).

Timeouts: SIGINT first (the worker raises KeyboardInterrupt only inside model code, so
variables survive); if the cell has not stopped after a grace period, SIGKILL, a new worker,
and the context loaded again. Time the host spends answering `llm_query` is not counted
against the cell's limit; the worker's reading of the answers is (a worker that does not read
them within it is replaced too, so it cannot hold the host).

Files: the context is never sent through the pipe. A `Path` context is opened here (never
read) and its descriptor passed to the worker, which maps it; a `str` or JSON context is
first written once, in 16 MiB pieces, to an unnamed temporary file on disk, which the kernel
frees when the last descriptor to it closes, whatever happens to either process. Every
descriptor passed is read-only (the temporary file is reopened so: `workerio.reopen_read_only`),
so model code cannot write, grow or shrink the host's copy. Model code's scratch directory
is removed on close, or by the worker itself if the host dies.

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
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, Iterable

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
from rlm.sandbox.launch import Launch, disk_tempdir, package_root, scrubbed_env
from rlm.sandbox.process import WorkerProcess, python_argv
from rlm.sandbox.protocol import RESULT_FRAME_CAP, ProtocolError, ProtocolViolation, fit_frame, result_frames
from rlm.sandbox.textfile import ascii_view
from rlm.sandbox.workerio import reopen_read_only

# Launch, disk_tempdir, package_root and scrubbed_env live in launch.py, python_argv in
# process.py; the confined levels and the tools import them from here too.
__all__ = ["Launch", "SubprocessSandbox", "disk_tempdir", "package_root", "python_argv", "scrubbed_env"]

INTERRUPT_GRACE = 1.0  # seconds between SIGINT and SIGKILL
_WRITE_CHUNK = 16 << 20
_INLINE_TEXT = 64 << 10  # characters: a str context up to this size goes in the frame itself


def _read_only(handle: IO[bytes]) -> IO[bytes]:
    """A read-only handle on the file `handle` wrote (a description of its own), which is closed."""
    with handle:
        handle.flush()
        return open(reopen_read_only(handle.fileno()), "rb")  # noqa: SIM115


def _write_text(handle: IO[bytes], text: str) -> None:
    """Write `text` as UTF-8 in 16 MiB pieces; an ASCII string straight from its own buffer."""
    view = ascii_view(text)
    if view is not None:
        for start in range(0, len(view), _WRITE_CHUNK):
            handle.write(view[start : start + _WRITE_CHUNK])
        return
    for start in range(0, len(text), _WRITE_CHUNK):
        handle.write(text[start : start + _WRITE_CHUNK].encode("utf-8", "surrogatepass"))


class _Held:
    """What a session holds outside Python: released by close() or when the sandbox is collected.

    close() may come from another thread while a cell's thread is replacing a dead worker:
    the worker is swapped under a lock, and none is adopted once the session is closed.
    """

    def __init__(self, scratch: Path | None) -> None:
        self.scratch = scratch
        self.worker: WorkerProcess | None = None
        self.context_file: IO[bytes] | None = None
        self.closed = False
        self._lock = threading.Lock()

    def adopt(self, worker: WorkerProcess) -> bool:
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

    def __init__(self, bridge: LLMBridge, limits: SandboxLimits | None = None, *, tools: list | None = None) -> None:
        self._bridge = bridge
        self.limits = limits if limits is not None else SandboxLimits()
        self._tools = list(tools or ())  # host tools' specs (rlm.tools.tool_specs), in every worker's setup
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

    def _start(self) -> WorkerProcess:
        return WorkerProcess(
            self._launch(), lambda pid: {"limits": self.limits.as_message(), "tools": self._tools, **self._confinement(pid)}
        )

    @property
    def _worker(self) -> WorkerProcess | None:
        return self._held.worker

    @property
    def worker_pid(self) -> int | None:
        """The worker's process id as the host sees it (None between a crash and the next cell)."""
        return self._held.worker.pid if self._held.worker is not None else None

    @property
    def confinement(self) -> dict | None:
        worker = self._held.worker
        return dict(worker.confinement) if worker is not None else None

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

    def _require_worker(self) -> WorkerProcess:
        worker = self._held.worker
        if worker is None and not self._held.closed and self._replace_worker():
            worker = self._held.worker
        if worker is None:
            raise SandboxError("this REPL session is closed")
        return worker

    # -- context ---------------------------------------------------------------------------

    def load_context(self, source: ContextSource, *, name: str = "context") -> dict:
        message, handle = self._context_file(source)
        if name != "context":
            message["name"] = name
        if name not in ("context", "context_0"):  # a session's further value: not loaded again after a restart
            try:
                return self._send_context(message, handle)
            finally:
                if handle is not None:
                    handle.close()
        if self._held.context_file is not None:
            self._held.context_file.close()
        self._held.context_file = handle
        self._context_message = message
        return self._send_context()

    def _context_file(self, source: ContextSource) -> tuple[dict, IO[bytes] | None]:
        """The message that loads `source` and the file passed with it: always open read-only."""
        if source.path is not None:
            return {"op": "load_context", "format": source.fmt}, open(source.path, "rb")  # noqa: SIM115
        if source.handle is not None:  # our own description: the caller closes theirs when it likes
            handle = open(reopen_read_only(source.handle), "rb")  # noqa: SIM115
            return {"op": "load_context", "format": source.fmt}, handle
        if source.json_text is not None:
            if len(source.json_text) <= _INLINE_TEXT and is_utf8(source.json_text):
                return {"op": "load_context", "json": source.json_text}, None
            handle = tempfile.TemporaryFile(prefix="rlm-context-", dir=disk_tempdir())
            handle.write(source.json_text.encode("utf-8", "replace"))
            return {"op": "load_context", "format": "json"}, _read_only(handle)
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
        return {"op": "load_context", "format": fmt}, _read_only(handle)

    def _send_context(self, message: dict | None = None, handle: IO[bytes] | None = None) -> dict:
        """Send a context (by default the session's own, kept for a restart) and its file."""
        worker = self._require_worker()
        if message is None:
            message = self._context_message or {"op": "load_context", "value": None}
            handle = self._held.context_file
        try:
            if handle is not None:
                worker.send_file(handle)
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

    def _await_result(self, worker: WorkerProcess, request_id: int, timeout: float, max_output: int) -> ExecResult:
        started = time.monotonic()
        deadline = started + timeout
        interrupted = False
        while True:
            message = worker.reply(request_id, ("llm_query", "result"), deadline)
            if message is None:
                if interrupted:
                    return self._stopped(f"The cell ran past its {timeout:g} s limit and did not stop when interrupted.",
                                         started)
                worker.interrupt()
                interrupted = True
                deadline = time.monotonic() + INTERRUPT_GRACE
            elif message["op"] == "llm_query":
                asked = time.monotonic()
                frames = self._answer(worker, message)
                deadline += time.monotonic() - asked
                # The worker reads its answers in the cell's time, given a second at least.
                if not worker.send_frames(frames, max(deadline, time.monotonic() + INTERRUPT_GRACE)):
                    return self._stopped(
                        f"The cell ran past its {timeout:g} s limit without reading the answers to its sub-call.", started
                    )
            else:
                stopped_by_us = interrupted and message["interrupted"]
                return result_from_session(message, timed_out=stopped_by_us, timeout=timeout, max_output=max_output)

    def _stopped(self, error: str, started: float) -> ExecResult:
        """A cell stopped by replacing its worker, past its time limit."""
        self._replace_worker()
        return ExecResult(error=error, timed_out=True, restarted=True, duration=time.monotonic() - started)

    def _answer(self, worker: WorkerProcess, message: dict) -> Iterable[bytes]:
        """The llm_result frames that answer one llm_query, made one at a time (protocol.py)."""
        kind, items = message["kind"], message["prompts"]
        files = worker.receive_files(sum(item["file"] for item in items)) if kind.startswith("rlm_") else []
        try:
            if kind.startswith("rlm_"):
                items = child_queries(items, files)
            return result_frames(message["id"], self._bridge(kind, items))
        except SubCallFailed as exc:
            failure = {"op": "llm_result", "id": message["id"], "more": False, "error": str(exc)}
            return [fit_frame(failure, ("error",), RESULT_FRAME_CAP)]
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
