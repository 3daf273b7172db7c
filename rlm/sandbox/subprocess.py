"""The default sandbox: a persistent worker process per session.

Protects the host from crashes, hangs and runaway output of model code; it does NOT protect
against hostile code (the worker runs as the same user and can read what that user can).
The worker gets a scrubbed environment, so API keys in the host's environment never reach it.

Timeouts: SIGINT first (the worker raises KeyboardInterrupt only inside model code, so
variables survive); if the cell has not stopped after a grace period, SIGKILL, a new worker,
and the context loaded again. Time the host spends answering `llm_query` is not counted
against the cell's limit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import rlm
from rlm.errors import SandboxError
from rlm.sandbox.base import ContextSource, ExecResult, LLMBridge, Sandbox, SubCallFailed, result_from_session
from rlm.sandbox.protocol import FrameReader, ProtocolError, write_frame

__all__ = ["SubprocessSandbox"]

INTERRUPT_GRACE = 1.0  # seconds between SIGINT and SIGKILL
START_TIMEOUT = 30.0
_WRITE_CHUNK = 16 << 20

# The worker imports our package from where the host found it, nothing from the environment.
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from rlm.sandbox.worker import main; main()"


# Host variables the worker may need to start Python at all; nothing else is passed on.
_PASSED_ON = ("LD_LIBRARY_PATH",)


def _scrubbed_env(scratch: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    env.update({name: os.environ[name] for name in _PASSED_ON if name in os.environ})
    return env


class _Worker:
    """One worker process and the pipes to it."""

    def __init__(self, scratch: Path) -> None:
        package_root = str(Path(rlm.__file__).resolve().parent.parent)
        self.stderr_path = scratch / "worker-stderr.log"
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, package_root],  # cwd is the scratch dir
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=scratch,
                env=_scrubbed_env(scratch),
                start_new_session=True,
            )
        self.reader = FrameReader(self.process.stdout.fileno())
        try:
            ready = self.receive(time.monotonic() + START_TIMEOUT)
        except ProtocolError:
            ready = None
        if ready is None or ready.get("op") != "ready":
            self.kill()
            raise SandboxError(
                f"the REPL worker ({sys.executable}) did not start: {self.stderr_tail() or 'no output'}. "
                "Try sandbox='inprocess' to check the rest of your set-up."
            )

    def send(self, message: dict) -> None:
        try:
            write_frame(self.process.stdin.fileno(), message)
        except (OSError, ValueError) as exc:  # ValueError: the pipe was already closed
            raise ProtocolError(f"cannot write to the worker: {exc}") from None

    def receive(self, deadline: float | None) -> dict | None:
        return self.reader.read(deadline)

    def interrupt(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()

    def death_note(self) -> str:
        try:
            code = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:  # alive but talking nonsense: it cannot be trusted
            self.kill()
            code = self.process.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = self.stderr_tail()
        return how + (f"; its last output:\n{tail}" if tail else "")

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            data = self.stderr_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace").strip()


class SubprocessSandbox(Sandbox):
    """Runs cells in a persistent child process (`python -I`), talking JSON frames."""

    name = "subprocess"
    isolated = False

    def __init__(self, bridge: LLMBridge) -> None:
        self._bridge = bridge
        self._scratch = Path(tempfile.mkdtemp(prefix="rlm-session-"))
        self._context_message: dict | None = None
        self._worker: _Worker | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _cleanup, self._scratch, [None])
        self._worker = self._start()

    def _start(self) -> _Worker:
        worker = _Worker(self._scratch)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _cleanup, self._scratch, [worker])
        return worker

    # -- context ---------------------------------------------------------------------------

    def load_context(self, source: ContextSource) -> dict:
        self._context_message = self._context_frame(source)
        return self._send_context()

    def _context_frame(self, source: ContextSource) -> dict:
        if source.path is not None:
            return {"op": "load_context", "path": str(source.path), "format": source.fmt}
        if source.value is None:
            return {"op": "load_context", "value": None}
        target = self._scratch / ("context.txt" if isinstance(source.value, str) else "context.json")
        with open(target, "wb") as handle:
            if isinstance(source.value, str):
                for start in range(0, len(source.value), _WRITE_CHUNK):
                    handle.write(source.value[start : start + _WRITE_CHUNK].encode("utf-8", "surrogatepass"))
            else:
                handle.write(json.dumps(source.value, ensure_ascii=False).encode("utf-8"))
        fmt = "text" if isinstance(source.value, str) else "json"
        return {"op": "load_context", "path": str(target), "format": fmt}

    def _send_context(self) -> dict:
        reply = self._request(self._context_message or {"op": "load_context", "value": None})
        if reply["op"] != "context":
            raise SandboxError(f"the REPL worker could not load the context: {reply.get('error')}")
        return {key: value for key, value in reply.items() if key != "op"}

    def _request(self, message: dict) -> dict:
        worker = self._require_worker()
        try:
            worker.send(message)
            reply = worker.receive(None)
        except ProtocolError as exc:
            raise SandboxError(f"the REPL worker stopped responding ({exc}): {worker.death_note()}") from None
        return reply

    # -- cells -----------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float, max_output: int) -> ExecResult:
        worker = self._require_worker()
        started = time.monotonic()
        try:
            worker.send({"op": "exec", "code": code, "max_output": max_output})
            return self._await_result(worker, timeout)
        except ProtocolError:
            note = worker.death_note()
            self._replace_worker()
            return ExecResult(
                error=f"The REPL worker process died ({note}).", restarted=True, duration=time.monotonic() - started
            )

    def _await_result(self, worker: _Worker, timeout: float) -> ExecResult:
        started = time.monotonic()
        deadline = started + timeout
        interrupted = False
        while True:
            message = worker.receive(deadline)
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
                worker.send(self._answer(message))
                deadline += time.monotonic() - started
            elif message["op"] == "result":
                stopped_by_us = interrupted and bool(message.get("interrupted"))
                return result_from_session(message, timed_out=stopped_by_us, timeout=timeout)
            else:
                raise SandboxError(f"unexpected message from the REPL worker: {message.get('op')!r}")

    def _answer(self, message: dict) -> dict:
        try:
            return {"op": "llm_result", "results": self._bridge(message["kind"], message["prompts"])}
        except SubCallFailed as exc:
            return {"op": "llm_result", "error": str(exc)}
        except BaseException:
            # The run is failing; the worker is mid-cell waiting for us, so it cannot be reused.
            # A new one is started only if another cell is run.
            self._discard_worker()
            raise

    def _discard_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
        self._worker = None

    def _replace_worker(self) -> None:
        self._discard_worker()
        self._worker = self._start()
        if self._context_message is not None:
            self._send_context()

    def get_variable(self, name: str) -> dict:
        reply = self._request({"op": "get_var", "name": name})
        return {key: value for key, value in reply.items() if key != "op"}

    def _require_worker(self) -> _Worker:
        if self._closed:
            raise SandboxError("this REPL session is closed")
        if self._worker is None:
            self._replace_worker()
        return self._worker

    def close(self) -> None:
        self._closed = True
        self._finalizer()
        self._worker = None


def _cleanup(scratch: Path, workers: list) -> None:
    for worker in workers:
        if worker is not None:
            worker.kill()  # nothing in the worker needs a graceful end; its scratch goes next
    shutil.rmtree(scratch, ignore_errors=True)
