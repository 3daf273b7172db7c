"""The fastest sandbox, with NO isolation: model code runs inside the host process.

Use it for debugging and for trusted inputs only. Model code can read the host's environment
(API keys included), open files and sockets, and exit or crash the host process.

Timeouts are best effort: an exception is raised asynchronously in the thread running the
cell, which stops pure-Python loops but not a long call into C (a huge regex match, say).
Output is captured per thread, so the host's own printing is never swallowed. Limits
(`SandboxLimits`) cannot be enforced here: asking for any but the defaults, or none, is an error.
A `str` context is also kept encoded, as `context_bytes`: twice its size in memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time

from rlm.errors import ConfigError, ContextError
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
from rlm.sandbox.protocol import decode_tool_call
from rlm.sandbox.worker import LLMQueryError, Session

__all__ = ["InProcessSandbox"]


class _CellTimeout(BaseException):
    """Raised asynchronously in a cell's thread when it runs past its limit."""


class _SessionClosed(BaseException):
    """Raised asynchronously in a cell's thread when the session is closed under it (Ctrl-C)."""


class _HostFailure(BaseException):
    """Unwinds model code when the host failed to answer a sub-call; `run` then re-raises the cause."""


class InProcessSandbox(Sandbox):
    """Runs cells in the calling thread, in a namespace kept on this object."""

    name = "inprocess"
    isolated = False

    def __init__(self, bridge: LLMBridge, limits: SandboxLimits | None = None, *, tools: list | None = None) -> None:
        self.check_limits(limits if limits is not None else SandboxLimits())
        self._bridge = bridge
        self._session: Session | None = Session(self._call_bridge, process_wide=False, tools=tools)
        self._host_failure: Exception | None = None
        self._cell_thread: int | None = None
        self._idle = threading.Event()
        self._idle.set()

    @classmethod
    def check_limits(cls, limits: SandboxLimits) -> None:
        """Only the defaults (which it ignores) or no limits at all: it enforces none."""
        defaults = SandboxLimits()
        names = ("memory", "cpu_time", "file_size")
        if any(getattr(limits, name) not in (None, getattr(defaults, name)) for name in names):
            raise ConfigError(
                "the inprocess sandbox cannot enforce memory, CPU or file-size limits; "
                "use sandbox='subprocess' (or 'strict' / 'bwrap') with limits"
            )

    def _call_bridge(self, kind: str, prompts: list) -> list[str]:
        if kind == "tool":  # decoded as the host decodes a worker's call (protocol.py)
            items = [decode_tool_call(prompt) for prompt in prompts]
        else:
            items = child_queries(prompts, []) if kind.startswith("rlm_") else prompts
        try:
            return self._bridge(kind, items)
        except SubCallFailed as exc:
            raise LLMQueryError(str(exc)) from None
        except Exception as exc:
            # A failure of ours (endpoint down, say) fails the run, as in the worker sandbox;
            # kept aside so that model code catching the exception cannot hide it.
            self._host_failure = exc
            raise _HostFailure() from None

    def load_context(self, source: ContextSource, *, name: str = "context") -> dict:
        session = self._require()
        if source.path is not None:
            return session.load_context_fd(os.open(source.path, os.O_RDONLY), source.fmt, name=name)
        if source.handle is not None:
            return session.load_context_fd(os.dup(source.handle), source.fmt, name=name)
        if source.json_text is not None:
            try:
                value = json.loads(source.json_text)
            except (ValueError, RecursionError) as exc:
                raise ContextError(f"the context is not JSON that can be loaded: {exc}") from None
            return session.set_context(value, name=name)
        raw = source.value.encode("utf-8", "surrogatepass") if isinstance(source.value, str) else None
        return session.set_context(source.value, raw, name=name)

    def run(self, code: str, *, timeout: float, max_output: int) -> ExecResult:
        session = self._require()
        watchdog = _Watchdog(threading.get_ident(), session, timeout)
        watchdog.start()
        outcome: dict = {"error": None, "stdout": "", "stderr": ""}
        self._idle.clear()
        self._cell_thread = threading.get_ident()
        try:
            try:
                outcome = session.execute(code, max_output)
            finally:
                self._cell_thread = None
                self._idle.set()
                watchdog.cancel()
        except (_CellTimeout, _SessionClosed):
            pass  # delivered just after the cell ended; the cell's own result was already lost
        failure, self._host_failure = self._host_failure, None
        if failure is not None:
            raise failure
        return result_from_session(outcome, timed_out=watchdog.fired, timeout=timeout, max_output=max_output)

    def get_variable(self, name: str) -> dict:
        return self._require().get_variable(name)

    def _require(self) -> Session:
        if self._session is None:
            from rlm.errors import SandboxError

            raise SandboxError("this REPL session is closed")
        return self._session

    def close(self) -> None:
        """Forget the namespace; a cell still running (the run was cancelled) is interrupted.

        Like a timeout, the interruption stops Python code at once but a long call into C
        only when it returns; close() waits for it at most a second.
        """
        thread = self._cell_thread
        if thread is not None and thread != threading.get_ident():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(_SessionClosed))
            self._idle.wait(1.0)
        self._session = None


class _Watchdog:
    """Raises _CellTimeout in a thread once `timeout` seconds of its own work have passed."""

    def __init__(self, thread_id: int, session: Session, timeout: float) -> None:
        self._thread_id = thread_id
        self._session = session
        self._timeout = timeout
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.fired = False
        self._thread = threading.Thread(target=self._watch, daemon=True, name="rlm-cell-watchdog")

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + self._timeout
        while not self._done.wait(max(0.0, min(0.05, deadline - time.monotonic()))):
            if not self._session.running_user_code:
                deadline += 0.05  # waiting on a sub-call does not count, as in the worker
                continue
            if time.monotonic() >= deadline:
                with self._lock:
                    if not self._done.is_set():
                        self.fired = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(self._thread_id), ctypes.py_object(_CellTimeout)
                        )
                return

    def cancel(self) -> None:
        with self._lock:
            self._done.set()
        self._thread.join()
