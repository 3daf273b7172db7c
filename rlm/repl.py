"""The REPL environment: one persistent session per RLM run, and what it needs from the host.

`REPLEnv` owns a sandbox (where the model's code runs), loads the context into it, runs
cells with the run's time and output limits, and records each cell in the trace. The
`llm_query` / `rlm_query` calls made by that code are passed to a bridge given by the run
(see `rlm.engine`), which answers them with the sub-model or a child RLM.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from rlm.errors import ContextError
from rlm.sandbox import ContextSource, ExecResult, LLMBridge, SandboxFactory, SandboxLimits, create_sandbox
from rlm.utils.tracing import CodeExec, Tracer

__all__ = ["REPLEnv", "SandboxFactory", "context_source"]



def context_source(context: Any) -> ContextSource:
    """Check a user's context value and say how the sandbox should load it.

    Accepted: a `str`; a list of strings (chunks); a dict or list of JSON-able values; a
    `pathlib.Path` to a UTF-8 text file (read by the sandbox, never by the host); or such a
    file already open for binary reading (the sandbox reads it from its start through a
    descriptor of its own; the caller keeps it open for the call and closes it): what a server
    passes after checking the file it opened, so that no later swap of the path can matter.
    """
    if isinstance(context, (io.BufferedReader, io.FileIO)):
        if context.closed or not stat.S_ISREG(os.fstat(context.fileno()).st_mode):
            raise ContextError("an open context file must be an open regular file")
        return ContextSource(handle=context.fileno(), fmt="text")
    if isinstance(context, Path):
        if not context.is_file():
            raise ContextError(f"context file {str(context)!r} does not exist or is not a file")
        return ContextSource(path=context.resolve(), fmt="text")
    if isinstance(context, str):
        return ContextSource(value=context)
    if isinstance(context, (list, tuple, dict)):
        if isinstance(context, (list, tuple)) and all(isinstance(item, str) for item in context):
            return ContextSource(value=list(context))
        try:
            json.dumps(context)
        except (TypeError, ValueError) as exc:
            raise ContextError(
                f"context must be JSON-serialisable when it is a {type(context).__name__}: {exc}"
            ) from None
        return ContextSource(value=context)
    raise ContextError(
        f"context of type {type(context).__name__} is not supported; pass a str, a list of str, "
        "a dict / list of JSON values, or a pathlib.Path to a text file"
    )


class REPLEnv:
    """One REPL session: runs cells in a sandbox; their sub-calls go to `bridge`."""

    def __init__(
        self,
        *,
        bridge: LLMBridge,
        tracer: Tracer,
        run_id: str,
        depth: int = 0,
        parent_id: str | None = None,
        sandbox: str | SandboxFactory = "subprocess",
        exec_timeout: float = 120.0,
        max_output_length: int = 500_000,
        limits: SandboxLimits | None = None,
        tools: list | None = None,
    ) -> None:
        self.tracer = tracer
        self.run_id = run_id
        self.depth = depth
        self.parent_id = parent_id
        self.exec_timeout = exec_timeout
        self.max_output_length = max_output_length
        self.turn = 0
        self._cells = 0
        self._closed = False
        self._confinement_seen: dict | None = None
        limits = limits if limits is not None else SandboxLimits()
        if isinstance(sandbox, str):
            self.sandbox = create_sandbox(sandbox, bridge, limits, tools=tools)
        else:  # a factory of the caller's: asked for tools only when there are some
            self.sandbox = sandbox(bridge, limits, tools=tools) if tools else sandbox(bridge, limits)

    def load_context(self, context: Any, name: str = "context") -> dict:
        """Load the context (a user value, or a checked ContextSource) into the session, as
        `name` (see `Sandbox.load_context`). Returns its type and lengths.
        """
        source = context if isinstance(context, ContextSource) else context_source(context)
        return self.sandbox.load_context(source, name=name)

    def run(self, code: str) -> ExecResult:
        """Run one cell of model code and record it in the trace."""
        self._cells += 1
        result = self.sandbox.run(code, timeout=self.exec_timeout, max_output=self.max_output_length)
        if self._closed:
            return result  # the run was cancelled while this cell ran: it is no longer part of the trace
        confinement = self.sandbox.confinement  # recorded on the first cell, and when it changes
        if confinement is None or confinement == self._confinement_seen:
            confinement = None
        else:
            self._confinement_seen = confinement
        self.tracer.emit(
            CodeExec(
                run_id=self.run_id,
                parent_id=self.parent_id,
                depth=self.depth,
                turn=self.turn,
                index=self._cells,
                code=code,
                stdout=result.stdout,
                stderr=result.stderr,
                error=result.error,
                timed_out=result.timed_out,
                restarted=result.restarted,
                duration=result.duration,
                confinement=confinement,
            )
        )
        return result

    def close(self) -> None:
        self._closed = True
        self.sandbox.close()

    def __enter__(self) -> "REPLEnv":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
